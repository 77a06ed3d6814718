//! Recipe lookups with real headless Chromium against the web-UI simulator's portals with
//! numeric ids (`WebPortal::numeric_ids`): each SKU's edit-page number is found once on the
//! search page (`[[lookup]]`, `capture`), cached in an `IdCache`, reused by later calls
//! and restarts, looked up again only when the portal renumbered it (`not_found_marker`),
//! and a SKU the portal does not know is refused alone.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian `chromium
//! chromium-driver`), or `BULWARK_CHROMIUM` / `BULWARK_CHROMEDRIVER`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bulwark_adapters::http::{IdCache, MemoryIdCache, SqliteIdCache};
use bulwark_adapters::sim_webui::{self, PER_ITEM_LOOKUP_RECIPE, WebPortal, WebSimHandle};
use bulwark_adapters::webdriver::{self, MapSecrets, PoolConfig, WebDriverPool};
use bulwark_workflows::adapter::{
    AdapterError, AdapterRegistry, EndpointConfig, PortalAdapter, Receipt, Verification,
};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Batch, Item, PriceTier, batch_key, payload_hash};
use bulwark_workflows::sync::SyncOptions;

const USER: &str = "lookup-user@example.test";
const PASS: &str = "pa55-lookup-7c1e";
const PORTAL: &str = "numbered";
/// The cache's profile key of the shipped recipe.
const PROFILE: &str = "webdriver:sim-per-item-lookup";

fn secrets() -> Arc<MapSecrets> {
    Arc::new(MapSecrets(HashMap::from([
        ("BULWARK_SIM_USER".to_owned(), USER.to_owned()),
        ("BULWARK_SIM_PASS".to_owned(), PASS.to_owned()),
    ])))
}

fn pool() -> WebDriverPool {
    let mut c = PoolConfig::from_env();
    c.size = 1;
    WebDriverPool::new(c)
}

struct Fixture {
    dir: tempfile::TempDir,
    sim: WebSimHandle,
    recipe: PathBuf,
}

impl Fixture {
    /// One portal with numeric ids holding `products`.
    async fn new(products: &[Item]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut portal = WebPortal::new(PORTAL, USER, PASS);
        portal.numeric_ids = true;
        // Not the values the tests send: every save is visible.
        portal.products = products.iter().map(|i| (i.sku.clone(), 0, 1)).collect();
        let sim = sim_webui::start(vec![portal], "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let recipe = dir.path().join("per-item-lookup.toml");
        std::fs::write(&recipe, PER_ITEM_LOOKUP_RECIPE).unwrap();
        Self { dir, sim, recipe }
    }

    fn endpoint(&self, recipe: &Path) -> EndpointConfig {
        EndpointConfig {
            policy: None,
            id: "wd-numbered".into(),
            adapter: "webdriver".into(),
            settings: HashMap::from([
                ("recipe".to_owned(), recipe.display().to_string()),
                ("base_url".to_owned(), self.sim.base_url(PORTAL)),
                (
                    "artifacts_dir".to_owned(),
                    self.dir.path().join("artifacts").display().to_string(),
                ),
                ("step_timeout_ms".to_owned(), "5000".to_owned()),
            ]),
        }
    }

    /// An adapter built the way the registry builds it, over `pool` and `ids`.
    fn adapter(&self, pool: &WebDriverPool, ids: Arc<dyn IdCache>) -> Arc<dyn PortalAdapter> {
        webdriver::factory_with_cache(pool.clone(), secrets(), ids)(&self.endpoint(&self.recipe))
            .unwrap()
    }

    /// The portal shows exactly `items`' values.
    fn assert_shows(&self, items: &[Item]) {
        let products = self.sim.products(PORTAL);
        for it in items {
            let p = &products[&it.sku];
            assert_eq!(
                (p.qty, p.price_minor),
                (it.qty, it.tiers[0].price_minor),
                "{}",
                it.sku
            );
        }
    }

    /// The portal's current numbers, as the cache stores them.
    fn numbers(&self) -> HashMap<String, String> {
        self.sim
            .numbers(PORTAL)
            .into_iter()
            .map(|(sku, n)| (sku, n.to_string()))
            .collect()
    }
}

fn items(n: usize, seed: i64) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            sku: format!("S-{i:04}"),
            qty: seed + i as i64,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 1000 + 7 * seed + i as i64,
            }],
        })
        .collect()
}

fn batch(items: Vec<Item>) -> Batch {
    Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: "wd-numbered".into(),
        snapshot: 1,
        index: 0,
        key: batch_key("wd-numbered", 1, 0, &payload_hash(&items), 0),
        items,
    }
}

fn skus(items: &[Item]) -> Vec<String> {
    items.iter().map(|i| i.sku.clone()).collect()
}

