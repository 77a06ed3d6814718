//! Throughput of the browser path: endpoints per minute through the webdriver adapter
//! (login + manifest upload + read-back verify per endpoint, each endpoint its own portal)
//! with pool sizes 1, 2 and 4, and the memory (PSS) per browser session.
//!
//! Ignored by default (it is a measurement, not a check):
//! `cargo test --release -p bulwark-adapters --test webdriver_bench -- --ignored --nocapture`

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bulwark_adapters::sim_webui::{self, MANIFEST_RECIPE, WebPortal};
use bulwark_adapters::webdriver::{self, MapSecrets, PoolConfig, WebDriverPool};
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig, Verification};
use bulwark_workflows::catalog::{Batch, Item, PriceTier, batch_key, payload_hash};

const ENDPOINTS: usize = 12;
const ITEMS: usize = 10;

/// Proportional set size (KiB) of every Chromium process on the machine.
fn chromium_pss_kib() -> (u64, usize) {
    let mut total = 0;
    let mut procs = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if !exe.to_string_lossy().contains("chromium") {
            continue;
        }
        let Ok(rollup) = std::fs::read_to_string(e.path().join("smaps_rollup")) else {
            continue;
        };
        procs += 1;
        for line in rollup.lines() {
            if let Some(v) = line.strip_prefix("Pss:") {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    (total, procs)
}

fn batch(endpoint: &str) -> Batch {
    let items: Vec<Item> = (0..ITEMS)
        .map(|i| Item {
            sku: format!("S-{i:04}"),
            qty: i as i64 + 1,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 500 + i as i64,
            }],
        })
        .collect();
    Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: endpoint.into(),
        snapshot: 1,
        index: 0,
        key: batch_key(endpoint, 1, 0, &payload_hash(&items), 0),
        items,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn browser_path_endpoints_per_minute() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("manifest.toml");
    std::fs::write(&recipe, MANIFEST_RECIPE).unwrap();
    let secrets = Arc::new(MapSecrets(HashMap::from([
        ("BULWARK_SIM_USER".to_owned(), "bench".to_owned()),
        ("BULWARK_SIM_PASS".to_owned(), "bench-pass".to_owned()),
    ])));
    let baseline = chromium_pss_kib().0;
    for size in [1usize, 2, 4] {
        let portals: Vec<WebPortal> = (0..ENDPOINTS)
            .map(|i| WebPortal::new(&format!("b{i}"), "bench", "bench-pass"))
            .collect();
        let sim = sim_webui::start(portals, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let mut config = PoolConfig::from_env();
        config.size = size;
        let pool = WebDriverPool::new(config);
        let mut registry = AdapterRegistry::new();
        registry.register(
            "webdriver",
            webdriver::factory(pool.clone(), secrets.clone()),
        );
        // Warm up: start the browsers (session start is ~1 s and paid once per session).
        let warm: Vec<_> = (0..size)
            .map(|i| {
                let a = registry
                    .build(&endpoint(i, &sim, &recipe, dir.path()))
                    .unwrap();
                async move { a.probe("warm", uuid::Uuid::nil()).await.unwrap() }
            })
            .collect();
        futures::future::join_all(warm).await;
        let started = Instant::now();
        let runs: Vec<_> = (0..ENDPOINTS)
            .map(|i| {
                let a = registry
                    .build(&endpoint(i, &sim, &recipe, dir.path()))
                    .unwrap();
                async move {
                    let b = batch(&format!("b{i}"));
                    let r = a.upload(&b).await.unwrap();
                    assert_eq!(a.verify(&b, &r).await.unwrap(), Verification::Verified);
                }
            })
            .collect();
        futures::future::join_all(runs).await;
        let secs = started.elapsed().as_secs_f64();
        // Measured after the run, with every session still open (pages loaded).
        let (pss, procs) = chromium_pss_kib();
        let sessions = pool
            .stats()
            .started
            .load(std::sync::atomic::Ordering::Relaxed);
        println!(
            "pool {size}: {ENDPOINTS} endpoints ({ITEMS} items each, login+upload+verify) in {secs:.1} s = {:.0} endpoints/min; \
             {sessions} browser session(s), {procs} chromium processes, {:.0} MiB PSS = {:.0} MiB per session",
            ENDPOINTS as f64 * 60.0 / secs,
            (pss.saturating_sub(baseline)) as f64 / 1024.0,
            (pss.saturating_sub(baseline)) as f64 / 1024.0 / sessions.max(1) as f64,
        );
        pool.shutdown().await;
        sim.stop();
    }
}

fn endpoint(
    i: usize,
    sim: &sim_webui::WebSimHandle,
    recipe: &std::path::Path,
    dir: &std::path::Path,
) -> EndpointConfig {
    EndpointConfig {
        policy: None,
        id: format!("b{i}"),
        adapter: "webdriver".into(),
        settings: HashMap::from([
            ("recipe".to_owned(), recipe.display().to_string()),
            ("base_url".to_owned(), sim.base_url(&format!("b{i}"))),
            (
                "artifacts_dir".to_owned(),
                dir.join("artifacts").display().to_string(),
            ),
        ]),
    }
}
