//! Crash recovery of the `webdriver` adapter with the real binary and a real browser:
//! `bulwark simulate-webui` serves two manifest portals, `bulwark sync --config` drives
//! headless Chromium through them, and is SIGKILLed right after a manifest file was
//! submitted (the portal recorded the upload) but before the journal recorded the outcome.
//! Restarts must probe the upload history, find the key and never send a batch twice;
//! the portals must end up holding exactly the snapshot, and the journal must audit clean.
//!
//! The killed process's chromedriver and Chromium would outlive it, so each `sync` runs
//! in a process group of its own and the test kills that group and every descendant it
//! saw (each run starts its own chromedriver on a fresh port anyway).

use bulwark_tests::{KillOnDrop, bulwark, run_ok};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

const SKUS: u32 = 30;
const BATCH: u32 = 10;
const PORTALS: [&str; 2] = ["portal-1", "portal-2"];
const USER: &str = "bulwark-test";
const PASS: &str = "not-a-real-secret";

/// `GET http://127.0.0.1:{port}/state` from `bulwark simulate-webui --state-listen`.
fn sim_state(port: u16) -> serde_json::Value {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("state endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("state JSON")
}

/// Upload file names per portal, oldest first.
fn uploads(state: &serde_json::Value) -> HashMap<String, Vec<(String, bool)>> {
    PORTALS
        .iter()
        .map(|p| {
            let list = state["portals"][p]["uploads"]
                .as_array()
                .expect("uploads")
                .iter()
                .map(|u| {
                    (
                        u["file_name"].as_str().unwrap().to_owned(),
                        u["applied"].as_bool().unwrap(),
                    )
                })
                .collect();
            (p.to_string(), list)
        })
        .collect()
}

fn upload_count(port: u16) -> usize {
    uploads(&sim_state(port)).values().map(Vec::len).sum()
}

/// Every process as (pid, parent pid, process group), read from `/proc` in one pass.
fn process_table() -> Vec<(u32, u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After "pid (comm) ": state ppid pgrp …
        let mut f = stat.rsplit_once(')')?.1.split_whitespace();
        let (_state, ppid, pgrp) = (f.next()?, f.next()?, f.next()?);
        Some((pid, ppid.parse().ok()?, pgrp.parse().ok()?))
    })
    .collect()
}

/// Add to `set` every process in process group `pgid` and every descendant of a member.
fn collect_tree(pgid: u32, set: &mut HashSet<u32>) {
    let table = process_table();
    set.extend(table.iter().filter(|p| p.2 == pgid).map(|p| p.0));
    loop {
        let before = set.len();
        let found: Vec<u32> = table
            .iter()
            .filter(|p| set.contains(&p.1))
            .map(|p| p.0)
            .collect();
        set.extend(found);
        if set.len() == before {
            return;
        }
    }
}

/// Whether `pid` still runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

fn signal(sig: &str, pids: &HashSet<u32>) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(sig)
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
}

/// SIGKILL `child` (a process-group leader) at once — the crash point is what the test
/// is about — then its chromedriver and Chromium: everything in its process group and
/// every descendant of those, frozen first (SIGSTOP) so none can spawn more unseen.
/// Returns once none of them runs.
fn kill_tree(child: &mut Child) {
    let pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut tree = HashSet::new();
    collect_tree(pid, &mut tree);
    loop {
        signal("-STOP", &tree);
        let before = tree.len();
        collect_tree(pid, &mut tree);
        if tree.len() == before {
            break;
        }
    }
    signal("-KILL", &tree);
    let start = Instant::now();
    while tree.iter().any(|p| alive(*p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "processes of the killed sync still run: {:?}",
            tree.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("killed the sync and {} leftover process(es)", tree.len());
}

/// Latest journaled state of every endpoint workflow, by endpoint id.
fn endpoint_states(db: &Path) -> HashMap<String, serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT w.subject, j.state_json FROM workflows w \
             JOIN journal j ON j.workflow_id = w.id AND j.seq = w.seq \
             WHERE w.kind = 'endpoint_sync' ORDER BY w.run_id",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
        rows.into_iter()
            .map(|(s, j)| (s, serde_json::from_str(&j).unwrap()))
            .collect()
    })
}

