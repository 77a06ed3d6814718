//! `bulwark serve` in real headless Chromium (Debian's chromium + chromedriver): the page
//! shows the runs, endpoints, circuits and snapshots the database holds, one endpoint's
//! journal timeline, a run in progress updating live, and a screenshot is taken.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_engine::{Backend, Store};
use bulwark_tests::{KillOnDrop, bulwark, free_port, run_ok, wait_for_port};
use thirtyfour::prelude::*;

fn spawn(cmd: &mut std::process::Command) -> KillOnDrop {
    KillOnDrop(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

async fn browser(port: u16) -> WebDriver {
    let mut caps = DesiredCapabilities::chrome();
    for a in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        "--window-size=1366,1000",
    ] {
        caps.add_arg(a).unwrap();
    }
    caps.set_binary("/usr/bin/chromium").unwrap();
    bulwark_adapters::transport::install_crypto_provider();
    WebDriver::new(format!("http://127.0.0.1:{port}"), caps)
        .await
        .expect("a Chromium session")
}

/// Poll `f` until it returns Some (at most `secs`).
async fn eventually<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text(driver: &WebDriver, css: &str) -> Option<String> {
    driver.find(By::Css(css)).await.ok()?.text().await.ok()
}

/// What the page shows for `run` matches the database.
async fn run_matches(driver: &WebDriver, store: &dyn Store, run: i64) -> bool {
    let counts = store.status_counts(Some(run)).await.unwrap();
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    let finished: i64 = counts
        .iter()
        .filter(|(s, _)| {
            matches!(
                s.as_str(),
                "Done" | "Tripped" | "Skipped" | "Cancelled" | "Sealed" | "Aborted"
            )
        })
        .map(|(_, n)| n)
        .sum();
    if text(driver, &format!(".progress[data-run='{run}']")).await
        != Some(format!("{finished}/{total}"))
    {
        return false;
    }
    for (state, n) in counts {
        let css = format!("span[data-run='{run}'][data-state='{state}']");
        if text(driver, &css).await != Some(format!("{state}={n}")) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_database_and_updates_live() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    run_ok(
        bulwark()
            .args([
                "demo",
                "--endpoints",
                "30",
                "--skus",
                "300",
                "--broken",
                "2",
                "--browser-endpoints",
                "0",
                "--data-dir",
            ])
            .arg(&data),
    );
    let db = data.join("bulwark.db");
    let backend = Backend::open(&db.display().to_string()).await.unwrap();
    let store = backend.store();

    let web = free_port();
    let _serve = spawn(
        bulwark()
            .args(["serve", "--listen", &format!("127.0.0.1:{web}"), "--db"])
            .arg(&db),
    );
    let cd = free_port();
    let _chromedriver =
        spawn(std::process::Command::new("/usr/bin/chromedriver").arg(format!("--port={cd}")));
    wait_for_port(web);
    wait_for_port(cd);
    let driver = browser(cd).await;
    driver
        .goto(format!("http://127.0.0.1:{web}/"))
        .await
        .unwrap();

    // Every run's progress and per-state counts match the database.
    let runs = store.runs().await.unwrap();
    assert!(runs.len() >= 2, "{runs:?}");
    for r in &runs {
        eventually(
            &format!("run {} as in the database", r.id),
            20,
            async || {
                run_matches(&driver, store.as_ref(), r.id)
                    .await
                    .then_some(())
            },
        )
        .await;
    }
    // The snapshot's legacy queries and rows.
    let snap = backend_snapshot(&db).await;
    assert_eq!(
        text(
            &driver,
            &format!("tr[data-snapshot='{}'] td.queries", snap.0)
        )
        .await,
        Some(snap.1.to_string())
    );
    assert_eq!(
        text(
            &driver,
            &format!("tr[data-snapshot='{}'] td.rows-read", snap.0)
        )
        .await,
        Some(snap.2.to_string())
    );
    // Two open circuits, listed.
    let circuits = driver
        .find_all(By::Css("#circuits tbody tr"))
        .await
        .unwrap();
    assert_eq!(circuits.len(), 2);
    // Filter the endpoints by state: the two tripped ones; pick one, see its timeline.
    let select = driver.find(By::Css("#state")).await.unwrap();
    thirtyfour::components::SelectElement::new(&select)
        .await
        .unwrap()
        .select_by_visible_text("Tripped")
        .await
        .unwrap();
    let shown = eventually("the tripped filter", 10, async || {
        text(&driver, "#endpoint-count")
            .await
            .filter(|t| t == "2 shown")
    })
    .await;
    assert_eq!(shown, "2 shown");
    let row = driver
        .find(By::Css("#endpoints tbody tr.pick"))
        .await
        .unwrap();
    let endpoint = row.attr("data-endpoint").await.unwrap().unwrap();
    row.click().await.unwrap();
    let wf = store
        .workflows(None, Some("endpoint_sync"))
        .await
        .unwrap()
        .into_iter()
        .rfind(|w| w.subject == endpoint)
        .unwrap();
    let journal = store.journal(wf.id).await.unwrap();
    eventually("the endpoint's timeline", 10, async || {
        let n = driver
            .find_all(By::Css("#timeline tbody tr"))
            .await
            .ok()?
            .len();
        (n == journal.len()).then_some(())
    })
    .await;
    assert!(
        text(&driver, "#endpoint-circuit")
            .await
            .unwrap()
            .contains("open")
    );
    let search = driver.find(By::Css("#q")).await.unwrap();
    search.send_keys(&endpoint).await.unwrap();
    eventually("the search", 10, async || {
        text(&driver, "#endpoint-count")
            .await
            .filter(|t| t == "1 shown")
    })
    .await;

    // A run in progress: 30 new endpoints on a slow portal. The page follows it live.
    let sim = simulator::start(
        SimConfig {
            // Slow enough that the page (polling every second) sees several
            // steps: 32 jobs, 2 at a time, two 300 ms requests each ≈ 10 s.
            latency_ms: 300,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let _sync = spawn(
        bulwark()
            .args([
                "sync",
                "--endpoints",
                "60",
                "--batch-size",
                "100",
                "--max-in-flight",
                "2",
                "--portal-url",
                &format!("http://{}", sim.addr()),
                "--db",
            ])
            .arg(&db),
    );
    let run = eventually("the new run", 20, async || {
        store
            .runs()
            .await
            .ok()?
            .into_iter()
            .find(|r| r.kind == "sync" && r.status == "running")
            .map(|r| r.id)
    })
    .await;
    let mut seen = std::collections::BTreeSet::new();
    let last = eventually("the run to finish on the page", 60, async || {
        let shown = text(&driver, &format!(".progress[data-run='{run}']")).await?;
        seen.insert(shown.clone());
        let (done, total) = shown.split_once('/')?;
        (done == total && total != "0").then_some(shown)
    })
    .await;
    assert!(seen.len() >= 3, "the progress moved on the page: {seen:?}");
    assert!(
        run_matches(&driver, store.as_ref(), run).await || {
            // The page polls every second; give it one more refresh.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            run_matches(&driver, store.as_ref(), run).await
        }
    );
    eprintln!("live progress seen: {seen:?} → {last}");
    let png = driver.screenshot_as_png().await.unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&shot, &png).unwrap();
    eprintln!("screenshot: {}", shot.display());
    driver.quit().await.unwrap();
    sim.shutdown().await.unwrap();
    backend.close().await;
}

/// (id, queries, rows read) of the newest snapshot, read from the database directly.
async fn backend_snapshot(db: &Path) -> (i64, i64, i64) {
    let app = bulwark_workflows::app::Bulwark::open(db, Default::default())
        .await
        .unwrap();
    let s = app
        .staging()
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    app.close().await;
    (s.id, s.queries, s.rows_read)
}
