//! SIGINT / SIGTERM to the real `bulwark sync`: the first winds the run down (the calls in
//! flight finish and are journaled, nothing new starts), prints the summary and exits
//! 130 / 143; the next sync resumes what was left and every batch lands exactly once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_tests::{KillOnDrop, bulwark, run_ok};
use sqlx::Connection;

const ENDPOINTS: u32 = 6;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Applied batches at the simulator, and how many were applied more than once.
fn applied(record: &std::path::Path) -> (i64, i64) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=ro", record.display()))
            .await
            .unwrap();
        sqlx::query_as(
            "SELECT coalesce(sum(n), 0), coalesce(sum(n > 1), 0) FROM (SELECT count(*) AS n FROM applied GROUP BY endpoint, batch_index)",
        )
        .fetch_one(&mut c)
        .await
        .unwrap()
    })
}

#[test]
fn sigint_and_sigterm_stop_a_sync_gracefully_and_the_next_one_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let record = dir.path().join("portal.db");
    bulwark_tests::legacy_snapshot(dir.path(), 600, &db);
    let port = bulwark_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _sim = KillOnDrop(
        bulwark()
            .args([
                "simulate",
                "--listen",
                &listen,
                "--endpoints",
                &ENDPOINTS.to_string(),
            ])
            .args(["--latency-ms", "100", "--record"])
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
            "--batch-size",
            "50",
            "--max-in-flight",
            "2",
        ]);
        c
    };
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let before = applied(&record).0;
        let child = sync()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Once writes are landing, signal.
        let start = Instant::now();
        while applied(&record).0 == before {
            assert!(start.elapsed() < Duration::from_secs(30), "no write landed");
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(pid, sig);
        let signalled = Instant::now();
        let out = child.wait_with_output().unwrap();
        let stopped_in = signalled.elapsed();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(
            out.status.code(),
            Some(code),
            "SIG{sig}: {stdout}\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("SIG{sig}: stopping the sync")),
            "{stderr}"
        );
        assert!(
            stdout.contains("uploads"),
            "the summary is printed: {stdout}"
        );
        // Calls in flight finish (100 ms each), nothing new starts: well under the run.
        assert!(
            stopped_in < Duration::from_secs(10),
            "stopped in {stopped_in:?}"
        );
        let (_, dupes) = applied(&record);
        assert_eq!(dupes, 0, "no batch written twice");
    }
    // The next sync resumes and finishes; every batch landed exactly once.
    let out = run_ok(&mut sync());
    assert!(out.contains("resumed and finished run(s)"), "{out}");
    // (The simulator records asynchronously: give it a moment.)
    let want = i64::from(ENDPOINTS) * 12;
    let start = Instant::now();
    while applied(&record).0 < want && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (writes, dupes) = applied(&record);
    assert_eq!(dupes, 0);
    // 600 SKUs in batches of 50 per endpoint.
    assert_eq!(writes, want, "every batch once");
    let audit = run_ok(bulwark().arg("audit").arg("--db").arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
}
