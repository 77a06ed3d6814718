//! The library API as an embedding program uses it: `Bulwark::builder()`, workers spawned
//! on the program's own runtime, runs started with `enqueue`, progress events, metrics.

use std::sync::Arc;
use std::time::Duration;

use bulwark_adapters::memory::MemoryPortal;
use bulwark_engine::WorkOptions;
use bulwark_engine::store::Store;
use bulwark_workflows::adapter::{EndpointConfig, PortalAdapter};
use bulwark_workflows::app::{Bulwark, ProgressEvent, WorkerOptions};
use bulwark_workflows::catalog::{Item, PriceTier};
use bulwark_workflows::sync::SyncOptions;

fn items(n: i64, bump: i64) -> Vec<Item> {
    (1..=n)
        .map(|i| Item {
            sku: format!("SKU-{i:04}"),
            qty: i + bump,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 100 + i,
            }],
        })
        .collect()
}

async fn stage(app: &Bulwark, items: &[Item]) {
    app.staging().import("library test", items).await.unwrap();
}

fn endpoints(n: u32) -> Vec<EndpointConfig> {
    (1..=n)
        .map(|i| EndpointConfig {
            id: format!("shop-{i:03}"),
            adapter: "mine".into(),
            ..Default::default()
        })
        .collect()
}

fn fast() -> WorkerOptions {
    WorkerOptions {
        work: WorkOptions {
            poll: Duration::from_millis(50),
            ..Default::default()
        },
        lease_ms: 5_000,
        ..Default::default()
    }
}

/// A Bulwark on `db` working as `worker`, with `portal` registered as adapter `mine`.
async fn open_as(db: &str, portal: Arc<dyn PortalAdapter>, worker: &str) -> Bulwark {
    Bulwark::builder()
        .database(db)
        .portal("mine", portal)
        .worker_id(worker)
        .open()
        .await
        .unwrap()
}

