//! Several `bulwark worker` processes on one PostgreSQL database run a sync against the
//! portal simulator. One is SIGKILLed mid-run; another is SIGSTOPped for longer than its
//! lease, then SIGCONTed. Every (endpoint, batch) must be applied exactly once, nothing
//! lost, the stopped worker's late appends refused (and said so in its log), audit clean.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

const ENDPOINTS: u32 = 30;
const SKUS: u32 = 1000;
const BATCH: u32 = 100;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bulwark() -> Command {
    Command::new(bulwark_tests::bulwark_bin())
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} failed");
}

/// The line of `bulwark status` about the worker with process id `pid`.
fn worker_line(status: &str, pid: u32) -> String {
    status
        .lines()
        .find(|l| l.contains(&format!("-{pid}:")))
        .unwrap_or_else(|| panic!("worker {pid} not in status:\n{status}"))
        .to_owned()
}

#[test]
fn workers_survive_a_kill_and_a_pause_longer_than_the_lease() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "workers");
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy.db");
    let record = dir.path().join("portal.db");
    ok(bulwark()
        .args(["generate-legacy", "--skus", &SKUS.to_string(), "--path"])
        .arg(&legacy));
    ok(bulwark()
        .args(["snapshot", "--db", &db, "--legacy"])
        .arg(&legacy));

    let port = bulwark_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let _sim = Proc(
        bulwark()
            .args([
                "simulate",
                "--listen",
                &listen,
                "--endpoints",
                &ENDPOINTS.to_string(),
                "--latency-ms",
                "25",
                "--record",
            ])
            .arg(&record)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(port);
    let portal = format!("http://{listen}");
    let enq = ok(bulwark()
        .args([
            "sync",
            "--db",
            &db,
            "--portal-url",
            &portal,
            "--endpoints",
            &ENDPOINTS.to_string(),
        ])
        .args(["--batch-size", &BATCH.to_string()]));
    assert!(enq.contains("enqueued"), "{enq}");

    let logs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("worker-{i}.log")))
        .collect();
    let mut workers: Vec<Proc> = logs
        .iter()
        .map(|log| {
            Proc(
                bulwark()
                    .args([
                        "worker",
                        "--db",
                        &db,
                        "--portal-url",
                        &portal,
                        "--endpoints",
                        &ENDPOINTS.to_string(),
                    ])
                    .args([
                        "--batch-size",
                        &BATCH.to_string(),
                        "--max-in-flight",
                        "3",
                        "--capacity",
                        "10",
                    ])
                    .args(["--lease-ms", "1000", "--exit-when-idle"])
                    .env("BULWARK_LOG", "warn")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(log).unwrap())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();

    std::thread::sleep(Duration::from_millis(600));
    assert!(
        workers[0].0.try_wait().unwrap().is_none(),
        "worker 0 finished too early to be killed"
    );
    workers[0].0.kill().unwrap(); // SIGKILL
    workers[0].0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        workers[1].0.try_wait().unwrap().is_none(),
        "worker 1 finished too early to be stopped"
    );
    let status = ok(bulwark().args(["status", "--db", &db]));
    for w in &workers[1..] {
        assert!(
            worker_line(&status, w.0.id()).contains(": live;"),
            "{status}"
        );
    }
    signal(&workers[1].0, "STOP");
    // Far longer than the lease: worker 2 claims what workers 0 and 1 held.
    std::thread::sleep(Duration::from_millis(6000));
    // `bulwark status` tells the stopped worker by its heartbeats: it was live, it is not.
    let status = ok(bulwark().args(["status", "--db", &db]));
    let stopped = worker_line(&status, workers[1].0.id());
    assert!(!stopped.contains(": live;"), "{status}");
    assert!(stopped.contains("lease 1000 ms"), "{status}");
    assert!(
        stopped.contains(" s ago") && !stopped.contains("heartbeat 0."),
        "{status}"
    );
    signal(&workers[1].0, "CONT");

    let start = Instant::now();
    for (i, w) in workers.iter_mut().enumerate().skip(1) {
        loop {
            if let Some(st) = w.0.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "worker {i} failed: {}",
                    std::fs::read_to_string(&logs[i]).unwrap()
                );
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "worker {i} did not finish"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let stopped_log = std::fs::read_to_string(&logs[1]).unwrap();
    assert!(
        stopped_log.contains("lost the lease") || stopped_log.contains("lease lost"),
        "the paused worker should report refused appends / lost leases:\n{stopped_log}"
    );

    let audit = ok(bulwark().args(["audit", "--db", &db]));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let applied: Vec<(String, i64, i64)> = rt.block_on(async {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", record.display()))
            .await
            .unwrap();
        sqlx::query_as(
            "SELECT endpoint, batch_index, count(*) FROM applied GROUP BY endpoint, batch_index",
        )
        .fetch_all(&mut c)
        .await
        .unwrap()
    });
    let applied: HashMap<(String, i64), i64> =
        applied.into_iter().map(|(e, b, n)| ((e, b), n)).collect();
    for i in 1..=ENDPOINTS {
        for b in 0..i64::from(SKUS / BATCH) {
            let n = applied
                .get(&(format!("ep-{i:05}"), b))
                .copied()
                .unwrap_or(0);
            assert_eq!(n, 1, "ep-{i:05} batch {b} applied {n} times");
        }
    }
    let status = ok(bulwark().args(["status", "--db", &db]));
    assert!(status.contains(&format!("Done={ENDPOINTS}")), "{status}");
    rt.block_on(async {
        if let bulwark_engine::Backend::Postgres(pg) =
            bulwark_engine::Backend::open(&db).await.unwrap()
        {
            pg.drop_schema().await.unwrap();
        }
    });
}

/// `bulwark sync --wait` with no live worker says so after its timeout instead of waiting
/// forever; the run stays enqueued, and a worker started later finishes it.
#[test]
fn sync_wait_without_a_live_worker_gives_up_and_says_so() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "nowait");
    let dir = tempfile::tempdir().unwrap();
    bulwark_tests::legacy_snapshot(dir.path(), 50, &db);
    let sim = tokio::runtime::Runtime::new().unwrap();
    let handle = sim.block_on(async {
        bulwark_adapters::simulator::PortalSimulator::start(
            Default::default(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap()
    });
    let portal = format!("http://{}", handle.addr());
    let sync = |extra: &[&str]| {
        let mut c = bulwark();
        c.args([
            "sync",
            "--db",
            &db,
            "--portal-url",
            &portal,
            "--endpoints",
            "2",
        ])
        .args(extra);
        c
    };
    let started = Instant::now();
    let out = sync(&["--wait", "--wait-no-worker-secs", "2"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("enqueued"), "{text}");
    assert!(
        text.contains("no worker has been live for 2 s") && text.contains("bulwark worker"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "{text}");
    ok(bulwark()
        .args(["worker", "--db", &db, "--portal-url", &portal])
        .args(["--endpoints", "2", "--exit-when-idle"]));
    let status = ok(bulwark().args(["status", "--db", &db]));
    assert!(status.contains("Done=2"), "{status}");
    sim.block_on(async {
        handle.shutdown().await.unwrap();
        if let bulwark_engine::Backend::Postgres(pg) =
            bulwark_engine::Backend::open(&db).await.unwrap()
        {
            pg.drop_schema().await.unwrap();
        }
    });
}
