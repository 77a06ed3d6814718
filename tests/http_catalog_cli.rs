//! The `http` adapter's catalog shape (a listing without a SKU filter; stock and prices
//! as separate resources with three ids; `examples/profiles/catalog.toml`) through the
//! real binary: `bulwark sync --config` is killed with SIGKILL in the middle of its first
//! sync and started again until done; every write request lands exactly once; a second
//! sync sends nothing; a 1 % change sends only the changed items.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_adapters::sim_api::{self, ApiSimConfig, ApiSimHandle};
use bulwark_tests::{KillOnDrop, bulwark, run_ok};
use bulwark_workflows::adapter::AdapterRegistry;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Item, PriceTier};

const ENDPOINTS: usize = 3;
const SKUS: u32 = 300;
const KEY_VAR: &str = "BULWARK_TEST_CATALOG_KEY";

fn items(n: u32, bump: i64) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            sku: format!("C-{i:05}"),
            qty: i64::from(i % 50) + bump,
            tiers: vec![
                PriceTier {
                    min_qty: 1,
                    price_minor: 2000 + i64::from(i) + bump,
                },
                PriceTier {
                    min_qty: 12,
                    price_minor: 1800 + i64::from(i) + bump,
                },
            ],
        })
        .collect()
}

async fn stage(db: &std::path::Path, items: &[Item]) {
    let app = Bulwark::open(db, AdapterRegistry::new()).await.unwrap();
    app.staging().import("test", items).await.unwrap();
    app.close().await;
}

/// (SKU, quantity, sorted tiers) of each item.
type Shown = Vec<(String, i64, Vec<(u32, i64)>)>;

fn shown(sim: &ApiSimHandle, ep: &str, want: &[Item]) -> Shown {
    let skus: std::collections::HashSet<&str> = want.iter().map(|i| i.sku.as_str()).collect();
    sim.items(ep)
        .into_iter()
        .filter(|i| skus.contains(i.sku.as_str()))
        .map(|i| {
            let mut t: Vec<(u32, i64)> =
                i.tiers.iter().map(|t| (t.min_qty, t.price_minor)).collect();
            t.sort();
            (i.sku, i.qty, t)
        })
        .collect()
}

fn expected(want: &[Item]) -> Shown {
    want.iter()
        .map(|i| {
            let mut t: Vec<(u32, i64)> =
                i.tiers.iter().map(|t| (t.min_qty, t.price_minor)).collect();
            t.sort();
            (i.sku.clone(), i.qty, t)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_shape_syncs_exactly_once_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let key = format!("key-{}", uuid::Uuid::new_v4().simple());
    let sim = sim_api::start(
        ApiSimConfig {
            api_key: key.clone(),
            currency: "EUR".into(),
            latency_ms: 3,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let want = items(SKUS, 0);
    let skus: Vec<String> = want.iter().map(|i| i.sku.clone()).collect();
    let eps: Vec<String> = (1..=ENDPOINTS).map(|i| format!("shop-{i}")).collect();
    for ep in &eps {
        sim.seed_catalog(ep, &skus);
    }
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/profiles/catalog.toml"
        ),
        dir.path().join("catalog.toml"),
    )
    .unwrap();
    let mut config = String::from(
        "database = \"bulwark.db\"\n[sync]\nbatch_size = 50\nmax_in_flight = 3\n[http]\nprofiles = \"catalog.toml\"\n",
    );
    for ep in &eps {
        config.push_str(&format!(
            "[[endpoint]]\nid = \"{ep}\"\nadapter = \"http\"\nsettings = {{ profile = \"catalog\", base_url = \"{}\", location_id = \"loc-1\", api_key_env = \"{KEY_VAR}\" }}\n",
            sim.catalog_base_url(ep)
        ));
    }
    let cfg = dir.path().join("bulwark.toml");
    std::fs::write(&cfg, config).unwrap();
    let sync = || {
        let mut c = bulwark();
        c.arg("sync").arg("--config").arg(&cfg).env(KEY_VAR, &key);
        c
    };
    // A fresh database used first by `sync --config` with an `http` endpoint is a Bulwark
    // database (the id cache's table comes with Bulwark's own schema), not refused.
    let out = sync().output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no sealed snapshot yet"), "{text}");
    assert!(!text.contains("not a Bulwark database"), "{text}");
    stage(&db, &want).await;

    // Kill the first sync at increasing points while writes are landing, then let one run
    // to the end.
    let mut kills = 0;
    for delay_ms in [400u64, 900, 1500] {
        let before = sim.stats().writes_applied;
        let log = std::fs::File::create(dir.path().join(format!("sync-{delay_ms}.log"))).unwrap();
        let child = KillOnDrop(sync().stdout(Stdio::null()).stderr(log).spawn().unwrap());
        let start = Instant::now();
        while sim.stats().writes_applied == before && start.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let mut child = child;
        match child.0.try_wait().unwrap() {
            None => kills += 1,
            Some(status) => eprintln!("sync ended before the kill: {status}; {:?}", sim.stats()),
        }
        drop(child); // SIGKILL
    }
    assert!(
        kills >= 2,
        "the sync was killed mid-run ({kills} kills); its log: {}",
        std::fs::read_to_string(dir.path().join("sync-400.log")).unwrap_or_default()
    );
    let out = run_ok(&mut sync());
    eprintln!("{out}");
    for ep in &eps {
        assert_eq!(shown(&sim, ep, &want), expected(&want), "{ep}");
        for sku in &skus {
            assert_eq!(
                sim.writes_for(ep, sku),
                2,
                "{ep} {sku}: stock and prices, once each"
            );
        }
    }
    let stats = sim.stats();
    eprintln!("after {kills} kills: {stats:?}");
    assert_eq!(
        stats.writes_applied,
        (ENDPOINTS as u64) * u64::from(SKUS) * 2
    );
    let audit = run_ok(bulwark().arg("audit").arg("--db").arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");

    // Nothing changed: nothing sent, nothing listed.
    stage(&db, &want).await;
    let before = sim.stats();
    run_ok(&mut sync());
    let after = sim.stats();
    assert_eq!(
        (after.writes_applied, after.pages),
        (before.writes_applied, before.pages)
    );

    // 1 % changed: 3 SKUs × 3 endpoints × 2 requests, no lookup.
    let mut changed = want.clone();
    for i in [0usize, 140, 299] {
        changed[i].qty += 5;
        changed[i].tiers[1].price_minor -= 3;
    }
    stage(&db, &changed).await;
    run_ok(&mut sync());
    let last = sim.stats();
    assert_eq!(last.writes_applied - after.writes_applied, 18);
    for ep in &eps {
        assert_eq!(shown(&sim, ep, &changed), expected(&changed), "{ep}");
    }
    eprintln!(
        "1 % change: {} write requests, {} listing pages (read-back only)",
        last.writes_applied - after.writes_applied,
        last.pages - after.pages
    );
    sim.shutdown().await;
}
