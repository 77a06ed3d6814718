//! `bulwark replay` and `bulwark cancel` with the real binary: a sync killed mid-run is
//! finished by `replay` without starting a new run; another killed mid-run is cancelled,
//! keeps what it confirmed, and the next sync sends the rest.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_engine::Backend;
use bulwark_tests::{KillOnDrop, bulwark, run_code, run_ok};

/// Start `bulwark sync` against the simulator and SIGKILL it once some endpoint syncs
/// are done and some are not.
async fn sync_then_kill(db: &std::path::Path, portal: &str) {
    let mut child = KillOnDrop(
        bulwark()
            .args([
                "sync",
                "--endpoints",
                "12",
                "--batch-size",
                "50",
                "--max-in-flight",
                "2",
                "--portal-url",
                portal,
                "--db",
            ])
            .arg(db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    loop {
        if let Ok(backend) = Backend::open(&db.display().to_string()).await {
            let counts = backend
                .store()
                .status_counts(None)
                .await
                .unwrap_or_default();
            backend.close().await;
            let done: i64 = counts
                .iter()
                .filter(|(s, _)| s == "Done")
                .map(|(_, n)| n)
                .sum();
            let total: i64 = counts.iter().map(|(_, n)| n).sum();
            if done >= 2 && done < total {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the sync never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_finishes_a_killed_run_and_cancel_ends_one() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy.db");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", "300", "--path"])
            .arg(&legacy),
    );
    // Every request takes 40 ms: a sync of 12 endpoints lasts long enough to kill.
    let sim = simulator::start(
        SimConfig {
            latency_ms: 40,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());

    // replay: finishes the killed run, starts none.
    let db = dir.path().join("replay.db");
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&legacy)
            .arg("--db")
            .arg(&db),
    );
    sync_then_kill(&db, &portal).await;
    let out = run_ok(
        bulwark()
            .args([
                "replay",
                "--endpoints",
                "12",
                "--batch-size",
                "50",
                "--portal-url",
                &portal,
                "--db",
            ])
            .arg(&db),
    );
    assert!(out.contains("12 done") || out.contains("done"), "{out}");
    let runs: serde_json::Value =
        serde_json::from_str(&run_ok(bulwark().args(["runs", "--json", "--db"]).arg(&db))).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(
        runs.len(),
        2,
        "the snapshot's run and the one sync run: {runs:?}"
    );
    let sync_run = runs.iter().find(|r| r["kind"] == "sync").unwrap();
    assert_eq!(sync_run["status"], "finished", "{runs:?}");
    assert_eq!(sync_run["states"]["Done"], 12, "{runs:?}");
    let again = run_ok(
        bulwark()
            .args([
                "replay",
                "--endpoints",
                "12",
                "--portal-url",
                &portal,
                "--db",
            ])
            .arg(&db),
    );
    assert!(again.contains("nothing to replay"), "{again}");
    assert!(run_ok(bulwark().args(["audit", "--db"]).arg(&db)).contains(": 0 finding(s)"));

    // cancel: the killed run ends cancelled; what finished stays confirmed.
    let db = dir.path().join("cancel.db");
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&legacy)
            .arg("--db")
            .arg(&db),
    );
    sync_then_kill(&db, &portal).await;
    let backend = Backend::open(&db.display().to_string()).await.unwrap();
    let store = backend.store();
    let run = store
        .runs()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.kind == "sync")
        .unwrap()
        .id;
    let done_before = store
        .workflows(Some(run), None)
        .await
        .unwrap()
        .iter()
        .filter(|w| w.status == "Done")
        .count();
    backend.close().await;
    let out = run_ok(
        bulwark()
            .args(["cancel", &run.to_string(), "--json", "--db"])
            .arg(&db),
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["finished"], true, "{out}");
    assert_eq!(
        r["cancelled"].as_u64().unwrap() as usize,
        12 - done_before,
        "{out}"
    );
    let shown = run_ok(bulwark().args(["run", &run.to_string(), "--db"]).arg(&db));
    assert!(
        shown.contains("cancelled") && shown.contains("Cancelled="),
        "{shown}"
    );
    // Cancelling again is refused, naming the run.
    let out = bulwark()
        .args(["cancel", &run.to_string(), "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already cancelled"));
    // The next sync sends only what the cancelled run did not confirm.
    let next = run_ok(
        bulwark()
            .args([
                "sync",
                "--endpoints",
                "12",
                "--batch-size",
                "50",
                "--portal-url",
                &portal,
                "--db",
            ])
            .arg(&db),
    );
    assert!(
        next.contains(&format!("{} done", 12 - done_before)),
        "{next}"
    );
    assert!(run_ok(bulwark().args(["audit", "--db"]).arg(&db)).contains(": 0 finding(s)"));
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_on_request_carry_the_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("b.db");
    bulwark_tests::legacy_snapshot(dir.path(), 50, &db);
    let sim = simulator::start(
        SimConfig {
            profiles: [("ep-00002".to_string(), simulator::Fault::Reject)].into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let out = bulwark()
        .args([
            "sync",
            "--endpoints",
            "3",
            "--portal-url",
            &format!("http://{}", sim.addr()),
            "--db",
        ])
        .arg(&db)
        .env("BULWARK_LOG", "warn")
        .env("BULWARK_LOG_FORMAT", "json")
        .output()
        .unwrap();
    // ep-00002 tripped: finished with work undone.
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let opened = events
        .iter()
        .find(|e| e["fields"]["kind"] == "circuit_opened")
        .unwrap_or_else(|| panic!("no circuit_opened event in:\n{stderr}"));
    assert_eq!(opened["level"], "ERROR");
    assert_eq!(opened["fields"]["subject"], "ep-00002");
    assert!(
        opened["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("opened after 3")
    );
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_its_own_metrics() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "worker_metrics");
    let dir = tempfile::tempdir().unwrap();
    bulwark_tests::legacy_snapshot(dir.path(), 250, &db);
    // One endpoint of five stores wrong values: 3 failed validations trip it.
    let sim = simulator::start(
        SimConfig {
            profiles: [("ep-00005".to_string(), simulator::Fault::Corrupt)].into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());
    let endpoint_args = [
        "--endpoints",
        "5",
        "--portal-url",
        &portal,
        "--batch-size",
        "100",
    ];

    // Off loopback without a token, the worker refuses to start.
    let refused = bulwark()
        .args(["worker", "--db", &db, "--metrics-listen", "0.0.0.0:0"])
        .args(endpoint_args)
        .env_remove("BULWARK_SERVE_TOKEN")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("without a token: set BULWARK_SERVE_TOKEN"),
        "{why}"
    );

    let port = bulwark_tests::free_port();
    let mut worker = KillOnDrop(
        bulwark()
            .args(["worker", "--db", &db, "--metrics-listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(endpoint_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(port);
    let url = format!("http://127.0.0.1:{port}/metrics");
    let before = bulwark_tests::parse_openmetrics(&get_text(&url).await);
    assert_eq!(before["bulwark_journal_commit_seconds_count"], 0.0);
    assert_eq!(before["bulwark_build_info{version=\"0.1.0\"}"], 1.0);

    // One endpoint tripped: the run finished with work undone, status 1.
    let out = run_code(
        bulwark()
            .args(["sync", "--wait", "--db", &db])
            .args(endpoint_args),
        1,
    );
    assert!(out.contains("Done=4 Tripped=1"), "{out}");
    let text = get_text(&url).await;
    let m = bulwark_tests::parse_openmetrics(&text);
    // 250 items in batches of 100: 3 batches to each of 4 healthy endpoints; the broken
    // one's first batch fails validation 3 times, each a difference read twice (a first
    // difference is read again before it counts).
    assert_eq!(
        m["bulwark_batches_total{outcome=\"verified\"}"], 12.0,
        "{text}"
    );
    assert_eq!(
        m["bulwark_batches_total{outcome=\"mismatch\"}"], 6.0,
        "{text}"
    );
    assert_eq!(
        m["bulwark_adapter_calls_total{call=\"upload\"}"], 15.0,
        "{text}"
    );
    assert_eq!(m["bulwark_effects_in_flight"], 0.0, "{text}");
    assert_eq!(m["bulwark_lease_takeovers_total"], 0.0, "{text}");
    let commits = m["bulwark_journal_commit_seconds_count"];
    assert!(commits > 0.0, "{text}");
    assert_eq!(
        m["bulwark_journal_commit_seconds_bucket{le=\"+Inf\"}"],
        commits
    );
    assert!(m["bulwark_journal_commit_seconds_sum"] > 0.0);
    assert!(m["bulwark_journal_appends_total{outcome=\"committed\"}"] > 0.0);
    // Every adapter call is timed, by adapter and outcome: 15 uploads and the verifies
    // (12 + 6, and the broken endpoint's verifies count as calls that answered).
    let calls: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("bulwark_adapter_call_seconds_count{"))
        .map(|(_, v)| v)
        .sum();
    let counted: f64 = ["upload", "verify", "probe", "read_back"]
        .iter()
        .map(|c| m[&format!("bulwark_adapter_calls_total{{call=\"{c}\"}}")])
        .sum();
    assert_eq!(calls, counted, "{text}");
    assert!(
        m["bulwark_adapter_call_seconds_count{adapter=\"rest\",outcome=\"ok\"}"] >= 27.0,
        "{text}"
    );
    // Health without the token rule (there is none on loopback here) and readiness.
    let health = format!("http://127.0.0.1:{port}/healthz");
    assert_eq!(get_text(&health).await.trim(), "ok");
    let ready = format!("http://127.0.0.1:{port}/readyz");
    assert_eq!(get_text(&ready).await.trim(), "ready");

    run_ok(std::process::Command::new("kill").args(["-TERM", &worker.0.id().to_string()]));
    assert!(worker.0.wait().unwrap().success());
    sim.shutdown().await.unwrap();
}

async fn get_text(url: &str) -> String {
    bulwark_adapters::rest::RestAdapter::shared_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
