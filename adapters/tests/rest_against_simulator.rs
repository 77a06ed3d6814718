//! `RestAdapter` against `PortalSimulator` over real loopback HTTP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::Path as UrlPath;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bulwark_adapters::rest::RestAdapter;
use bulwark_adapters::simulator::{self, Fault, SimConfig, SimHandle};
use bulwark_workflows::adapter::{AdapterError, EndpointConfig, PortalAdapter, Verification};
use bulwark_workflows::catalog::{Batch, Item, PriceTier, batch_key, payload_hash};
use uuid::Uuid;

const TOKEN_VAR: &str = "BULWARK_ADAPTERS_TEST_TOKEN";

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn items(n: usize, seed: i64) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            sku: format!("SKU-{i:05}"),
            qty: seed + i as i64,
            tiers: vec![
                PriceTier {
                    min_qty: 1,
                    price_minor: 1000 + seed,
                },
                PriceTier {
                    min_qty: 10,
                    price_minor: 900 + seed,
                },
            ],
        })
        .collect()
}

fn batch(endpoint: &str, index: u32, items: Vec<Item>) -> Batch {
    let key = batch_key(endpoint, 1, index, &payload_hash(&items), 0);
    Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: endpoint.into(),
        snapshot: 1,
        index,
        key,
        items,
    }
}

fn config(id: &str, base_url: String, extra: &[(&str, &str)]) -> EndpointConfig {
    let mut settings = HashMap::from([("base_url".to_owned(), base_url)]);
    for (k, v) in extra {
        settings.insert((*k).to_owned(), (*v).to_owned());
    }
    EndpointConfig {
        policy: None,
        id: id.into(),
        adapter: "rest".into(),
        settings,
    }
}

fn adapter(sim: &SimHandle, id: &str) -> Arc<dyn PortalAdapter> {
    bulwark_adapters::default_registry()
        .build(&config(id, sim.base_url(id), &[]))
        .unwrap()
}