/// Follow a worker's progress events until `run` finishes: the endpoints it finished
/// meanwhile, and the run's final status.
async fn finished_until(
    mut rx: tokio::sync::broadcast::Receiver<ProgressEvent>,
    run: i64,
) -> (usize, String) {
    let mut finished = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Ok(ProgressEvent::Transition { terminal: true, .. })) => finished += 1,
            Ok(Ok(ProgressEvent::RunFinished { run: r, status })) if r == run => {
                return (finished, status);
            }
            Ok(Ok(_)) => {}
            other => panic!("no RunFinished for run {run}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_builder_without_a_database_says_so() {
    let err = match Bulwark::builder().open().await {
        Ok(_) => panic!("opened without a database"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no database given"), "{err}");
    let err = match Bulwark::builder()
        .database("postgres://nobody@127.0.0.1:1/nothing")
        .open()
        .await
    {
        Ok(_) => panic!("opened an unreachable database"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

/// Two workers spawned in this runtime share one run on PostgreSQL: every batch lands
/// exactly once, each subscriber sees the run finish, and the metrics add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_spawned_workers_share_a_run_and_report_it() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "library");
    let portal = Arc::new(MemoryPortal::new());
    let adapter: Arc<dyn PortalAdapter> = portal.clone();
    let open = |worker: &'static str| open_as(&db, adapter.clone(), worker);
    let (a, b) = (open("lib-a").await, open("lib-b").await);
    assert_eq!(a.worker_id(), "lib-a");
    stage(&a, &items(120, 0)).await;
    let eps = endpoints(20);
    let options = SyncOptions {
        batch_size: 25,
        ..Default::default()
    };
    let wa = a.spawn_worker(eps.clone(), options.clone(), fast());
    let wb = b.spawn_worker(eps.clone(), options.clone(), fast());
    let (ea, eb) = (wa.subscribe(), wb.subscribe());

    let plan = a.enqueue(&eps, &options).await.unwrap().unwrap();
    let run = plan.run.expect("a run");
    assert_eq!((plan.workflows, plan.batches), (20, 100));

    // Each worker reports the endpoints it finished, and the run finishing.
    let ((fa, sa), (fb, sb)) = tokio::join!(finished_until(ea, run), finished_until(eb, run));
    assert_eq!((sa.as_str(), sb.as_str()), ("finished", "finished"));
    assert_eq!(
        fa + fb,
        20,
        "every endpoint finished once, by one of the workers"
    );

    assert_eq!(portal.applied(), 100, "each batch applied once");
    assert_eq!(portal.duplicates(), 0);
    let verified = |app: &Bulwark| {
        app.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix("bulwark_batches_total{outcome=\"verified\"} "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(verified(&a) + verified(&b), 100);
    let commits = |app: &Bulwark| {
        app.journal_stats()
            .map_or(0, |j| j.commits.load(std::sync::atomic::Ordering::Relaxed))
    };
    assert!(commits(&a) + commits(&b) > 0);

    let (ra, rb) = (wa.shutdown().await.unwrap(), wb.shutdown().await.unwrap());
    assert_eq!(ra.uploads + rb.uploads, 100);
    assert_eq!(ra.unfinished + rb.unfinished, 0);
    let status = a.status().await.unwrap();
    let r = status.runs.iter().find(|r| r.id == run).unwrap();
    assert_eq!(r.status, "finished");
    assert_eq!(r.states.get("Done"), Some(&20));
    a.close().await;
    b.close().await;
}

/// On SQLite a spawned worker holds the work lock: a `sync` meanwhile is refused, naming
/// the lock; after `shutdown` it works, and a worker whose adapter cannot be built ends
/// with that error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_spawned_worker_holds_the_work_lock() {
    let dir = tempfile::tempdir().unwrap();
    let portal = Arc::new(MemoryPortal::new());
    let app = Bulwark::builder()
        .database(dir.path().join("b.db").display().to_string())
        .portal("mine", portal.clone() as Arc<dyn PortalAdapter>)
        .adapter("refuses", |ep: &EndpointConfig| {
            Err(bulwark_workflows::adapter::AdapterError::Config(format!(
                "{}: no credentials",
                ep.id
            )))
        })
        .open()
        .await
        .unwrap();
    stage(&app, &items(30, 0)).await;
    let eps = endpoints(3);
    let options = SyncOptions {
        batch_size: 10,
        ..Default::default()
    };
    let worker = app.spawn_worker(eps.clone(), options.clone(), fast());
    let mut events = worker.subscribe();
    let run = app
        .enqueue(&eps, &options)
        .await
        .unwrap()
        .unwrap()
        .run
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Ok(ProgressEvent::RunFinished { run: r, .. })) if r == run => break,
            Ok(Ok(_)) => {}
            other => panic!("no RunFinished: {other:?}"),
        }
    }
    let err = app
        .sync(&eps, &options, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("worker-lock"), "{err}");
    assert!(!worker.is_finished());
    let report = worker.shutdown().await.unwrap();
    assert_eq!(report.uploads, 9);
    assert_eq!(portal.applied(), 9);
    stage(&app, &items(30, 1)).await;
    let again = app.sync(&eps, &options, None).await.unwrap();
    assert_eq!(again.uploads, 9, "every item changed");

    let bad = vec![EndpointConfig {
        id: "locked-out".into(),
        adapter: "refuses".into(),
        ..Default::default()
    }];
    let err = app
        .spawn_worker(bad, options, fast())
        .join()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("locked-out: no credentials"), "{err}");
    app.close().await;
}

/// A portal that takes a while per upload (a real one takes far longer).
struct SlowPortal(Arc<MemoryPortal>);

#[async_trait::async_trait]
impl PortalAdapter for SlowPortal {
    async fn upload(
        &self,
        batch: &bulwark_workflows::catalog::Batch,
    ) -> bulwark_workflows::adapter::AdapterResult<bulwark_workflows::adapter::Receipt> {
        tokio::time::sleep(Duration::from_millis(15)).await;
        self.0.upload(batch).await
    }
    async fn verify(
        &self,
        batch: &bulwark_workflows::catalog::Batch,
        receipt: &bulwark_workflows::adapter::Receipt,
    ) -> bulwark_workflows::adapter::AdapterResult<bulwark_workflows::adapter::Verification> {
        self.0.verify(batch, receipt).await
    }
    async fn probe(
        &self,
        endpoint: &str,
        key: uuid::Uuid,
    ) -> bulwark_workflows::adapter::AdapterResult<Option<bulwark_workflows::adapter::Receipt>>
    {
        self.0.probe(endpoint, key).await
    }
}

/// Two workers with room for thousands each share a run of 60 endpoints whose calls they
/// can only make two at a time: each claims what it can drive soon (a chunk), not the
/// whole run, so both finish a fair part of it. Before claims were chunked, whichever
/// worker claimed first took all 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_claim_in_chunks_and_share_a_run() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "chunks");
    let portal = Arc::new(MemoryPortal::new());
    let slow = Arc::new(SlowPortal(portal.clone()));
    let adapter: Arc<dyn PortalAdapter> = slow.clone();
    let open = |worker: &'static str| open_as(&db, adapter.clone(), worker);
    let (a, b) = (open("chunk-a").await, open("chunk-b").await);
    stage(&a, &items(40, 0)).await;
    let eps = endpoints(60);
    let options = SyncOptions {
        batch_size: 20,
        max_in_flight: 2,
        ..Default::default()
    };
    assert_eq!(bulwark_workflows::app::auto_claim_chunk(2), 16);
    let wa = a.spawn_worker(eps.clone(), options.clone(), fast());
    let wb = b.spawn_worker(eps.clone(), options.clone(), fast());
    let (ea, eb) = (wa.subscribe(), wb.subscribe());
    tokio::time::sleep(Duration::from_millis(300)).await; // both are listening
    let run = a
        .enqueue(&eps, &options)
        .await
        .unwrap()
        .unwrap()
        .run
        .unwrap();
    let ((fa, _), (fb, _)) = tokio::join!(finished_until(ea, run), finished_until(eb, run));
    assert_eq!(fa + fb, 60);
    assert!(
        fa >= 15 && fb >= 15,
        "each worker finishes a fair part of the run: {fa} and {fb} of 60"
    );
    assert_eq!((portal.applied(), portal.duplicates()), (120, 0));
    wa.shutdown().await.unwrap();
    wb.shutdown().await.unwrap();
    if let bulwark_engine::Backend::Postgres(pg) = a.backend() {
        pg.drop_schema().await.unwrap();
    }
}

