//! `bulwark bench --workload w4`: the pause test of effect fencing (WORKLOADS.md, W4).
//!
//! Each round, on a fresh PostgreSQL schema: a demo legacy database and its snapshot, a
//! portal simulator **without idempotency support** (`simulate --no-idempotency`, which
//! applies every write and records it with the snapshot it carries and when it arrived),
//! three `bulwark worker` processes with a short lease and fewer in-flight slots than
//! workflows (so tasks queue behind the limiter). Mid-run, the worker holding the most
//! leases is stopped (SIGSTOP) or killed (SIGKILL). The other two finish the run, then a
//! newer snapshot (a third of the quantities changed) is taken and synced. Only then is the stopped
//! worker resumed (SIGCONT) and given twice its lease to do whatever it still would.
//!
//! Measured, per round and in total:
//! * writes the portal received after the resume: every run is finished by then and the
//!   other workers are idle, so each of them came from the resumed worker, long past its
//!   lease deadline (goal 0);
//! * items any endpoint shows at a value other than the newest snapshot's (goal 0);
//! * takeover time: from the signal to the first journal append by another worker on a
//!   workflow the stopped one held (goal: about the lease, plus the claim poll);
//! * "deadlock detected" lines in the workers' logs, and each worker's share of the steps.
//!
//! A round with a write after the resume, a stale item or an audit finding fails the
//! benchmark (exit 1) after every round has printed its figures.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bulwark_engine::now_ms;
use sqlx::Connection;
use tokio::process::{Child, Command};

/// Options of W4.
#[derive(Debug, Clone)]
pub(crate) struct PauseArgs {
    pub db: String,
    pub runs: u32,
    pub endpoints: u32,
    pub skus: u32,
    pub batch_size: u32,
    pub lease_ms: i64,
    pub signals: Vec<String>,
}

struct Round {
    signal: String,
    writes_total: i64,
    writes_after_resume: i64,
    stale_items: usize,
    takeover_ms: Option<i64>,
    held_at_signal: usize,
    deadlocks: usize,
    db_deadlocks: i64,
    shares: Vec<(String, i64)>,
    audit_clean: bool,
}