/// The newest sealed snapshot: SKU → (qty, first-tier price in cents).
fn snapshot_items(db: &Path) -> HashMap<String, (i64, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT sku, qty, tiers_json FROM snapshot_items WHERE snapshot_id = \
             (SELECT max(id) FROM snapshots WHERE status = 'sealed')",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
        rows.into_iter()
            .map(|(sku, qty, tiers)| {
                let tiers: serde_json::Value = serde_json::from_str(&tiers).unwrap();
                (sku, (qty, tiers[0]["price_minor"].as_i64().unwrap()))
            })
            .collect()
    })
}

#[test]
fn sigkill_after_manifest_submit_before_journal_never_uploads_twice() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy.db");
    let db = dir.path().join("bulwark.db");
    let recipes = dir.path().join("recipes");
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
    let state_port = bulwark_tests::free_port();
    let _sim = KillOnDrop(
        bulwark()
            .args(["simulate-webui", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--portals", &PORTALS.len().to_string()])
            .args(["--username", USER, "--password", PASS])
            .args(["--state-listen", &format!("127.0.0.1:{state_port}")])
            .arg("--write-recipes")
            .arg(&recipes)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(port);
    bulwark_tests::wait_for_port(state_port);
    assert!(recipes.join("manifest.toml").exists());

    let config = dir.path().join("bulwark.toml");
    let mut toml = format!(
        "database = {db:?}\n\n[sync]\nbatch_size = {BATCH}\nmax_in_flight = 4\n",
        db = db.display().to_string()
    );
    for (i, p) in PORTALS.iter().enumerate() {
        toml.push_str(&format!(
            "\n[[endpoint]]\nid = \"wd-{n}\"\nadapter = \"webdriver\"\n\
             settings = {{ recipe = {recipe:?}, base_url = \"http://127.0.0.1:{port}/p/{p}\", \
             step_timeout_ms = \"10000\" }}\n",
            n = i + 1,
            recipe = recipes.join("manifest.toml").display().to_string(),
        ));
    }
    std::fs::write(&config, toml).unwrap();
    let sync = || {
        let mut c = bulwark();
        c.arg("sync")
            .arg("--db")
            .arg(&db)
            .arg("--config")
            .arg(&config);
        c.env("BULWARK_SIM_USER", USER)
            .env("BULWARK_SIM_PASS", PASS)
            .env("BULWARK_WEBDRIVER_POOL", "2")
            .env_remove("BULWARK_WEBDRIVER_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: chromedriver and Chromium join it.
            .process_group(0);
        c
    };

    // Kill right after the portal records a new upload, until one kill lands inside the
    // window "file submitted, outcome not journaled" (the first one nearly always does).
    let mut window_hits = 0;
    let mut kills = 0;
    while window_hits == 0 {
        assert!(kills < 5, "never killed inside the submit→journal window");
        let before = upload_count(state_port);
        let mut child = sync().spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().unwrap().is_some() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "sync exited before a new upload was seen: {}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if upload_count(state_port) > before {
                break;
            }
            assert!(Instant::now() < deadline, "no upload within 30 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        let seen = Instant::now();
        kill_tree(&mut child);
        kills += 1;
        eprintln!(
            "kill {kills}: took {:?} after the upload was seen",
            seen.elapsed()
        );

        // Did it die inside the window? Some endpoint's journal still says Uploading with
        // a key whose file the portal already holds.
        let ups = uploads(&sim_state(state_port));
        let files: HashSet<&str> = ups.values().flatten().map(|(f, _)| f.as_str()).collect();
        for (ep, state) in endpoint_states(&db) {
            eprintln!("after kill {kills}: {ep}: {state}");
            if let Some(key) = state["Uploading"]["key"].as_str()
                && files.contains(format!("bulwark-{key}.csv").as_str())
            {
                eprintln!(
                    "killed inside the window: {ep} batch key {key} submitted, not journaled"
                );
                window_hits += 1;
            }
        }
    }

    // Restart until a sync completes.
    let mut outputs = Vec::new();
    let mut restarts = 0;
    loop {
        restarts += 1;
        assert!(
            restarts <= 3,
            "sync did not complete after {restarts} restarts"
        );
        let mut child = sync().spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(40);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                kill_tree(&mut child);
                panic!("sync hung");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!(
            "restart {restarts}: {:?}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
        if out.status.success() {
            break;
        }
    }
    // The restart found the crashed batch by probing instead of sending it again.
    assert!(
        outputs
            .iter()
            .any(|o| o.contains("found already landed") && !o.contains("(0 found already landed)")),
        "no restart found a landed batch by probing: {outputs:?}"
    );

    // Every batch uploaded exactly once, and applied.
    let state = sim_state(state_port);
    let batches = SKUS.div_ceil(BATCH) as usize;
    for (portal, list) in uploads(&state) {
        let names: HashSet<&str> = list.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names.len(),
            list.len(),
            "{portal}: a key was uploaded twice: {list:?}"
        );
        assert_eq!(
            list.len(),
            batches,
            "{portal}: expected {batches} uploads: {list:?}"
        );
        assert!(list.iter().all(|(_, applied)| *applied), "{list:?}");
    }

    // The portals hold exactly the snapshot.
    let want = snapshot_items(&db);
    assert_eq!(want.len(), SKUS as usize);
    for portal in PORTALS {
        let products = state["portals"][portal]["products"]
            .as_object()
            .expect("products");
        let got: HashMap<String, (i64, i64)> = products
            .iter()
            .map(|(sku, p)| {
                (
                    sku.clone(),
                    (
                        p["qty"].as_i64().unwrap(),
                        p["price_minor"].as_i64().unwrap(),
                    ),
                )
            })
            .collect();
        assert_eq!(got, want, "{portal} differs from the snapshot");
    }

    // Every endpoint is Done, and the journal folds cleanly.
    for (ep, state) in endpoint_states(&db) {
        assert!(state.get("Done").is_some(), "{ep}: {state}");
    }
    let audit = run_ok(bulwark().arg("audit").arg("--db").arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
    eprintln!(
        "{kills} kill(s), {window_hits} inside the window, {restarts} restart(s), {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Live processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    process_table()
        .into_iter()
        .filter(|p| p.2 == pgid && alive(p.0))
        .map(|p| p.0)
        .collect()
}

#[test]
fn chromium_left_by_a_killed_sync_is_stopped_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let recipes = dir.path().join("recipes");
    // A temporary directory of its own: the group locks of this test's syncs only.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    bulwark_tests::legacy_snapshot(dir.path(), 60, &db);
    let port = bulwark_tests::free_port();
    let _sim = KillOnDrop(
        bulwark()
            .args(["simulate-webui", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--portals", "1", "--username", USER, "--password", PASS])
            .arg("--write-recipes")
            .arg(&recipes)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    bulwark_tests::wait_for_port(port);
    let config = dir.path().join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            "database = {db:?}\n[sync]\nbatch_size = 5\n\n[[endpoint]]\nid = \"wd-1\"\nadapter = \"webdriver\"\n\
             settings = {{ recipe = {recipe:?}, base_url = \"http://127.0.0.1:{port}/p/portal-1\" }}\n",
            db = db.display().to_string(),
            recipe = recipes.join("manifest.toml").display().to_string(),
        ),
    )
    .unwrap();
    let sync = || {
        let mut c = bulwark();
        c.arg("sync").arg("--config").arg(&config);
        c.env("BULWARK_SIM_USER", USER)
            .env("BULWARK_SIM_PASS", PASS)
            .env("TMPDIR", &tmp)
            .env_remove("BULWARK_WEBDRIVER_URL");
        c
    };
    let mut child = sync()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until chromedriver runs (its group lock exists) with a browser in its group.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pgid = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "sync ended before a browser started"
        );
        assert!(
            Instant::now() < deadline,
            "no chromedriver group within 60 s"
        );
        let locks: Vec<u32> = std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("bulwark-webdriver-")
            })
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .filter_map(|f| {
                f.file_name()
                    .to_string_lossy()
                    .strip_suffix(".lock")?
                    .parse()
                    .ok()
            })
            .collect();
        if let Some(&g) = locks.first()
            && group_members(g).len() >= 2
        {
            break g;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL to bulwark alone
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let left = group_members(pgid);
    assert!(
        !left.is_empty(),
        "chromedriver's group outlives the killed sync"
    );
    // The next sync finds the unlocked group and stops it, then does its work.
    let out = run_ok(&mut sync());
    assert!(out.contains("1 done"), "{out}");
    let start = Instant::now();
    while !group_members(pgid).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the leftover group {pgid} still runs: {:?}",
            group_members(pgid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And a normal exit leaves nothing behind either: no group lock, no browser.
    let leftover_locks = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_string_lossy().ends_with(".lock"))
        .count();
    assert_eq!(leftover_locks, 0, "a normal exit removes its group lock");
}
