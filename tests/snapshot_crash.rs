//! SIGKILL the real `bulwark snapshot` mid-way, several times, then let it finish: it
//! resumes the same snapshot from its journaled cursor and seals it with the same content
//! hash (and counts) as a snapshot taken without a crash.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn snapshot_cmd(legacy: &Path, db: &Path) -> Command {
    let mut c = Command::new(bulwark_tests::bulwark_bin());
    c.args([
        "snapshot",
        "--page-size",
        "50",
        "--pause-ms",
        "25",
        "--legacy",
    ])
    .arg(legacy)
    .arg("--db")
    .arg(db)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

fn finish(legacy: &Path, db: &Path) -> String {
    let out = snapshot_cmd(legacy, db).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn field<'a>(line: &'a str, after: &str) -> &'a str {
    line.split(after)
        .nth(1)
        .unwrap()
        .split([' ', ',', '\n'])
        .next()
        .unwrap()
}

/// The snapshot workflow's status and sequence number.
const PROGRESS: &str = "SELECT status, seq FROM workflows WHERE kind = 'snapshot'";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// (workflow status, seq) of the snapshot workflow, if one exists.
fn progress(db: &Path) -> Option<(String, i64)> {
    block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
            .await
            .ok()?;
        let row = sqlx::query_as(PROGRESS).fetch_optional(&pool).await.ok()?;
        pool.close().await;
        row
    })
}

#[test]
fn killed_snapshot_resumes_from_its_cursor_with_the_same_hash() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy.db");
    let out = Command::new(bulwark_tests::bulwark_bin())
        .args(["generate-legacy", "--skus", "3000", "--path"])
        .arg(&legacy)
        .output()
        .unwrap();
    assert!(out.status.success());

    let clean = finish(&legacy, &dir.path().join("clean.db"));

    let db = dir.path().join("crashed.db");
    let mut last_seq = 0;
    let mut kills = 0;
    for round in 0..4 {
        let mut child = snapshot_cmd(&legacy, &db).spawn().unwrap();
        // Wait until this process has journaled a few more pages, then SIGKILL it.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            std::thread::sleep(Duration::from_millis(40));
            if let Some((status, seq)) = progress(&db)
                && status == "Paging"
                && seq >= last_seq + 5 + round
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no progress");
            assert!(
                child.try_wait().unwrap().is_none(),
                "finished before the kill"
            );
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let (status, seq) = progress(&db).unwrap();
        assert_eq!(status, "Paging", "killed mid-way");
        assert!(
            seq > last_seq,
            "resumed and made progress ({seq} <= {last_seq})"
        );
        last_seq = seq;
    }
    assert_eq!(kills, 4);
    let crashed = finish(&legacy, &db);
    // Same snapshot id (resumed, not restarted), same counts, same hash.
    assert_eq!(field(&clean, "snapshot "), field(&crashed, "snapshot "));
    assert_eq!(field(&clean, "hash "), field(&crashed, "hash "));
    assert!(
        crashed.contains("3000 rows read, 3000 accepted, 0 rejected"),
        "{crashed}"
    );
    assert_eq!(field(&clean, "hash ").len(), 64);
}

/// (workflow status, seq) of the snapshot workflow in a PostgreSQL schema, if one exists.
fn pg_progress(url: &str) -> Option<(String, i64)> {
    block_on(async {
        let store = bulwark_engine::postgres::PostgresStore::open(url)
            .await
            .ok()?;
        let row = sqlx::query_as(PROGRESS)
            .fetch_optional(store.pool())
            .await
            .ok()?;
        store.close().await;
        row
    })
}

#[test]
fn a_killed_snapshot_on_postgres_is_resumed_at_once_by_the_next_start_on_its_host() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let url = bulwark_tests::pg_schema_url(&base, "snapkill");
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy.db");
    bulwark_tests::run_ok(
        bulwark_tests::bulwark()
            .args(["generate-legacy", "--skus", "3000", "--path"])
            .arg(&legacy),
    );
    let clean = finish(&legacy, &dir.path().join("clean.db"));
    let mut child =
        bulwark_tests::KillOnDrop(snapshot_cmd(&legacy, Path::new(&url)).spawn().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(40));
        if let Some((status, seq)) = pg_progress(&url)
            && status == "Paging"
            && seq >= 5
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress");
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
    }
    let pid = child.0.id();
    child.0.kill().unwrap(); // SIGKILL: its 60 s lease is still running
    child.0.wait().unwrap();
    let out = snapshot_cmd(&legacy, Path::new(&url))
        .env("BULWARK_LOG", "info")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "from worker snapshot-{pid} whose process on this host is gone"
        )),
        "{stderr}"
    );
    assert_eq!(field(&clean, "snapshot "), field(&stdout, "snapshot "));
    assert_eq!(field(&clean, "hash "), field(&stdout, "hash "), "{stdout}");
    block_on(async {
        let store = bulwark_engine::postgres::PostgresStore::open(&url)
            .await
            .unwrap();
        store.drop_schema().await.unwrap();
        store.close().await;
    });
}