pub(crate) async fn run(args: PauseArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    println!("workload: W4 pause test (effect fencing)");
    println!(
        "endpoints: {}  skus: {}  batch_size: {}  workers: 3  lease: {} ms  max_in_flight: 2 per worker  portal: no idempotency keys",
        args.endpoints, args.skus, args.batch_size, args.lease_ms
    );
    let mut rounds = Vec::new();
    for i in 0..args.runs {
        for signal in &args.signals {
            let r = round(&exe, &args, i, signal)
                .await
                .with_context(|| format!("W4 round {i} ({signal})"))?;
            println!(
                "round {i} {}: writes {} (after resume {}), stale items {}, held at signal {}, takeover {}, deadlocks {} ({} counted by the database), audit {}, shares {}",
                r.signal,
                r.writes_total,
                r.writes_after_resume,
                r.stale_items,
                r.held_at_signal,
                r.takeover_ms
                    .map_or("n/a".to_owned(), |ms| format!("{ms} ms")),
                r.deadlocks,
                r.db_deadlocks,
                if r.audit_clean { "clean" } else { "FINDINGS" },
                r.shares
                    .iter()
                    .map(|(w, n)| format!("{w}={n}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            rounds.push(r);
        }
    }
    let after: i64 = rounds.iter().map(|r| r.writes_after_resume).sum();
    let stale: usize = rounds.iter().map(|r| r.stale_items).sum();
    let deadlocks: usize = rounds.iter().map(|r| r.deadlocks).sum();
    println!("rounds: {} rounds", rounds.len());
    println!("writes_after_lease_deadline: {after} writes");
    println!("stale_items: {stale} items");
    println!("deadlocks: {deadlocks} lines");
    println!(
        "deadlocks_detected_by_database: {} deadlocks",
        rounds.iter().map(|r| r.db_deadlocks).sum::<i64>()
    );
    for signal in &args.signals {
        let mut t: Vec<i64> = rounds
            .iter()
            .filter(|r| &r.signal == signal)
            .filter_map(|r| r.takeover_ms)
            .collect();
        t.sort_unstable();
        if let Some(m) = t.get(t.len() / 2) {
            println!("takeover_median_{}: {m} ms", signal.to_lowercase());
        }
        if let Some(m) = t.last() {
            println!("takeover_max_{}: {m} ms", signal.to_lowercase());
        }
    }
    let unclean = rounds.iter().filter(|r| !r.audit_clean).count();
    ensure!(
        after == 0 && stale == 0 && unclean == 0,
        "effect fencing failed: {after} write(s) after a lease deadline, {stale} stale item(s), {unclean} round(s) with audit findings"
    );
    Ok(())
}

struct Kids(Vec<Child>);
impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            if let Some(pid) = c.id() {
                // A stopped child ignores SIGKILL's siblings; SIGKILL itself always works.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            let _ = c.start_kill();
        }
    }
}

async fn ok(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("{cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed: {text}");
    Ok(text)
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    ensure!(st.success(), "kill -{sig} {pid} failed");
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        ensure!(Instant::now() < until, "simulator did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let until = Instant::now() + limit;
    while !done().await? {
        ensure!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn round(exe: &Path, args: &PauseArgs, i: u32, sig: &str) -> Result<Round> {
    let dir = std::env::temp_dir().join(format!(
        "bulwark-w4-{}-{i}-{}",
        std::process::id(),
        sig.to_lowercase()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let schema = format!(
        "bulwark_w4_{}_{i}_{}",
        std::process::id(),
        sig.to_lowercase()
    );
    let db = crate::bench::schema_url(&args.db, &schema);
    let legacy = dir.join("legacy.db");
    let record = dir.join("portal.db");
    let bulwark = || {
        let mut c = Command::new(exe);
        c.env_remove("BULWARK_DB").kill_on_drop(true);
        c
    };
    ok(bulwark()
        .args([
            "generate-legacy",
            "--skus",
            &args.skus.to_string(),
            "--path",
        ])
        .arg(&legacy))
    .await?;
    ok(bulwark()
        .args(["snapshot", "--db", &db, "--legacy"])
        .arg(&legacy))
    .await?;

    let port = free_port()?;
    let portal = format!("http://127.0.0.1:{port}");
    let endpoints = args.endpoints.to_string();
    let batch = args.batch_size.to_string();
    let mut kids = Kids(Vec::new());
    kids.0.push(
        bulwark()
            .args(["simulate", "--no-idempotency", "--latency-ms", "20"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--endpoints", &endpoints, "--record"])
            .arg(&record)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_for_port(port).await?;
    let sync = || {
        let mut c = bulwark();
        c.args(["sync", "--db", &db, "--portal-url", &portal])
            .args(["--endpoints", &endpoints, "--batch-size", &batch]);
        c
    };
    let out = ok(&mut sync()).await?;
    ensure!(out.contains("enqueued"), "sync did not enqueue: {out}");

    let logs: Vec<PathBuf> = (0..3)
        .map(|w| dir.join(format!("worker-{w}.log")))
        .collect();
    let mut pids = Vec::new();
    for log in &logs {
        let child = bulwark()
            .args(["worker", "--db", &db, "--portal-url", &portal])
            .args(["--endpoints", &endpoints, "--batch-size", &batch])
            .args(["--max-in-flight", "2", "--capacity", "20"])
            .args(["--lease-ms", &args.lease_ms.to_string()])
            .env("BULWARK_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        pids.push(child.id().ok_or_else(|| anyhow!("worker exited at once"))?);
        kids.0.push(child);
    }

    let backend = bulwark_engine::Backend::open(&db).await?;
    let bulwark_engine::Backend::Postgres(pg) = &backend else {
        bail!("W4 needs PostgreSQL");
    };
    let pool = pg.pool().clone();
    let deadlocks_before = crate::bench::pg_deadlocks(&pool).await?;
    // Mid-run: a quarter of the steps journaled.
    let batches_per_endpoint = i64::from(args.skus.div_ceil(args.batch_size.max(1)));
    let quarter = i64::from(args.endpoints) * batches_per_endpoint / 2;
    wait_until(
        "a quarter of the run",
        Duration::from_secs(120),
        async || {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM journal")
                .fetch_one(&pool)
                .await?;
            Ok(n >= quarter)
        },
    )
    .await?;
    let (owner, held): (String, i64) = sqlx::query_as(
        "SELECT lease_owner, count(*) FROM workflows WHERE NOT terminal AND lease_owner IS NOT NULL
         GROUP BY lease_owner ORDER BY count(*) DESC, lease_owner LIMIT 1",
    )
    .fetch_optional(&pool)
    .await?
    .ok_or_else(|| anyhow!("no worker holds a lease a quarter into the run"))?;
    let victim_pid: u32 = owner
        .rsplit('-')
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|p| pids.contains(p))
        .ok_or_else(|| anyhow!("lease owner {owner:?} is none of the workers {pids:?}"))?;
    let held_ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM workflows WHERE NOT terminal AND lease_owner = $1")
            .bind(&owner)
            .fetch_all(&pool)
            .await?;
    let signal_ms = now_ms();
    signal(victim_pid, sig)?;

    let runs_open = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE kind = 'sync' AND status = 'running'",
        )
        .fetch_one(&pool)
        .await?;
        Ok::<_, anyhow::Error>(n)
    };
    let limit = Duration::from_secs(180);
    let open_workflows = async || -> String {
        let rows: Vec<(i64, String, Option<String>, Option<i64>)> = sqlx::query_as(
            "SELECT id, status, lease_owner, lease_until FROM workflows WHERE NOT terminal ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        let now = now_ms();
        rows.iter()
            .map(|(id, st, owner, until)| {
                format!(
                    "workflow {id} {st} held by {} (lease {})",
                    owner.as_deref().unwrap_or("nobody"),
                    until.map_or("none".into(), |u| format!("{} ms from now", u - now))
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if let Err(e) = wait_until("the first run to finish", limit, async || {
        Ok(runs_open().await? == 0)
    })
    .await
    {
        bail!("{e}: {} (victim {owner})", open_workflows().await);
    }
    // A newer snapshot in which a third of the quantities changed (every batch has some;
    // under the held-snapshot threshold), synced by the two others.
    {
        let mut c =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", legacy.display())).await?;
        sqlx::query("UPDATE products SET qty = qty + 1 WHERE rowid % 3 = 0")
            .execute(&mut c)
            .await?;
    }
    let snap = ok(bulwark()
        .args(["snapshot", "--db", &db, "--legacy"])
        .arg(&legacy))
    .await?;
    let out = ok(&mut sync()).await?;
    ensure!(
        out.contains("enqueued"),
        "second sync did not enqueue: {out}\n(snapshot: {snap})"
    );
    if let Err(e) = wait_until("the second run to finish", limit, async || {
        Ok(runs_open().await? == 0)
    })
    .await
    {
        bail!("{e}: {} (victim {owner})", open_workflows().await);
    }

    let resume_ms = now_ms();
    if sig == "STOP" {
        signal(victim_pid, "CONT")?;
        // Time to do whatever it would still do: its tasks wake, its heartbeat runs.
        tokio::time::sleep(Duration::from_millis((2 * args.lease_ms).max(1000) as u64)).await;
    }
    for pid in &pids {
        if !(sig == "KILL" && *pid == victim_pid) {
            let _ = signal(*pid, "TERM");
        }
    }
    for c in kids.0.iter_mut().skip(1) {
        let _ = tokio::time::timeout(Duration::from_secs(20), c.wait()).await;
    }

    // The portal's record.
    let mut rec =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", record.display())).await?;
    let writes_total: i64 = sqlx::query_scalar("SELECT count(*) FROM writes")
        .fetch_one(&mut rec)
        .await?;
    let writes_after_resume: i64 =
        sqlx::query_scalar("SELECT count(*) FROM writes WHERE at_ms >= ?")
            .bind(resume_ms)
            .fetch_one(&mut rec)
            .await?;
    drop(rec);
    // What every endpoint shows against the newest snapshot.
    let expected: Vec<(String, i64)> = {
        let mut c =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", legacy.display())).await?;
        sqlx::query_as("SELECT sku, qty FROM products ORDER BY sku")
            .fetch_all(&mut c)
            .await?
    };
    let client = bulwark_adapters::rest::RestAdapter::shared_client();
    let skus: Vec<&str> = expected.iter().map(|(s, _)| s.as_str()).collect();
    let mut stale_items = 0usize;
    for e in 1..=args.endpoints {
        let body: serde_json::Value = client
            .post(format!("{portal}/ep/ep-{e:05}/items/query"))
            .json(&serde_json::json!({ "skus": skus }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let shown: std::collections::HashMap<&str, i64> = body["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| Some((i["sku"].as_str()?, i["qty"].as_i64()?)))
            .collect();
        stale_items += expected
            .iter()
            .filter(|(sku, qty)| shown.get(sku.as_str()) != Some(qty))
            .count();
    }
    let takeover_ms: Option<i64> = sqlx::query_scalar(
        "SELECT min(at) FROM journal WHERE workflow_id = ANY($1) AND at > $2 AND worker <> $3",
    )
    .bind(&held_ids)
    .bind(signal_ms)
    .bind(&owner)
    .fetch_one(&pool)
    .await?;
    let shares: Vec<(String, i64)> =
        sqlx::query_as("SELECT worker, count(*) FROM journal GROUP BY worker ORDER BY worker")
            .fetch_all(&pool)
            .await?;
    let audit = bulwark().args(["audit", "--db", &db]).output().await?;
    let audit_text = String::from_utf8_lossy(&audit.stdout).into_owned();
    let audit_clean = audit.status.success() && audit_text.contains(": 0 finding(s)");
    if !audit_clean {
        eprintln!("audit of round {i} ({sig}):\n{audit_text}");
    }
    let db_deadlocks = crate::bench::pg_deadlocks(&pool).await? - deadlocks_before;
    let mut deadlocks = 0;
    for log in &logs {
        deadlocks += std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("deadlock detected")
            .count();
    }
    let shares = shares
        .into_iter()
        .map(|(w, n)| {
            let tag = if w == owner { "*" } else { "" };
            (format!("{w}{tag}"), n)
        })
        .collect();
    pg.drop_schema().await?;
    drop(backend);
    drop(kids);
    if writes_after_resume == 0 && stale_items == 0 && audit_clean {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("round {i} ({sig}) kept its logs in {}", dir.display());
    }
    Ok(Round {
        signal: sig.to_owned(),
        writes_total,
        writes_after_resume,
        stale_items,
        takeover_ms: takeover_ms.map(|at| at - signal_ms),
        held_at_signal: usize::try_from(held).unwrap_or(0),
        deadlocks,
        db_deadlocks,
        shares,
        audit_clean,
    })
}
