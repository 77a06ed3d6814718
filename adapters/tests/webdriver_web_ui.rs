//! The webdriver adapter driving real headless Chromium (chromedriver) against the web-UI
//! portal simulator on loopback.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian `chromium
//! chromium-driver`), or `BULWARK_CHROMIUM` / `BULWARK_CHROMEDRIVER`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bulwark_adapters::sim_webui::{
    self, MANIFEST_RECIPE, PER_ITEM_RECIPE, WebPortal, WebSimHandle,
};
use bulwark_adapters::webdriver::{self, MapSecrets, PoolConfig, WebDriverPool};
use bulwark_workflows::adapter::{
    AdapterError, AdapterRegistry, AdapterResult, EndpointConfig, PortalAdapter, Receipt,
    Verification,
};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Batch, Item, PriceTier, batch_key, payload_hash};
use bulwark_workflows::sync::SyncOptions;
use tokio::sync::Notify;
use uuid::Uuid;

const USER: &str = "buyer-7@example.test";
const PASS: &str = "pa55-Wd-9f3e1c0ffee";
const ACCOUNT: &str = "acct-secret-5b1d77aa";

/// Every log line of this test binary (one global subscriber, debug for the adapters).
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("bulwark_adapters=debug,bulwark_workflows=debug,thirtyfour=debug,info")
            .with_writer(move || LogWriter(writer.clone()))
            .with_ansi(false)
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn secrets() -> Arc<MapSecrets> {
    Arc::new(MapSecrets(HashMap::from([
        ("BULWARK_SIM_USER".to_owned(), USER.to_owned()),
        ("BULWARK_SIM_PASS".to_owned(), PASS.to_owned()),
        ("SIM_ACCOUNT".to_owned(), ACCOUNT.to_owned()),
    ])))
}

fn pool(size: usize) -> WebDriverPool {
    let mut c = PoolConfig::from_env();
    c.size = size;
    WebDriverPool::new(c)
}

fn registry(pool: &WebDriverPool) -> AdapterRegistry {
    let mut r = AdapterRegistry::new();
    r.register("webdriver", webdriver::factory(pool.clone(), secrets()));
    r
}

struct Fixture {
    dir: tempfile::TempDir,
    sim: WebSimHandle,
}

