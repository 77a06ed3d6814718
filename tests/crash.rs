//! Crash recovery with the real binary: SIGKILL `bulwark sync` at random points (at least
//! five times), restart it each time, and check at the portal simulator's durable record
//! that every (endpoint, batch) was applied exactly once, nothing was lost, and the
//! journal audits clean.

use bulwark_tests::{KillOnDrop, bulwark, run_ok};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::Connection;

const ENDPOINTS: u32 = 40;
const SKUS: u32 = 2000;
const BATCH: u32 = 100;

#[test]
fn sigkill_at_random_points_applies_every_batch_exactly_once() {
    let dir = tempfile::Builder::new()
        .disable_cleanup(std::env::var("KEEP").is_ok())
        .tempdir()
        .unwrap();
    if std::env::var("KEEP").is_ok() {
        eprintln!("dir: {}", dir.path().display());
        std::mem::forget(tempfile::tempdir());
    }
    let legacy = dir.path().join("legacy.db");
    let db = dir.path().join("bulwark.db");
    let record = dir.path().join("portal.db");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", &SKUS.to_string(), "--path"])
            .arg(&legacy),
    );
    run_ok(
        bulwark()
            .arg("snapshot")
            .arg("--db")
            .arg(&db)
            .arg("--legacy")
            .arg(&legacy),
    );

    let port = bulwark_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    // Two broken endpoints (one stores wrong values, one rejects): they must trip, and the
    // crashes must not disturb that either.
    let _sim = KillOnDrop(
        bulwark()
            .args([
                "simulate",
                "--listen",
                &listen,
                "--endpoints",
                &ENDPOINTS.to_string(),
                "--broken",
                "2",
            ])
            // Enough work (about 2 s) that five kills, 120–450 ms into each attempt, come
            // before the sync can finish, however fast this machine is.
            .args(["--latency-ms", "8", "--record"])
            .arg(&record)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(port);
    let portal = format!("http://{listen}");
    let sync = || {
        let mut c = bulwark();
        c.arg("sync").arg("--db").arg(&db).args([
            "--portal-url",
            &portal,
            "--endpoints",
            &ENDPOINTS.to_string(),
        ]);
        c.args(["--batch-size", &BATCH.to_string(), "--max-in-flight", "6"]);
        c
    };

    let mut rng = rand::rng();
    let mut kills = 0;
    let mut attempts = 0;
    loop {
        attempts += 1;
        assert!(attempts < 60, "sync never finished");
        let mut child = sync()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if kills < 5 {
            let wait = Duration::from_millis(rng.random_range(120..450));
            let start = Instant::now();
            while start.elapsed() < wait && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                continue;
            }
        }
        let out = child.wait_with_output().unwrap();
        // The two broken endpoints trip: the run finishes with work undone, status 1.
        assert_eq!(
            out.status.code(),
            Some(1),
            "sync failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if kills >= 5 {
            break;
        }
        panic!(
            "sync finished after only {kills} kills; the workload is too small to test recovery"
        );
    }
    assert!(kills >= 5);

    // The journal folds cleanly through the transition function.
    let audit = run_ok(bulwark().arg("audit").arg("--db").arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (applied, states) = rt.block_on(async {
        let mut sim = sqlx::SqliteConnection::connect(&format!("sqlite://{}", record.display()))
            .await
            .unwrap();
        let applied: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT endpoint, batch_index, count(*) FROM applied GROUP BY endpoint, batch_index",
        )
        .fetch_all(&mut sim)
        .await
        .unwrap();
        let mut b = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let states: Vec<(String, String)> = sqlx::query_as(
            "SELECT subject, status FROM workflows WHERE kind = 'endpoint_sync' AND run_id = (SELECT min(run_id) FROM workflows WHERE kind = 'endpoint_sync')",
        )
        .fetch_all(&mut b)
        .await
        .unwrap();
        (applied, states)
    });
    let states: HashMap<String, String> = states.into_iter().collect();
    let broken: Vec<String> = bulwark_tests::broken_ids(ENDPOINTS, 2);
    let batches = SKUS.div_ceil(BATCH) as i64;
    let mut per_pair: HashMap<(String, i64), i64> = HashMap::new();
    for (ep, batch, n) in applied {
        per_pair.insert((ep, batch), n);
    }
    for i in 1..=ENDPOINTS {
        let ep = format!("ep-{i:05}");
        if broken.contains(&ep) {
            assert_eq!(
                states.get(&ep).map(String::as_str),
                Some("Tripped"),
                "{ep} should have tripped"
            );
            continue;
        }
        assert_eq!(
            states.get(&ep).map(String::as_str),
            Some("Done"),
            "{ep} should be Done"
        );
        for b in 0..batches {
            let n = per_pair.get(&(ep.clone(), b)).copied().unwrap_or(0);
            assert_eq!(
                n, 1,
                "{ep} batch {b} applied {n} times (expected exactly once)"
            );
        }
    }

    // Nothing changed since: a further sync sends nothing.
    // The broken endpoints' circuits are open: skipped, so status 1.
    let out = bulwark_tests::run_code(&mut sync(), 1);
    assert!(out.contains("0 uploads"), "{out}");
}