/// A rolling deploy on PostgreSQL: a worker still on the old configuration (it does not
/// know endpoints 6–10, and reaches endpoint 1 with other settings) meets a run planned
/// with the new one. It drives only what its configuration matches and leaves the rest
/// untouched (nothing journaled, nothing sent, no endpoint tripped); a worker on the new
/// configuration finishes the run. Before fingerprints, the old worker tripped every
/// endpoint it did not know ("endpoint … is not configured").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_another_configuration_leaves_those_syncs_alone() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let db = bulwark_tests::pg_schema_url(&base, "rolling");
    let portal = Arc::new(MemoryPortal::new());
    let adapter: Arc<dyn PortalAdapter> = portal.clone();
    let open = |worker: &'static str| open_as(&db, adapter.clone(), worker);
    let (new, old) = (open("new-config").await, open("old-config").await);
    stage(&new, &items(30, 0)).await;
    let new_eps = endpoints(10);
    let mut old_eps = endpoints(5);
    old_eps[0]
        .settings
        .insert("base_url".into(), "https://old.example".into());
    assert_ne!(old_eps[0].fingerprint(), new_eps[0].fingerprint());
    assert_eq!(old_eps[1].fingerprint(), new_eps[1].fingerprint());
    let options = SyncOptions {
        batch_size: 10,
        ..Default::default()
    };
    let run = new
        .enqueue(&new_eps, &options)
        .await
        .unwrap()
        .unwrap()
        .run
        .unwrap();
    let wo = old.spawn_worker(old_eps.clone(), options.clone(), fast());
    let store = new.store();
    let states = || async {
        store
            .workflows(Some(run), None)
            .await
            .unwrap()
            .into_iter()
            .map(|w| (w.subject, (w.status, w.seq)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = states().await;
        if (2..=5).all(|i| s[&format!("shop-{i:03}")].0 == "Done") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a few more claims
    let s = states().await;
    for i in [1, 6, 7, 8, 9, 10] {
        assert_eq!(
            s[&format!("shop-{i:03}")],
            ("Pending".to_string(), 0),
            "untouched: {s:?}"
        );
    }
    assert!(
        store.circuits().await.unwrap().is_empty(),
        "nothing tripped"
    );
    assert_eq!(portal.applied(), 4 * 3, "only endpoints 2-5 were written");
    let report = wo.shutdown().await.unwrap();
    assert_eq!(report.unfinished, 0, "{report:?}");

    let wn = new.spawn_worker(new_eps.clone(), options.clone(), fast());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !states().await.values().all(|(status, _)| status == "Done") {
        assert!(std::time::Instant::now() < deadline, "{:?}", states().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wn.shutdown().await.unwrap();
    assert_eq!((portal.applied(), portal.duplicates()), (10 * 3, 0));
    assert!(store.circuits().await.unwrap().is_empty());
    if let bulwark_engine::Backend::Postgres(pg) = new.backend() {
        pg.drop_schema().await.unwrap();
    }
}

/// A portal that ignores idempotency keys (or says it honours them), whose uploads wait
/// for the test's go-ahead, recording which endpoints were sent something.
struct GatedPortal {
    inner: Arc<MemoryPortal>,
    dedup: bool,
    gate: tokio::sync::Semaphore,
    sent: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl PortalAdapter for GatedPortal {
    fn deduplicates(&self) -> bool {
        self.dedup
    }
    async fn upload(
        &self,
        batch: &bulwark_workflows::catalog::Batch,
    ) -> bulwark_workflows::adapter::AdapterResult<bulwark_workflows::adapter::Receipt> {
        self.sent.lock().unwrap().push(batch.endpoint.clone());
        let _go = self.gate.acquire().await.unwrap();
        self.inner.upload(batch).await
    }
    async fn verify(
        &self,
        batch: &bulwark_workflows::catalog::Batch,
        receipt: &bulwark_workflows::adapter::Receipt,
    ) -> bulwark_workflows::adapter::AdapterResult<bulwark_workflows::adapter::Verification> {
        self.inner.verify(batch, receipt).await
    }
    async fn probe(
        &self,
        endpoint: &str,
        key: uuid::Uuid,
    ) -> bulwark_workflows::adapter::AdapterResult<Option<bulwark_workflows::adapter::Receipt>>
    {
        self.inner.probe(endpoint, key).await
    }
}

/// An upload journaled by a worker, then kept waiting for a call slot while another
/// worker takes the workflow (a host whose clock runs ahead sees the lease end early; the
/// waiting worker's own fence still counts time left): against a platform without
/// idempotency keys it is not sent, because the lease is confirmed with the database
/// right before. Against one with keys (a repeat would be deduplicated) no query is
/// spent, and the upload goes out — which is what the first case would do without the
/// confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_without_idempotency_keys_is_not_sent_once_the_database_says_the_lease_is_gone() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    for dedup in [false, true] {
        let db = bulwark_tests::pg_schema_url(&base, "confirm");
        let portal = Arc::new(GatedPortal {
            inner: Arc::new(MemoryPortal::new()),
            dedup,
            gate: tokio::sync::Semaphore::new(0),
            sent: Default::default(),
        });
        let worker = if dedup { "keys-a" } else { "nokeys-a" };
        let a = open_as(&db, portal.clone(), worker).await;
        stage(&a, &items(10, 0)).await;
        let eps = endpoints(2);
        let options = SyncOptions {
            batch_size: 10,
            max_in_flight: 1,
            ..Default::default()
        };
        let wa = a.spawn_worker(
            eps.clone(),
            options.clone(),
            WorkerOptions {
                lease_ms: 60_000,
                ..fast()
            },
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.enqueue(&eps, &options).await.unwrap().unwrap();
        // One upload is on the wire (holding the only slot); the other waits for it.
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while portal.sent.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < until, "no upload started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = portal.sent.lock().unwrap()[0].clone();
        // Another worker takes both workflows long before their 60 s lease ends.
        let bulwark_engine::Backend::Postgres(pg) = a.backend() else {
            panic!("postgres");
        };
        let taken = pg
            .claim(&bulwark_engine::store::ClaimRequest {
                owner: "thief".into(),
                kind: "endpoint_sync".into(),
                run: None,
                lease_ms: 600_000,
                limit: None,
                skip: Vec::new(),
                dead_owners: vec![worker.into()],
                held: false,
            })
            .await
            .unwrap();
        assert_eq!(taken.len(), 2);
        portal.gate.add_permits(10);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let sent = portal.sent.lock().unwrap().clone();
        if dedup {
            assert_eq!(sent.len(), 2, "with keys the waiting upload goes: {sent:?}");
        } else {
            assert_eq!(sent, vec![first], "only the upload already on the wire");
        }
        wa.shutdown().await.unwrap();
        pg.drop_schema().await.unwrap();
    }
}