impl Fixture {
    async fn new(portals: Vec<WebPortal>) -> Self {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let sim = sim_webui::start(portals, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        Self { dir, sim }
    }

    fn write_recipe(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn artifacts(&self) -> PathBuf {
        self.dir.path().join("artifacts")
    }

    fn endpoint(
        &self,
        id: &str,
        portal: &str,
        recipe: &Path,
        extra: &[(&str, &str)],
    ) -> EndpointConfig {
        let mut settings = HashMap::from([
            ("recipe".to_owned(), recipe.display().to_string()),
            ("base_url".to_owned(), self.sim.base_url(portal)),
            (
                "artifacts_dir".to_owned(),
                self.artifacts().display().to_string(),
            ),
            ("step_timeout_ms".to_owned(), "5000".to_owned()),
        ]);
        for (k, v) in extra {
            settings.insert((*k).to_owned(), (*v).to_owned());
        }
        EndpointConfig {
            policy: None,
            id: id.into(),
            adapter: "webdriver".into(),
            settings,
        }
    }
}

fn portal(id: &str) -> WebPortal {
    WebPortal::new(id, USER, PASS)
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

fn batch(endpoint: &str, items: Vec<Item>) -> Batch {
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

async fn seed(db: &Path, items: &[Item]) {
    let app = Bulwark::open(db, AdapterRegistry::new()).await.unwrap();
    app.staging().import("test", items).await.unwrap();
    app.close().await;
}

/// Bytes of every file whose name starts with `prefix` in `dir` (the database, WAL, ...).
fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            out.extend(std::fs::read(e.path()).unwrap_or_default());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn assert_no_secrets(what: &str, hay: &[u8]) {
    for s in [USER, PASS, ACCOUNT] {
        assert!(!contains(hay, s), "{what} contains a secret value");
    }
}

/// No log line carries a secret. thirtyfour's own debug lines echo WebDriver responses,
/// i.e. whatever the portal displays (a user name on a welcome banner, a note field), so
/// there only the never-displayed password is checked: it is typed through a request
/// thirtyfour does not log.
fn assert_no_secrets_in_logs() {
    let buf = logs().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let text = String::from_utf8_lossy(&buf);
    let mut thirtyfour_lines = 0;
    for line in text.lines() {
        if line.contains(" thirtyfour") {
            thirtyfour_lines += 1;
            assert!(
                !line.contains(PASS),
                "a thirtyfour log line carries the password"
            );
        } else {
            assert_no_secrets("a log line", line.as_bytes());
        }
    }
    assert!(
        thirtyfour_lines > 0,
        "the WebDriver traffic was logged at debug"
    );
}

fn options() -> SyncOptions {
    SyncOptions {
        limits: Default::default(),
        batch_size: 3,
        max_in_flight: 2,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_end_to_end_through_the_web_ui_and_bad_rows_trip_the_circuit() {
    let mut slow = portal("slow");
    slow.slow_ms = 300;
    let fx = Fixture::new(vec![portal("acme"), slow, portal("strict")]).await;
    let recipe = fx.write_recipe("manifest", MANIFEST_RECIPE);
    let db = fx.dir.path().join("bulwark.db");
    // 5 SKUs in batches of 3: S-0004, in the second batch, has a negative quantity that
    // every portal refuses with a per-row error.
    let mut snapshot = items(5, 3);
    snapshot[4].qty = -2;
    seed(&db, &snapshot).await;
    let pool = pool(2);
    let app = Bulwark::open(&db, registry(&pool)).await.unwrap();
    let endpoints = vec![
        fx.endpoint("acme", "acme", &recipe, &[]),
        fx.endpoint("slow", "slow", &recipe, &[]),
        fx.endpoint("strict", "strict", &recipe, &[]),
    ];
    let report = app.sync(&endpoints, &options(), None).await.unwrap();
    eprintln!("{report:?}");

    // The first batch went in; the second holds the bad row, so every endpoint sees the
    // portal's per-row error as a failed validation, three times, and trips...
    for p in ["acme", "slow", "strict"] {
        let uploads = fx.sim.uploads(p);
        let applied: Vec<_> = uploads.iter().filter(|u| u.applied).collect();
        let rejected: Vec<_> = uploads.iter().filter(|u| !u.applied).collect();
        assert_eq!(applied.len(), 1, "{p}: {uploads:?}");
        assert_eq!(
            rejected.len(),
            3,
            "{p}: three failed validations trip: {uploads:?}"
        );
        for u in &uploads {
            assert!(
                u.file_name.starts_with("bulwark-") && u.file_name.ends_with(".csv"),
                "{u:?}"
            );
        }
        // ... and the first batch's values are on the portal, read back by verify.
        let products = fx.sim.products(p);
        for it in &snapshot[..3] {
            let shown = &products[&it.sku];
            assert_eq!(
                (shown.qty, shown.price_minor),
                (it.qty, it.tiers[0].price_minor)
            );
        }
    }
    assert_eq!(report.by_status.get("Tripped"), Some(&3), "{report:?}");
    let alerts = app.store().alerts(100).await.unwrap();
    // One circuit_opened per endpoint, and the run's own alert.
    let kinds: Vec<&str> = alerts.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run_tripped",
            "circuit_opened",
            "circuit_opened",
            "circuit_opened"
        ],
        "{alerts:?}"
    );
    let alert_text = format!("{alerts:?}");
    assert!(
        alert_text.contains("quantity must be a non-negative integer"),
        "the portal's row error reaches the alert: {alert_text}"
    );
    assert!(
        alert_text.contains("screenshot: ") && alert_text.contains(".png"),
        "the alert names the saved screenshot: {alert_text}"
    );
    app.close().await;
    pool.shutdown().await;

    // Secrets never reached the journal (database files) or the logs.
    assert_no_secrets("database", &files_with_prefix(fx.dir.path(), "bulwark.db"));
    assert_no_secrets_in_logs();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_sync_verifies_read_back_values_and_reuses_logged_in_sessions() {
    let fx = Fixture::new(vec![portal("p1"), portal("p2")]).await;
    let recipe = fx.write_recipe("manifest", MANIFEST_RECIPE);
    let db = fx.dir.path().join("bulwark.db");
    let snapshot = items(5, 11);
    seed(&db, &snapshot).await;
    let pool = pool(1);
    let app = Bulwark::open(&db, registry(&pool)).await.unwrap();
    // Two endpoints on portal p1 share a pool key; one on p2.
    let endpoints = vec![
        fx.endpoint("e1", "p1", &recipe, &[("sku_prefix", "A-")]),
        fx.endpoint("e2", "p1", &recipe, &[("sku_prefix", "B-")]),
        fx.endpoint("e3", "p2", &recipe, &[]),
    ];
    let report = app.sync(&endpoints, &options(), None).await.unwrap();
    assert_eq!(report.by_status.get("Done"), Some(&3), "{report:?}");
    assert_eq!(report.verifies, 6, "{report:?}");
    for (p, prefix, uploads) in [("p1", "A-", 4), ("p1", "B-", 4), ("p2", "", 2)] {
        let products = fx.sim.products(p);
        for it in &snapshot {
            let shown = &products[&format!("{prefix}{}", it.sku)];
            assert_eq!(
                (shown.qty, shown.price_minor),
                (it.qty, it.tiers[0].price_minor)
            );
        }
        assert_eq!(fx.sim.uploads(p).len(), uploads);
        assert!(fx.sim.uploads(p).iter().all(|u| u.applied));
    }
    // One browser, logged in once per portal and reused for every call of both.
    assert_eq!(
        pool.stats()
            .started
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!((fx.sim.logins("p1"), fx.sim.logins("p2")), (1, 1));
    // A second run sends nothing.
    let again = app.sync(&endpoints, &options(), None).await.unwrap();
    assert_eq!(again.uploads, 0, "{again:?}");
    app.close().await;
    pool.shutdown().await;
}

/// Lets the upload land on the portal, then "dies" before answering (the journal never
/// learns the outcome), like a SIGKILL between the submit and the journal append.
struct DieAfterUpload {
    inner: Arc<dyn PortalAdapter>,
    crashed: Arc<Notify>,
}

#[async_trait]
impl PortalAdapter for DieAfterUpload {
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        self.inner.upload(batch).await?;
        self.crashed.notify_one();
        std::future::pending().await
    }
    async fn verify(&self, batch: &Batch, receipt: &Receipt) -> AdapterResult<Verification> {
        self.inner.verify(batch, receipt).await
    }
    async fn probe(&self, endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>> {
        self.inner.probe(endpoint, key).await
    }
}

#[test]
fn crash_after_submit_then_restart_probes_the_history_and_uploads_nothing_twice() {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    // The first "process": its own runtime, dropped whole at the crash.
    let main_rt = rt();
    let fx = main_rt.block_on(Fixture::new(vec![portal("acme")]));
    let recipe = fx.write_recipe("manifest", MANIFEST_RECIPE);
    let db = fx.dir.path().join("bulwark.db");
    let snapshot = items(4, 5);
    main_rt.block_on(seed(&db, &snapshot));
    let endpoints = vec![fx.endpoint("acme", "acme", &recipe, &[])];
    {
        let crash_rt = rt();
        crash_rt.block_on(async {
            let pool = pool(1);
            let real = registry(&pool).build(&endpoints[0]).unwrap();
            let crashed = Arc::new(Notify::new());
            let dying: Arc<dyn PortalAdapter> = Arc::new(DieAfterUpload {
                inner: real,
                crashed: crashed.clone(),
            });
            let mut reg = AdapterRegistry::new();
            reg.register(
                "webdriver",
                Arc::new(move |_: &EndpointConfig| Ok(dying.clone())),
            );
            let app = Bulwark::open(&db, reg).await.unwrap();
            let eps = endpoints.clone();
            let sync = tokio::spawn(async move {
                let _ = app.sync(&eps, &options(), None).await;
            });
            tokio::time::timeout(Duration::from_secs(60), crashed.notified())
                .await
                .expect("the first upload lands");
            sync.abort();
            let _ = sync.await;
            pool.shutdown().await;
        });
        drop(crash_rt);
    }
    let landed = fx.sim.uploads("acme");
    assert_eq!(landed.len(), 1, "{landed:?}");
    // Restart: replay resumes in Uploading, probes, finds the key in the history.
    main_rt.block_on(async {
        let pool = pool(1);
        let app = Bulwark::open(&db, registry(&pool)).await.unwrap();
        let report = app.sync(&endpoints, &options(), None).await.unwrap();
        eprintln!("{report:?}");
        assert!(
            report.probes.1 >= 1,
            "probe found the landed batch: {report:?}"
        );
        app.close().await;
        pool.shutdown().await;
    });
    let uploads = fx.sim.uploads("acme");
    // Two batches (3 + 1 items), each exactly once.
    assert_eq!(uploads.len(), 2, "nothing uploaded twice: {uploads:?}");
    assert_ne!(uploads[0].file_name, uploads[1].file_name);
    let products = fx.sim.products("acme");
    for it in &snapshot {
        assert_eq!(products[&it.sku].qty, it.qty);
    }
    drop(main_rt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_mid_run_logs_in_again_and_carries_on() {
    let products: Vec<(String, i64, i64)> = (0..4).map(|i| (format!("S-{i:04}"), 0, 0)).collect();
    let mut p = portal("shop");
    p.logout_after = Some(5);
    p.products = products;
    let fx = Fixture::new(vec![p]).await;
    let recipe = fx.write_recipe("per-item", PER_ITEM_RECIPE);
    let pool = pool(1);
    let a = registry(&pool)
        .build(&fx.endpoint("shop", "shop", &recipe, &[]))
        .unwrap();
    let b = batch("shop", items(4, 21));
    let receipt = a.upload(&b).await.unwrap();
    assert_eq!(
        a.verify(&b, &receipt).await.unwrap(),
        Verification::Verified
    );
    // The adapter still knows the batch: a per-item probe re-reads the values.
    assert_eq!(a.probe("shop", b.key).await.unwrap(), Some(receipt));
    assert!(fx.sim.expirations("shop") >= 2, "the portal logged us out");
    assert!(fx.sim.logins("shop") >= 3, "and we logged in again");
    for it in &b.items {
        let shown = &fx.sim.products("shop")[&it.sku];
        assert_eq!(
            (shown.qty, shown.price_minor),
            (it.qty, it.tiers[0].price_minor)
        );
        assert_eq!(shown.note, format!("bulwark {}", b.key));
    }
    // A fresh adapter (as after a restart) does not know the batch: the per-item probe
    // finds the key in the listing's note column instead.
    let fresh = registry(&pool)
        .build(&fx.endpoint("shop", "shop", &recipe, &[]))
        .unwrap();
    assert!(fresh.probe("shop", b.key).await.unwrap().is_some());
    assert_eq!(fresh.probe("shop", Uuid::new_v4()).await.unwrap(), None);
    // Wrong credentials are an authentication failure.
    let mut wrong = HashMap::from([("BULWARK_SIM_USER".to_owned(), USER.to_owned())]);
    wrong.insert("BULWARK_SIM_PASS".into(), "not-the-password".into());
    let mut reg = AdapterRegistry::new();
    reg.register(
        "webdriver",
        webdriver::factory(pool.clone(), Arc::new(MapSecrets(wrong))),
    );
    let a2 = reg
        .build(&fx.endpoint("shop", "shop", &recipe, &[("portal", "wrong-login")]))
        .unwrap();
    match a2.upload(&b).await {
        Err(AdapterError::Auth(m)) => assert!(m.contains("Invalid username or password"), "{m}"),
        other => panic!("expected an auth error, got {other:?}"),
    }
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_that_matches_nothing_names_step_selector_and_screenshot_and_leaks_no_secret() {
    let mut p = portal("shop");
    p.products = vec![("S-0000".into(), 1, 100)];
    let fx = Fixture::new(vec![p]).await;
    // Per-item recipe that writes a secret into the note field (the page then carries it
    // in the HTML) and then clicks a button that does not exist.
    let text = PER_ITEM_RECIPE
        .replace(
            "value = \"bulwark {{batch.key}}\"",
            "secret = \"SIM_ACCOUNT\"",
        )
        .replacen(
            "[[verify]]",
            "[[upload.steps]]\naction = \"click\"\nselector = \"#publish-now\"\n\n[[verify]]",
            1,
        );
    let recipe = fx.write_recipe("broken", &text);
    let pool = pool(1);
    let a = registry(&pool)
        .build(&fx.endpoint("shop", "shop", &recipe, &[("step_timeout_ms", "1500")]))
        .unwrap();
    let b = batch("shop", items(1, 2));
    let err = a.upload(&b).await.unwrap_err();
    let AdapterError::Config(msg) = &err else {
        panic!("expected a config error, got {err:?}");
    };
    assert!(
        msg.contains("upload step 1 (for_each_item) [item S-0000] step 8 (click)"),
        "{msg}"
    );
    assert!(msg.contains("\"#publish-now\""), "{msg}");
    let png = msg
        .split("screenshot: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .map(PathBuf::from)
        .expect("the error names the screenshot");
    assert!(png.starts_with(fx.artifacts()), "{}", png.display());
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "a real PNG");
    let html = std::fs::read_to_string(png.with_extension("html")).unwrap();
    assert!(msg.contains(&png.with_extension("html").display().to_string()));
    assert!(
        html.contains("[REDACTED]"),
        "the secret was on the page and was redacted"
    );
    assert!(html.contains("Saved S-0000"));
    // The secret did reach the portal (the fill worked) ...
    assert_eq!(fx.sim.products("shop")["S-0000"].note, ACCOUNT);
    // ... but no error, artifact or log line carries it.
    assert_no_secrets("error", format!("{err:?}").as_bytes());
    for e in std::fs::read_dir(fx.artifacts()).unwrap().flatten() {
        assert_no_secrets("artifact name", e.file_name().to_string_lossy().as_bytes());
        if e.path().extension().is_some_and(|x| x == "html") {
            assert_no_secrets("saved HTML", &std::fs::read(e.path()).unwrap());
        }
    }
    assert_no_secrets_in_logs();
    pool.shutdown().await;
}
