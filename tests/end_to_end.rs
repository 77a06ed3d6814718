//! `bulwark demo` end to end with the real binary, over real HTTP on loopback: a full
//! first sync with broken endpoints tripping, a second run that sends nothing, a delta
//! sync after a change in the legacy database, and `status`, `alerts`, `audit`.

use std::path::Path;
use std::process::Command;

fn bulwark(args: &[&str], data: &Path) -> String {
    let out = Command::new(bulwark_tests::bulwark_bin())
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("run bulwark");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "bulwark {args:?} failed:\n{text}");
    text
}

fn query(args: &[&str], db: &Path) -> (bool, String) {
    let out = Command::new(bulwark_tests::bulwark_bin())
        .args(args)
        .arg("--db")
        .arg(db)
        .output()
        .expect("run bulwark");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn number_before(text: &str, label: &str) -> u64 {
    let i = text
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} not in:\n{text}"));
    text[..i]
        .split_whitespace()
        .last()
        .and_then(|w| w.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no number before {label:?} in:\n{text}"))
}

#[test]
fn demo_syncs_everything_then_nothing_then_only_the_delta() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let common = [
        "--endpoints",
        "60",
        "--skus",
        "900",
        "--batch-size",
        "100",
        "--broken",
        "3",
        "--browser-endpoints",
        "0",
    ];

    let first = bulwark(&[&["demo"][..], &common].concat(), &data);
    assert!(
        first.contains("900 rows read, 900 accepted, 0 rejected, 1 queries"),
        "{first}"
    );
    assert!(first.contains("57 done, 3 tripped"), "{first}");
    // The demo shows the dry run of what it then sends: everything, to every endpoint.
    assert!(
        first.contains(
            "dry run (nothing sent, nothing journaled): snapshot 1: 60 endpoint(s) would be sent 54000 item(s) in 540 batch(es)"
        ),
        "{first}"
    );
    // 57 healthy endpoints × 9 batches, plus the endpoint that stores wrong values: its
    // batch 0 lands under 3 keys (each failed verification re-sends under a fresh key)
    // before it trips. The rejecting endpoints apply nothing.
    assert_eq!(
        number_before(&first, "batches applied"),
        57 * 9 + 3,
        "{first}"
    );
    assert_eq!(number_before(&first, "duplicates applied"), 0, "{first}");
    assert!(first.contains("transitions/s"), "{first}");

    // Nothing changed: nothing is sent; the tripped endpoints are skipped (circuit open).
    let second = bulwark(&[&["demo"][..], &common].concat(), &data);
    assert!(second.contains("57 already up to date"), "{second}");
    assert!(second.contains("0 uploads, 0 verifies"), "{second}");
    assert!(second.contains("3 skipped"), "{second}");
    // Its dry run knew: nothing to send, the tripped three skipped for their circuits.
    assert!(
        second.contains("0 endpoint(s) would be sent 0 item(s)"),
        "{second}"
    );
    assert!(second.contains("3 circuit(s) open, skipped"), "{second}");
    assert_eq!(number_before(&second, "HTTP requests"), 0, "{second}");

    // 2% of SKUs change in the legacy database: only those are sent, to every healthy endpoint.
    let third = bulwark(
        &[&["demo", "--change", "0.02"][..], &common].concat(),
        &data,
    );
    let changed = number_before(&third, "SKUs in the legacy database");
    assert!(changed > 0 && changed < 900, "{third}");
    // Planned: the delta for each healthy endpoint, the full catalog for the 3 never
    // confirmed (tripped) ones, which their open circuits then skip.
    assert_eq!(
        number_before(&third, "items"),
        57 * changed + 3 * 900,
        "{third}"
    );
    assert_eq!(
        number_before(&third, "batches applied"),
        57 * changed.div_ceil(100),
        "{third}"
    );
    assert!(third.contains("57 done"), "{third}");

    let db = data.join("bulwark.db");
    let (ok, status) = query(&["status"], &db);
    assert!(ok, "{status}");
    assert!(status.contains("Done=57 Tripped=3"), "{status}");
    let (ok, json) = query(&["status", "--json"], &db);
    assert!(ok && json.trim_start().starts_with('{'), "{json}");
    let (ok, alerts) = query(&["alerts"], &db);
    assert!(ok, "{alerts}");
    assert_eq!(
        alerts
            .matches("opened after 3 consecutive failed validation")
            .count(),
        3,
        "{alerts}"
    );
    assert_eq!(alerts.matches("run_tripped").count(), 1, "{alerts}");
    let (ok, audit) = query(&["audit"], &db);
    assert!(ok && audit.contains(": 0 finding(s)"), "{audit}");

    // Operator commands, plain and --json.
    let (ok, runs) = query(&["runs", "--json"], &db);
    assert!(ok, "{runs}");
    let runs: serde_json::Value = serde_json::from_str(&runs).unwrap();
    let first_sync = runs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "sync")
        .map(|r| r["id"].as_i64().unwrap())
        .min()
        .unwrap();
    let (ok, run) = query(&["run", &first_sync.to_string()], &db);
    assert!(ok && run.contains("Done=57 Tripped=3"), "{run}");
    let (ok, tripped) = query(&["endpoints", "--tripped", "--json"], &db);
    assert!(ok, "{tripped}");
    let tripped: serde_json::Value = serde_json::from_str(&tripped).unwrap();
    let ids: Vec<&str> = tripped
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{tripped}");
    let (ok, done) = query(&["endpoints", "--state", "done"], &db);
    assert!(ok && done.lines().count() == 58, "{done}");
    let (ok, one) = query(&["endpoint", ids[0]], &db);
    assert!(
        ok && one.contains("circuit open\n  opened 20")
            && one.contains(" after 3 failure(s), opening #1\n  probe from 20")
            && one.contains("last error: batch 0")
            && one.contains("Tripped"),
        "{one}"
    );
    let (ok, reset) = query(&["reset-circuit", ids[0]], &db);
    assert!(ok && reset.contains("closed"), "{reset}");
    let (ok, one) = query(&["endpoint", ids[0], "--json"], &db);
    assert!(ok && one.contains("\"circuit_open_until\": null"), "{one}");
    assert!(one.contains("\"state\": \"closed\""), "{one}");
    let (ok, alerts) = query(&["alerts", "--json"], &db);
    assert!(ok, "{alerts}");
    let alerts: serde_json::Value = serde_json::from_str(&alerts).unwrap();
    let newest = &alerts[0];
    assert_eq!(newest["kind"], "circuit_closed", "{alerts}");
    assert_eq!(newest["subject"], ids[0], "{alerts}");
    assert!(
        newest["message"]
            .as_str()
            .unwrap()
            .contains("reset by an operator")
    );
}

