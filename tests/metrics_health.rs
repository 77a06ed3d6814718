//! `bulwark serve`'s `/metrics` read by a real OpenMetrics parser, against what the
//! database holds (every endpoint's circuit counted, closed ones too), `/healthz` and
//! `/readyz` (which needs no token, and says when a configured schedule is overdue), and
//! the token rules (a short token is refused at start).

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_engine::Backend;
use bulwark_tests::{KillOnDrop, bulwark, parse_openmetrics, run_code};

const TOKEN: &str = "a-token-of-some-length-0123";

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = bulwark_adapters::rest::RestAdapter::shared_client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_metrics_parse_and_agree_with_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    bulwark_tests::legacy_snapshot(dir.path(), 30, &db);
    let sim = simulator::start(
        SimConfig {
            profiles: [("ep-00004".to_string(), Fault::Corrupt)].into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());
    run_code(
        bulwark()
            .args(["sync", "--endpoints", "6", "--portal-url", &portal, "--db"])
            .arg(&db),
        1,
    );
    // A configuration whose sync schedule (every minute) last fired an hour ago: no worker
    // is running it.
    let cfg = dir.path().join("bulwark.toml");
    std::fs::write(
        &cfg,
        format!(
            "database = {:?}\n[schedule]\nsync = \"* * * * *\"\n",
            db.display().to_string()
        ),
    )
    .unwrap();

    // A token shorter than 16 characters is refused before anything listens.
    let short = bulwark()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .env("BULWARK_SERVE_TOKEN", "s3cr3t-x")
        .output()
        .unwrap();
    assert_eq!(short.status.code(), Some(3));
    let err = String::from_utf8_lossy(&short.stderr);
    assert!(err.contains("too short"), "{err}");
    assert!(
        !err.contains("s3cr3t-x"),
        "the token is never printed: {err}"
    );

    let port = bulwark_tests::free_port();
    let _serve = KillOnDrop(
        bulwark()
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(&cfg)
            .env("BULWARK_SERVE_TOKEN", TOKEN)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(port);
    let base = format!("http://127.0.0.1:{port}");

    // The token guards the metrics, not the health probes.
    assert_eq!(get(&format!("{base}/metrics"), None).await.0, 401);
    assert_eq!(
        get(
            &format!("{base}/metrics"),
            Some("a-wrong-token-of-some-length")
        )
        .await
        .0,
        401
    );
    assert_eq!(
        get(&format!("{base}/healthz"), None).await,
        (200, "ok\n".into())
    );
    // The sync schedule has never fired on this database: nothing is overdue yet.
    assert_eq!(
        get(&format!("{base}/readyz"), None).await,
        (200, "ready\n".into())
    );

    let (status, text) = get(&format!("{base}/metrics"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    let m = parse_openmetrics(&text);
    assert_eq!(m["bulwark_build_info{version=\"0.1.0\"}"], 1.0, "{text}");
    // Six endpoints: five closed circuits (never failed) and one open.
    assert_eq!(m["bulwark_circuits{state=\"closed\"}"], 5.0, "{text}");
    assert_eq!(m["bulwark_circuits{state=\"open\"}"], 1.0, "{text}");
    assert_eq!(m["bulwark_circuits{state=\"half_open\"}"], 0.0, "{text}");
    assert_eq!(m["bulwark_endpoint_syncs_done"], 5.0, "{text}");
    assert_eq!(
        m["bulwark_workflows{kind=\"endpoint_sync\",state=\"Tripped\"}"], 1.0,
        "{text}"
    );
    assert_eq!(
        m["bulwark_alerts_total{kind=\"circuit_opened\"}"], 1.0,
        "{text}"
    );
    assert_eq!(m["bulwark_quarantined_items"], 0.0, "{text}");
    assert_eq!(m["bulwark_legacy_rows_read_total"], 30.0, "{text}");
    let backend = Backend::open(&db.display().to_string()).await.unwrap();
    let store = backend.store();
    assert_eq!(
        m["bulwark_transitions_total"],
        store.journal_len().await.unwrap() as f64
    );
    let sealed = m["bulwark_last_snapshot_sealed_timestamp_seconds"];
    let now = bulwark_engine::now_ms() as f64 / 1000.0;
    assert!(sealed <= now && sealed > now - 300.0, "{sealed} vs {now}");
    assert!(m["bulwark_last_run_finished_timestamp_seconds{kind=\"sync\"}"] >= sealed);
    // The worker's own figures are not here: one meaning per name.
    assert!(!text.contains("bulwark_effects_in_flight"), "{text}");

    // The schedule last fired an hour ago and ticks every minute: overdue.
    let hour_ago = bulwark_engine::now_ms() - 3_600_000;
    assert!(
        store
            .advance_schedule("sync", None, hour_ago)
            .await
            .unwrap()
    );
    let (status, body) = get(&format!("{base}/readyz"), None).await;
    assert_eq!(
        (status, body.trim()),
        (503, "not ready: schedule(s) overdue: sync")
    );
    let m = parse_openmetrics(&get(&format!("{base}/metrics"), Some(TOKEN)).await.1);
    let fired = m["bulwark_schedule_last_fired_timestamp_seconds{schedule=\"sync\"}"];
    assert!((fired - hour_ago as f64 / 1000.0).abs() < 0.01, "{fired}");
    backend.close().await;
    sim.shutdown().await.unwrap();
}