async fn upload_and_verify(adapter: &dyn PortalAdapter, b: &Batch) {
    let receipt: Receipt = adapter.upload(b).await.unwrap();
    assert_eq!(
        adapter.verify(b, &receipt).await.unwrap(),
        Verification::Verified
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_looked_up_once_cached_across_restarts_and_only_stale_ones_looked_up_again() {
    let catalog = items(6, 0);
    let fx = Fixture::new(&catalog).await;
    let cache_db = fx.dir.path().join("ids.db");
    let pool = pool();

    // First sync: one search page per SKU; the edit pages are reached by number.
    let cache: Arc<dyn IdCache> = Arc::new(SqliteIdCache::connect(&cache_db).await.unwrap());
    let adapter = fx.adapter(&pool, cache.clone());
    let first = items(6, 3);
    upload_and_verify(adapter.as_ref(), &batch(first.clone())).await;
    assert_eq!(fx.sim.searches(PORTAL), 6, "one lookup per SKU");
    assert_eq!(fx.sim.saves(PORTAL), 6);
    assert_eq!(fx.sim.not_found(PORTAL), 0);
    fx.assert_shows(&first);
    let skus = skus(&catalog);
    assert_eq!(
        cache.get_many(PROFILE, "wd-numbered", &skus).await.unwrap(),
        fx.numbers(),
        "the cache holds the portal's numbers"
    );

    // The same batch again (new values): every id comes from the cache.
    let second = items(6, 20);
    upload_and_verify(adapter.as_ref(), &batch(second.clone())).await;
    assert_eq!(fx.sim.searches(PORTAL), 6, "no lookup for cached SKUs");
    assert_eq!(fx.sim.saves(PORTAL), 12);
    fx.assert_shows(&second);

    // A restart: a new adapter over a new connection to the same database.
    drop(adapter);
    let cache: Arc<dyn IdCache> = Arc::new(SqliteIdCache::connect(&cache_db).await.unwrap());
    let adapter = fx.adapter(&pool, cache.clone());
    let third = items(6, 40);
    upload_and_verify(adapter.as_ref(), &batch(third.clone())).await;
    assert_eq!(fx.sim.searches(PORTAL), 6, "the restart reads the cache");
    fx.assert_shows(&third);

    // The portal renumbers two SKUs: their old pages answer "not found", so those two
    // (and only those) are looked up again, within the same call, and then saved.
    let before = fx.sim.numbers(PORTAL);
    fx.sim.renumber(PORTAL, &["S-0001", "S-0004"]);
    let after = fx.sim.numbers(PORTAL);
    assert_ne!(before["S-0001"], after["S-0001"]);
    assert_eq!(before["S-0002"], after["S-0002"]);
    let fourth = items(6, 60);
    upload_and_verify(adapter.as_ref(), &batch(fourth.clone())).await;
    assert_eq!(
        fx.sim.searches(PORTAL),
        8,
        "only the stale SKUs are looked up"
    );
    assert_eq!(
        fx.sim.not_found(PORTAL),
        2,
        "one stale page per renumbered SKU"
    );
    assert_eq!(fx.sim.saves(PORTAL), 24, "every item saved once per upload");
    fx.assert_shows(&fourth);
    assert_eq!(
        cache.get_many(PROFILE, "wd-numbered", &skus).await.unwrap(),
        fx.numbers(),
        "the cache learned the new numbers"
    );
    assert_eq!(fx.sim.logins(PORTAL), 1, "one session, logged in once");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_unknown_at_the_portal_is_quarantined_and_the_rest_of_its_batch_lands() {
    // The portal knows S-0000 … S-0003; the snapshot also carries S-0004.
    let snapshot = items(5, 9);
    let fx = Fixture::new(&snapshot[..4]).await;
    let db = fx.dir.path().join("bulwark.db");
    {
        let app = Bulwark::open(&db, AdapterRegistry::new()).await.unwrap();
        app.staging().import("test", &snapshot).await.unwrap();
        app.close().await;
    }
    let pool = pool();
    let mut registry = AdapterRegistry::new();
    registry.register(
        "webdriver",
        webdriver::factory_with_cache(pool.clone(), secrets(), Arc::new(MemoryIdCache::new())),
    );
    let app = Bulwark::open(&db, registry).await.unwrap();
    let options = SyncOptions {
        limits: Default::default(),
        batch_size: 5,
        max_in_flight: 1,
        ..Default::default()
    };
    let report = app
        .sync(&[fx.endpoint(&fx.recipe)], &options, None)
        .await
        .unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.by_status.get("Done"), Some(&1), "{report:?}");

    // The four known SKUs landed, the unknown one was never created, each SKU was
    // searched once (the refused one is not retried within the sync).
    fx.assert_shows(&snapshot[..4]);
    assert!(!fx.sim.products(PORTAL).contains_key("S-0004"));
    assert_eq!(fx.sim.saves(PORTAL), 4);
    assert_eq!(fx.sim.searches(PORTAL), 5);

    let quarantine = app.staging().quarantine().await.unwrap();
    assert_eq!(quarantine.len(), 1, "{quarantine:?}");
    let q = &quarantine[0];
    assert_eq!(q.sku, "S-0004");
    for part in [
        "S-0004",
        "sim-per-item-lookup",
        "unknown at the portal",
        "capture",
    ] {
        assert!(q.reason.contains(part), "{part:?} not in {:?}", q.reason);
    }
    app.close().await;
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_pattern_that_matches_nothing_is_a_config_error_naming_recipe_step_and_sku() {
    let catalog = items(2, 0);
    let fx = Fixture::new(&catalog).await;
    let recipe = fx.dir.path().join("bad-pattern.toml");
    std::fs::write(
        &recipe,
        PER_ITEM_LOOKUP_RECIPE.replace("/products/([0-9]+)/edit", "/items/([0-9]+)"),
    )
    .unwrap();
    let pool = pool();
    let ids = Arc::new(MemoryIdCache::new());
    let adapter =
        webdriver::factory_with_cache(pool.clone(), secrets(), ids.clone())(&fx.endpoint(&recipe))
            .unwrap();
    let err = adapter.upload(&batch(items(2, 5))).await.unwrap_err();
    let AdapterError::Config(msg) = &err else {
        panic!("expected a configuration error, got {err:?}");
    };
    for part in [
        "sim-per-item-lookup",
        "lookup step 3 (capture)",
        "S-0000",
        "/items/([0-9]+)",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert!(!msg.contains(PASS));
    assert_eq!(fx.sim.saves(PORTAL), 0, "nothing was edited");
    assert!(ids.is_empty(), "nothing was cached");
    pool.shutdown().await;
}