#[test]
fn demo_handles_7200_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let out = bulwark(
        &[
            "demo",
            "--endpoints",
            "7200",
            "--skus",
            "100",
            "--batch-size",
            "100",
            "--broken",
            "3",
            "--browser-endpoints",
            "0",
        ],
        &dir.path().join("d"),
    );
    assert!(out.contains("7197 done, 3 tripped"), "{out}");
}

#[test]
fn sync_reads_endpoints_from_a_config_file_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let bin = bulwark_tests::bulwark_bin();
    let run = |args: &[&str]| {
        let out = Command::new(&bin).args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let legacy = dir.path().join("legacy.db").display().to_string();
    let db = dir.path().join("b.db").display().to_string();
    assert!(run(&["generate-legacy", "--skus", "250", "--path", &legacy]).0);
    assert!(run(&["snapshot", "--db", &db, "--legacy", &legacy]).0);
    let port = bulwark_tests::free_port();
    let mut sim = Command::new(&bin)
        .args([
            "simulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--endpoints",
            "3",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    bulwark_tests::wait_for_port(port);
    let config = dir.path().join("bulwark.toml");
    let mut text = format!("database = \"{db}\"\n[sync]\nbatch_size = 100\n");
    for i in 1..=3 {
        // The third endpoint holds back a safety buffer of stock and caps it.
        let mapping = if i == 3 {
            r#", mapping = '{"qty_buffer": "20%", "max_qty": 40}'"#
        } else {
            ""
        };
        text.push_str(&format!(
            "[[endpoint]]\nid = \"ep-0000{i}\"\nadapter = \"rest\"\nsettings = {{ base_url = \"http://127.0.0.1:{port}/ep/ep-0000{i}\"{mapping} }}\n"
        ));
    }
    std::fs::write(&config, &text).unwrap();
    let cfg = config.display().to_string();
    // One endpoint first (an operator syncing the endpoint they just fixed), then the
    // rest; a scope that names nothing real is refused before anything runs.
    let (ok, out) = run(&["sync", "--config", &cfg, "--only", "zz-*"]);
    assert!(
        !ok && out.contains("--only \"zz-*\" matches no endpoint"),
        "{out}"
    );
    let (ok, out) = run(&["sync", "--config", &cfg, "--endpoint", "ep-00009"]);
    assert!(
        !ok && out.contains("--endpoint \"ep-00009\": no such endpoint"),
        "{out}"
    );
    // The snapshot's read started two hours ago: with a one-hour limit nothing is sent.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use sqlx::Connection;
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{db}"))
            .await
            .unwrap();
        sqlx::query("UPDATE snapshots SET started_at = started_at - 7200000")
            .execute(&mut c)
            .await
            .unwrap();
    });
    let (ok, out) = run(&["sync", "--config", &cfg, "--max-snapshot-age-secs", "3600"]);
    assert!(!ok, "a stale snapshot exits 1: {out}");
    assert!(
        out.contains("too old to push stock from")
            && out.contains("all 3 endpoint(s) held, nothing sent"),
        "{out}"
    );
    assert!(
        out.contains("2.0 h ago") && out.contains("max_snapshot_age is 60 min"),
        "{out}"
    );
    let (ok, out) = run(&[
        "sync",
        "--config",
        &cfg,
        "--endpoint",
        "ep-00002",
        "--max-snapshot-age-secs",
        "10800",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("1 done, 0 tripped") && out.contains("3 uploads"),
        "{out}"
    );
    let (ok, out) = run(&["sync", "--config", &cfg]);
    let shown = |ep: &str| -> Vec<i64> {
        let skus: Vec<String> = (0..250).map(|i| format!("SKU-{i:06}")).collect();
        let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
        let base = format!("http://127.0.0.1:{port}/ep/{ep}");
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(bulwark_tests::shown(&base, &skus))
            .into_values()
            .collect()
    };
    let (plain, buffered) = (shown("ep-00001"), shown("ep-00003"));
    let _ = sim.kill();
    let _ = sim.wait();
    assert!(ok, "{out}");
    assert!(
        out.contains("2 done, 0 tripped") && out.contains("6 uploads"),
        "the two others: {out}"
    );
    assert_eq!(plain.len(), 250);
    let expected: Vec<i64> = plain
        .iter()
        .map(|q| (q - (q * 20 + 99) / 100).min(40))
        .collect();
    assert_eq!(
        buffered, expected,
        "20 % held back (rounded up), at most 40"
    );
    assert!(plain.iter().zip(&buffered).any(|(p, b)| p != b));

    std::fs::write(
        &config,
        text.replace("batch_size = 100", "batch_size = 100\nbatchsize = 5"),
    )
    .unwrap();
    let (ok, out) = run(&["sync", "--config", &config.display().to_string()]);
    assert!(!ok);
    assert!(
        out.contains("bulwark.toml:4:1") && out.contains("batchsize"),
        "{out}"
    );
}

#[test]
fn demo_includes_browser_endpoints_synced_through_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let args = [
        "demo",
        "--endpoints",
        "4",
        "--skus",
        "60",
        "--batch-size",
        "30",
        "--broken",
        "0",
        "--browser-endpoints",
        "2",
    ];
    let out = bulwark(&args, &data);
    assert!(
        out.contains("2 browser endpoint(s) synced through Chromium"),
        "{out}"
    );
    assert!(out.contains("6 done, 0 tripped"), "{out}");
    let again = bulwark(&args, &data);
    assert!(again.contains("0 uploads, 0 verifies"), "{again}");
}