#[tokio::test]
async fn upload_then_verify_round_trip() {
    let sim = simulator::start(SimConfig::default(), loopback())
        .await
        .unwrap();
    let a = adapter(&sim, "ep-0001");
    let b = batch("ep-0001", 0, items(50, 3));
    let receipt = a.upload(&b).await.unwrap();
    assert!(receipt.id.starts_with("r-"), "{receipt:?}");
    assert_eq!(
        a.verify(&b, &receipt).await.unwrap(),
        Verification::Verified
    );

    // Another endpoint on the same server is independent: nothing there yet.
    let other = adapter(&sim, "ep-0002");
    let b2 = batch("ep-0002", 0, items(3, 3));
    match other.verify(&b2, &receipt).await.unwrap() {
        Verification::Mismatch { details } => {
            assert!(details.contains("3 of 3 items differ"), "{details}");
            assert!(details.contains("shown absent"), "{details}");
        }
        v => panic!("expected mismatch, got {v:?}"),
    }

    // Absolute values: a newer batch for the same SKUs overwrites.
    let newer = batch("ep-0001", 0, items(50, 7));
    let r2 = a.upload(&newer).await.unwrap();
    assert_ne!(r2, receipt);
    assert_eq!(a.verify(&newer, &r2).await.unwrap(), Verification::Verified);
    assert!(matches!(
        a.verify(&b, &receipt).await.unwrap(),
        Verification::Mismatch { .. }
    ));

    let stats = sim.stats();
    assert_eq!(stats.uploads_received, 2);
    assert_eq!(stats.batches_applied, 2);
    assert_eq!(stats.duplicates_applied, 0);
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn duplicate_upload_applies_once_durably() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sim.db");
    let cfg = SimConfig {
        db_path: Some(db.clone()),
        ..SimConfig::default()
    };
    let sim = simulator::start(cfg.clone(), loopback()).await.unwrap();
    let a = adapter(&sim, "ep-dup");
    let b0 = batch("ep-dup", 0, items(10, 1));
    let b1 = batch("ep-dup", 1, items(10, 2));

    let r0 = a.upload(&b0).await.unwrap();
    let again = a.upload(&b0).await.unwrap();
    assert_eq!(
        r0, again,
        "a duplicate delivery returns the original receipt"
    );
    // Concurrent duplicates of another key.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let a = a.clone();
        let b1 = b1.clone();
        tasks.push(tokio::spawn(async move { a.upload(&b1).await.unwrap() }));
    }
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.push(t.await.unwrap());
    }
    assert!(receipts.windows(2).all(|w| w[0] == w[1]), "{receipts:?}");

    let stats = sim.stats();
    assert_eq!(stats.uploads_received, 10);
    assert_eq!(stats.batches_applied, 2);
    assert_eq!(stats.deduplicated, 8);
    assert_eq!(stats.duplicates_applied, 0);

    // The durable record agrees (readable while the simulator runs: writes were committed
    // before the responses).
    let counts = simulator::read_counts(&db).await.unwrap();
    assert_eq!(counts.deliveries, 10);
    assert_eq!(counts.applied, 2);
    assert_eq!(counts.distinct_applied_pairs, 2);
    assert_eq!(counts.duplicate_pairs, 0);
    sim.shutdown().await.unwrap();

    // A restarted simulator reloads the applied index and still de-duplicates.
    let sim = simulator::start(cfg, loopback()).await.unwrap();
    let a = adapter(&sim, "ep-dup");
    assert_eq!(a.probe("ep-dup", b0.key).await.unwrap(), Some(r0.clone()));
    assert_eq!(a.upload(&b0).await.unwrap(), r0);
    assert_eq!(sim.stats().batches_applied, 0);
    assert_eq!(sim.stats().deduplicated, 1);
    sim.shutdown().await.unwrap();
    let counts = simulator::read_counts(&db).await.unwrap();
    assert_eq!(counts.deliveries, 11);
    assert_eq!(counts.applied, 2);
    assert_eq!(counts.duplicate_pairs, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_endpoints_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("many.db");
    let sim = simulator::start(
        SimConfig {
            db_path: Some(db.clone()),
            ..SimConfig::default()
        },
        loopback(),
    )
    .await
    .unwrap();
    let registry = bulwark_adapters::default_registry();
    let mut tasks = Vec::new();
    for e in 0..100 {
        let id = format!("ep-{e:04}");
        let a = registry
            .build(&config(&id, sim.base_url(&id), &[]))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            for i in 0..5u32 {
                let b = batch(&id, i, items(5, i64::from(i)));
                let r = a.upload(&b).await.unwrap();
                // Every batch is also re-sent once, as after a lost acknowledgement.
                assert_eq!(a.upload(&b).await.unwrap(), r);
                assert_eq!(a.verify(&b, &r).await.unwrap(), Verification::Verified);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = sim.stats();
    assert_eq!(stats.batches_applied, 500);
    assert_eq!(stats.uploads_received, 1000);
    assert_eq!(stats.duplicates_applied, 0);
    sim.shutdown().await.unwrap();
    let counts = simulator::read_counts(&db).await.unwrap();
    assert_eq!(counts.deliveries, 1000);
    assert_eq!(counts.applied, 500);
    assert_eq!(counts.distinct_applied_pairs, 500);
    assert_eq!(counts.duplicate_pairs, 0);
}

#[tokio::test]
async fn probe_before_and_after_upload() {
    let sim = simulator::start(SimConfig::default(), loopback())
        .await
        .unwrap();
    let a = adapter(&sim, "ep-probe");
    let b = batch("ep-probe", 3, items(2, 0));
    assert_eq!(a.probe("ep-probe", b.key).await.unwrap(), None);
    let r = a.upload(&b).await.unwrap();
    assert_eq!(a.probe("ep-probe", b.key).await.unwrap(), Some(r));
    assert_eq!(a.probe("ep-probe", Uuid::new_v4()).await.unwrap(), None);
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn reject_endpoint_maps_to_rejected() {
    let cfg = SimConfig {
        profiles: HashMap::from([("ep-bad".to_owned(), Fault::Reject)]),
        ..SimConfig::default()
    };
    let sim = simulator::start(cfg, loopback()).await.unwrap();
    let a = adapter(&sim, "ep-bad");
    let b = batch("ep-bad", 0, items(2, 0));
    match a.upload(&b).await {
        Err(AdapterError::Rejected(msg)) => {
            assert!(
                msg.contains("ep-bad") && msg.contains("upload") && msg.contains("422"),
                "{msg}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(a.probe("ep-bad", b.key).await.unwrap(), None);
    // Other endpoints stay healthy.
    let good = adapter(&sim, "ep-good");
    good.upload(&batch("ep-good", 0, items(2, 0)))
        .await
        .unwrap();
    let stats = sim.stats();
    assert_eq!(
        (
            stats.rejected,
            stats.batches_applied,
            stats.uploads_received
        ),
        (1, 1, 2)
    );
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn corrupt_endpoint_maps_to_mismatch() {
    let cfg = SimConfig {
        default_fault: Fault::Corrupt,
        ..SimConfig::default()
    };
    let sim = simulator::start(cfg, loopback()).await.unwrap();
    let a = adapter(&sim, "ep-corrupt");
    let b = batch("ep-corrupt", 0, items(8, 10));
    let r = a.upload(&b).await.unwrap();
    match a.verify(&b, &r).await.unwrap() {
        Verification::Mismatch { details } => {
            assert!(details.contains("8 of 8 items differ"), "{details}");
            assert!(
                details.contains("SKU-00000: expected qty=10 tiers=[1@1010,10@910], shown qty=11"),
                "{details}"
            );
            assert!(
                !details.contains("SKU-00005"),
                "at most five SKUs named: {details}"
            );
            assert!(details.contains("and 3 more"), "{details}");
        }
        v => panic!("expected mismatch, got {v:?}"),
    }
    sim.shutdown().await.unwrap();
}

#[tokio::test]
async fn flaky_endpoint_produces_rate_limit_with_retry_after() {
    let cfg = SimConfig {
        default_fault: Fault::Flaky { p_error: 1.0 },
        ..SimConfig::default()
    };
    let sim = simulator::start(cfg, loopback()).await.unwrap();
    let a = adapter(&sim, "ep-flaky");
    let key = Uuid::new_v4();
    let (mut saw_429, mut saw_transient) = (false, false);
    for _ in 0..200 {
        match a.probe("ep-flaky", key).await {
            Err(AdapterError::RateLimited { retry_after_ms, .. }) => {
                assert_eq!(retry_after_ms, 1000);
                saw_429 = true;
            }
            Err(AdapterError::Transient(_)) => saw_transient = true,
            other => panic!("p_error=1 must always fail, got {other:?}"),
        }
        if saw_429 && saw_transient {
            break;
        }
    }
    assert!(saw_429 && saw_transient);
    assert!(sim.stats().faults_injected > 0);
    sim.shutdown().await.unwrap();
}

/// A scripted server: `/s/{status}/...` answers every request with `status`; 429 carries
/// `Retry-After: 7`; `/s/4290/...` is a 429 without `Retry-After`; `/garbage/...` answers
/// 200 with an undecodable body; `/echo/...` answers 422 quoting the Authorization header.
async fn scripted_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    async fn status(UrlPath((code, _rest)): UrlPath<(u16, String)>) -> axum::response::Response {
        match code {
            4290 => (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response(),
            429 => (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "7")],
                "slow down",
            )
                .into_response(),
            c => (StatusCode::from_u16(c).unwrap(), "x".repeat(1000)).into_response(),
        }
    }
    async fn echo(headers: HeaderMap) -> axum::response::Response {
        let auth = headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("bad request from {auth}"),
        )
            .into_response()
    }
    let app = axum::Router::new()
        .route("/s/{code}/{*rest}", axum::routing::any(status))
        .route(
            "/garbage/{*rest}",
            axum::routing::any(|| async { "not json" }),
        )
        .route("/echo/{*rest}", axum::routing::any(echo));
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, task)
}

#[tokio::test]
async fn status_classification_over_http() {
    let (addr, server) = scripted_server().await;
    let b = batch("ep-s", 0, items(1, 0));
    let build = |path: &str| {
        RestAdapter::new(&config(
            "ep-s",
            format!("http://{addr}{path}"),
            &[("timeout_ms", "2000")],
        ))
        .unwrap()
    };

    match build("/s/429").upload(&b).await {
        Err(AdapterError::RateLimited {
            retry_after_ms,
            message,
        }) => {
            assert_eq!(retry_after_ms, 7000);
            assert!(
                message.contains("ep-s") && message.contains("upload"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        build("/s/4290").probe("ep-s", b.key).await,
        Err(AdapterError::RateLimited {
            retry_after_ms: 1000,
            ..
        })
    ));
    match build("/s/409").upload(&b).await {
        Err(AdapterError::Rejected(m)) => assert!(m.chars().count() < 300, "excerpt bounded: {m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        build("/s/400").verify(&b, &dummy()).await,
        Err(AdapterError::Rejected(_))
    ));
    assert!(matches!(
        build("/s/401").upload(&b).await,
        Err(AdapterError::Auth(_))
    ));
    assert!(matches!(
        build("/s/403").probe("ep-s", b.key).await,
        Err(AdapterError::Auth(_))
    ));
    assert!(matches!(
        build("/s/404").upload(&b).await,
        Err(AdapterError::Config(_))
    ));
    assert!(matches!(
        build("/s/500").upload(&b).await,
        Err(AdapterError::Transient(_))
    ));
    assert!(matches!(
        build("/s/503").verify(&b, &dummy()).await,
        Err(AdapterError::Transient(_))
    ));
    assert!(matches!(
        build("/garbage").upload(&b).await,
        Err(AdapterError::Transient(_))
    ));
    server.abort();

    // Nothing listens any more: connection errors are transient.
    match build("/s/200").upload(&b).await {
        Err(AdapterError::Transient(m)) => {
            assert!(m.contains("ep-s") && m.contains("upload"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn timeout_is_transient() {
    let sim = simulator::start(
        SimConfig {
            latency_ms: 500,
            ..SimConfig::default()
        },
        loopback(),
    )
    .await
    .unwrap();
    let a = RestAdapter::new(&config(
        "ep-slow",
        sim.base_url("ep-slow"),
        &[("timeout_ms", "50")],
    ))
    .unwrap();
    match a.probe("ep-slow", Uuid::new_v4()).await {
        Err(AdapterError::Transient(m)) => assert!(m.contains("timed out"), "{m}"),
        other => panic!("{other:?}"),
    }
    sim.shutdown().await.unwrap();
}

fn dummy() -> bulwark_workflows::adapter::Receipt {
    bulwark_workflows::adapter::Receipt { id: "r".into() }
}

/// Runs this test binary again with the token variable set (setting the environment of
/// the running process needs `unsafe`, which the workspace forbids), executing
/// [`bearer_token_child`].
#[test]
fn bearer_token_is_sent_and_never_leaks() {
    if std::env::var_os(TOKEN_VAR).is_some() {
        return; // we are the child
    }
    let token = format!("tok-{}", Uuid::new_v4().simple());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "bearer_token_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TOKEN_VAR, &token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child did not run:\n{stdout}");
}

#[test]
fn bearer_token_child() {
    let Ok(token) = std::env::var(TOKEN_VAR) else {
        return; // only meaningful when launched by `bearer_token_is_sent_and_never_leaks`
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sim = simulator::start(
            SimConfig {
                required_token: Some(token.clone()),
                ..SimConfig::default()
            },
            loopback(),
        )
        .await
        .unwrap();
        assert!(!format!("{:?}", sim).contains(&token));

        let registry = bulwark_adapters::default_registry();
        let with_token = config(
            "ep-auth",
            sim.base_url("ep-auth"),
            &[("token_env", TOKEN_VAR)],
        );
        let a = RestAdapter::new(&with_token).unwrap();
        let dbg = format!("{a:?} {a:#?}");
        assert!(!dbg.contains(&token), "token in Debug: {dbg}");
        assert!(dbg.contains("redacted"), "{dbg}");

        // The token is sent: the simulator accepts the requests.
        let b = batch("ep-auth", 0, items(3, 0));
        let r = a.upload(&b).await.unwrap();
        assert_eq!(a.verify(&b, &r).await.unwrap(), Verification::Verified);
        let via_registry = registry.build(&with_token).unwrap();
        assert_eq!(via_registry.probe("ep-auth", b.key).await.unwrap(), Some(r));

        // Without the token: Auth, and no error mentions the token.
        let without = registry
            .build(&config("ep-auth", sim.base_url("ep-auth"), &[]))
            .unwrap();
        let mut errors = Vec::new();
        match without.upload(&b).await {
            Err(e @ AdapterError::Auth(_)) => errors.push(e),
            other => panic!("expected Auth, got {other:?}"),
        }
        sim.shutdown().await.unwrap();

        // Errors produced while the token is in use never quote it, even when the server
        // echoes the Authorization header back, or on connection failures.
        let (addr, server) = scripted_server().await;
        let echo = RestAdapter::new(&config(
            "ep-auth",
            format!("http://{addr}/echo"),
            &[("token_env", TOKEN_VAR)],
        ))
        .unwrap();
        match echo.upload(&b).await {
            Err(e @ AdapterError::Rejected(_)) => {
                assert!(e.to_string().contains("Bearer <redacted>"), "{e}");
                errors.push(e);
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        for path in ["/s/401", "/s/429", "/s/500", "/s/404", "/garbage"] {
            let a = RestAdapter::new(&config(
                "ep-auth",
                format!("http://{addr}{path}"),
                &[("token_env", TOKEN_VAR)],
            ))
            .unwrap();
            errors.push(a.upload(&b).await.unwrap_err());
            errors.push(a.verify(&b, &dummy()).await.unwrap_err());
        }
        server.abort();
        let dead = RestAdapter::new(&config(
            "ep-auth",
            "http://127.0.0.1:9/ep/x".into(),
            &[("token_env", TOKEN_VAR)],
        ))
        .unwrap();
        errors.push(dead.probe("ep-auth", b.key).await.unwrap_err());
        for e in &errors {
            let text = format!("{e} {e:?}");
            assert!(!text.contains(&token), "token leaked: {text}");
        }
        println!("checked {} errors", errors.len());
    });
}

/// Throughput smoke test (run with `--ignored --nocapture`): durable uploads per second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput measurement"]
async fn throughput_durable_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tp.db");
    let sim = simulator::start(
        SimConfig {
            db_path: Some(db.clone()),
            ..SimConfig::default()
        },
        loopback(),
    )
    .await
    .unwrap();
    let registry = bulwark_adapters::default_registry();
    let (endpoints, per) = (500u32, 20u32);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for e in 0..endpoints {
        let id = format!("ep-{e:05}");
        let a = registry
            .build(&config(&id, sim.base_url(&id), &[]))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                a.upload(&batch(&id, i, items(20, i64::from(i))))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = u64::from(endpoints * per);
    println!(
        "{n} durable uploads in {secs:.2}s = {:.0}/s",
        n as f64 / secs
    );
    sim.shutdown().await.unwrap();
    let counts = simulator::read_counts(&db).await.unwrap();
    assert_eq!(counts.applied, n);
    assert_eq!(counts.duplicate_pairs, 0);
}

#[tokio::test]
async fn retry_after_on_a_503_is_read_in_seconds_and_http_date_forms() {
    let sim = simulator::start(SimConfig::default(), loopback())
        .await
        .unwrap();
    let a = adapter(&sim, "ep-0001");
    let b = batch("ep-0001", 0, items(3, 1));
    sim.state().set_fault(
        "ep-0001",
        Fault::Unavailable {
            retry_after: "2".into(),
            times: 1,
        },
    );
    match a.upload(&b).await {
        Err(AdapterError::Unavailable {
            retry_after_ms,
            message,
        }) => {
            assert_eq!(retry_after_ms, 2000);
            assert!(message.contains("HTTP 503"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let at = (chrono::Utc::now() + chrono::Duration::seconds(5))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    sim.state().set_fault(
        "ep-0001",
        Fault::Unavailable {
            retry_after: at,
            times: 1,
        },
    );
    match a.upload(&b).await {
        Err(AdapterError::Unavailable { retry_after_ms, .. }) => {
            assert!(
                (3_000..=5_000).contains(&retry_after_ms),
                "{retry_after_ms}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Healthy again: the upload lands.
    a.upload(&b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_waits_out_a_503_retry_after_then_finishes() {
    use bulwark_workflows::app::Bulwark;
    use bulwark_workflows::staging::SealStats;
    use bulwark_workflows::sync::SyncOptions;
    let sim = simulator::start(SimConfig::default(), loopback())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = Bulwark::open(
        dir.path().join("b.db"),
        bulwark_adapters::default_registry(),
    )
    .await
    .unwrap();
    let staging = app.staging().clone();
    let id = staging.begin_snapshot("t").await.unwrap();
    staging.write_page(id, &items(5, 1), &[]).await.unwrap();
    staging.seal(id, SealStats::default()).await.unwrap();
    sim.state().set_fault(
        "ep-0001",
        Fault::Unavailable {
            retry_after: "1".into(),
            times: 1,
        },
    );
    let eps = vec![config("ep-0001", sim.base_url("ep-0001"), &[])];
    let started = std::time::Instant::now();
    let report = app.sync(&eps, &SyncOptions::default(), None).await.unwrap();
    assert_eq!(report.by_status.get("Done"), Some(&1), "{report:?}");
    // The default first backoff is 100-200 ms; the endpoint asked for 1 s.
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(950),
        "retried after {:?}, before the endpoint's Retry-After",
        started.elapsed()
    );
    assert_eq!(
        sim.state()
            .endpoint_report("ep-0001")
            .await
            .applied_batches
            .len(),
        1
    );
    app.close().await;
}
