//! Resilience against the portal simulator over real HTTP on loopback: flaky endpoints
//! (timeouts, 500s, resets, 429 with Retry-After) end Done with every batch applied exactly
//! once, broken endpoints trip after exactly three failed validations with one alert each,
//! and a slow endpoint does not delay the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_adapters::simulator::{self, Fault, SimConfig, SimHandle};
use bulwark_tests::crash_portal::seed_snapshot;
use bulwark_workflows::adapter::EndpointConfig;
use bulwark_workflows::app::{Bulwark, SyncProgress};
use bulwark_workflows::endpoint_sync::{State, SyncPolicy};
use bulwark_workflows::sync::SyncOptions;

fn id(i: u32) -> String {
    format!("ep-{i:05}")
}

fn endpoints(sim: &SimHandle, n: u32, timeout_ms: u64) -> Vec<EndpointConfig> {
    (1..=n)
        .map(|i| EndpointConfig {
            id: id(i),
            adapter: "rest".into(),
            settings: [
                ("base_url".to_string(), sim.base_url(&id(i))),
                ("timeout_ms".to_string(), timeout_ms.to_string()),
            ]
            .into(),
            policy: None,
        })
        .collect()
}

fn options(batch_size: u32, max_in_flight: usize) -> SyncOptions {
    SyncOptions {
        batch_size,
        max_in_flight,
        policy: SyncPolicy {
            max_attempts: 8,
            backoff_base_ms: 20,
            backoff_max_ms: 400,
            cooldown_ms: 600_000,
            ..SyncPolicy::default()
        },
        ..SyncOptions::default()
    }
}

/// A Bulwark on a fresh SQLite database with a sealed snapshot of 300 SKUs, and a
/// simulator whose endpoints misbehave as `profiles` says.
async fn setup(profiles: HashMap<String, Fault>) -> (tempfile::TempDir, Bulwark, SimHandle) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, 300).await.unwrap();
    let sim = simulator::start(
        SimConfig {
            profiles,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let app = Bulwark::open(&db, bulwark_adapters::default_registry())
        .await
        .unwrap();
    (dir, app, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_endpoints_finish_exactly_once_and_broken_ones_trip_after_three_failures() {
    const N: u32 = 200;
    // 10 % flaky (every fourth request fails, in one of five ways), 1 % broken: one
    // stores wrong values (its verifications fail), one rejects every upload.
    let flaky: Vec<String> = (1..=N).filter(|i| i % 10 == 3).map(id).collect();
    let broken = [id(50), id(150)];
    let mut profiles: HashMap<String, Fault> = flaky
        .iter()
        .map(|e| (e.clone(), Fault::Flaky { p_error: 0.25 }))
        .collect();
    profiles.insert(broken[0].clone(), Fault::Corrupt);
    profiles.insert(broken[1].clone(), Fault::Reject);
    let (_dir, app, sim) = setup(profiles).await;
    // A client timeout shorter than the simulator's stalls: those become timeouts.
    let eps = endpoints(&sim, N, 700);
    let report = app.sync(&eps, &options(100, 64), None).await.unwrap();
    assert_eq!(
        report.by_status.get("Done"),
        Some(&(N as usize - 2)),
        "{report:?}"
    );
    assert_eq!(report.by_status.get("Tripped"), Some(&2), "{report:?}");
    assert!(
        report.refused.is_empty() && report.unfinished == 0,
        "{report:?}"
    );
    let stats = sim.stats();
    assert!(
        stats.faults_injected >= 20,
        "the flaky endpoints did fail: {stats:?}"
    );
    assert_eq!(stats.duplicates_applied, 0, "{stats:?}");

    // Every healthy and flaky endpoint shows each of its 3 batches applied exactly once.
    for i in 1..=N {
        let e = id(i);
        if broken.contains(&e) {
            continue;
        }
        let r = sim.state().endpoint_report(&e).await;
        let counts: Vec<u32> = r.applied_batches.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [1, 1, 1], "{e}: {r:?}");
    }
    let store = app.store();
    let rows = store.workflows(None, Some("endpoint_sync")).await.unwrap();
    let alerts = store.alerts(1000).await.unwrap();
    for e in &broken {
        // Tripped after exactly three failed validations: three uploads reached it.
        let w = rows.iter().find(|w| &w.subject == e).unwrap();
        let state: State = serde_json::from_str(&w.state_json).unwrap();
        assert!(
            matches!(state, State::Tripped { failures: 3, .. }),
            "{e}: {state:?}"
        );
        assert_eq!(sim.state().endpoint_report(e).await.deliveries, 3, "{e}");
        let mine: Vec<_> = alerts.iter().filter(|a| &a.subject == e).collect();
        assert_eq!(mine.len(), 1, "{e}: one alert: {mine:?}");
        assert_eq!(mine[0].kind, "circuit_opened");
        let c = store
            .circuits()
            .await
            .unwrap()
            .into_iter()
            .find(|c| &c.subject == e)
            .expect("a circuit row");
        assert!(c.open && c.failures == 3 && c.opens == 1, "{c:?}");
    }
    // No healthy or flaky endpoint's circuit opened; the run says it finished with two
    // tripped endpoints.
    assert!(
        alerts
            .iter()
            .filter(|a| a.kind == "circuit_opened")
            .all(|a| broken.contains(&a.subject)),
        "{alerts:?}"
    );
    let run_alerts: Vec<_> = alerts.iter().filter(|a| a.kind == "run_tripped").collect();
    assert_eq!(run_alerts.len(), 1, "{run_alerts:?}");
    assert!(
        run_alerts[0].message.contains("2 of 200"),
        "{}",
        run_alerts[0].message
    );
    assert!(app.audit().await.unwrap().findings.is_empty());

    // The next run skips the tripped endpoints (their circuits are open) and sends
    // nothing to anyone else.
    let deliveries_before = sim.stats().uploads_received;
    let again = app.sync(&eps, &options(100, 64), None).await.unwrap();
    assert_eq!(again.by_status.get("Skipped"), Some(&2), "{again:?}");
    assert_eq!(again.by_status.len(), 1, "{again:?}");
    assert_eq!(sim.stats().uploads_received, deliveries_before);
    app.close().await;
    sim.shutdown().await.unwrap();
}

/// Records when each endpoint reached a terminal state.
struct Finishes {
    start: Instant,
    at: Mutex<HashMap<String, Duration>>,
}

impl SyncProgress for Finishes {
    fn started(&self, _: usize) {}
    fn transition(&self, endpoint: &str, _: &State, terminal: bool) {
        if terminal {
            self.at
                .lock()
                .unwrap()
                .insert(endpoint.to_string(), self.start.elapsed());
        }
    }
}

/// Sync `n` endpoints (2 batches each), `slow` of them answering every request after
/// `slow_ms`; returns when each endpoint finished.
async fn timed_sync(n: u32, slow: Option<(&str, u64)>) -> HashMap<String, Duration> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    seed_snapshot(&db, 200).await.unwrap();
    let profiles = slow
        .map(|(e, ms)| (e.to_string(), Fault::Slow { latency_ms: ms }))
        .into_iter()
        .collect();
    let sim = simulator::start(
        SimConfig {
            profiles,
            latency_ms: 20,
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let eps = endpoints(&sim, n, 30_000);
    let app = Bulwark::open(&db, bulwark_adapters::default_registry())
        .await
        .unwrap();
    let finishes = Arc::new(Finishes {
        start: Instant::now(),
        at: Mutex::default(),
    });
    // A small global cap, so that a slow endpoint hogging slots would show.
    let report = app
        .sync(&eps, &options(100, 4), Some(finishes.clone()))
        .await
        .unwrap();
    assert_eq!(
        report.by_status.get("Done"),
        Some(&(n as usize)),
        "{report:?}"
    );
    app.close().await;
    sim.shutdown().await.unwrap();
    finishes.at.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_does_not_delay_the_others() {
    const N: u32 = 40;
    let slow = id(7);
    let baseline = timed_sync(N, None).await;
    let with_slow = timed_sync(N, Some((&slow, 1_500))).await;
    let last = |m: &HashMap<String, Duration>| {
        m.iter()
            .filter(|(e, _)| **e != slow)
            .map(|(_, d)| *d)
            .max()
            .unwrap()
    };
    let (base, others) = (last(&baseline), last(&with_slow));
    let slow_took = with_slow[&slow];
    eprintln!(
        "others finished after {others:?} (without the slow endpoint: {base:?}); the slow one after {slow_took:?}"
    );
    // The slow endpoint needs four requests (upload + verify, two batches) of 1.5 s each.
    assert!(slow_took >= Duration::from_millis(6_000), "{slow_took:?}");
    // The others finish in about the time they take without it (≤ 1.5× + 0.5 s of noise),
    // well before the slow one.
    assert!(
        others <= base.mul_f64(1.5) + Duration::from_millis(500),
        "others took {others:?}, {base:?} without the slow endpoint"
    );
    assert!(others < slow_took / 2, "{others:?} vs {slow_took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_back_that_lags_behind_the_write_is_read_again_not_counted() {
    // A platform behind a cache: the first read-back after each write still shows the
    // old value. Each batch's difference is read again and then verified: no re-send, no
    // failed validation, no alert. One that lags twice costs a counted failure and one
    // re-send per batch, and still ends Done (the threshold is three).
    const N: u32 = 6;
    let mut profiles: HashMap<String, Fault> = (1..=N - 1)
        .map(|i| (id(i), Fault::StaleReads { reads: 1 }))
        .collect();
    profiles.insert(id(N), Fault::StaleReads { reads: 2 });
    let (_dir, app, sim) = setup(profiles).await;
    let eps = endpoints(&sim, N, 5_000);
    let report = app.sync(&eps, &options(100, 8), None).await.unwrap();
    assert_eq!(
        report.by_status.get("Done"),
        Some(&(N as usize)),
        "{report:?}"
    );
    for i in 1..N {
        let r = sim.state().endpoint_report(&id(i)).await;
        assert_eq!(r.deliveries, 3, "{}: one upload per batch: {r:?}", id(i));
    }
    let twice = sim.state().endpoint_report(&id(N)).await;
    assert_eq!(twice.deliveries, 6, "a counted failure re-sends: {twice:?}");
    let alerts = app.store().alerts(100).await.unwrap();
    assert!(
        alerts.iter().all(|a| a.kind != "circuit_opened"),
        "{alerts:?}"
    );
    assert!(
        app.store()
            .circuits()
            .await
            .unwrap()
            .iter()
            .all(|c| !c.open),
        "no circuit opened"
    );
    assert!(app.audit().await.unwrap().findings.is_empty());
    app.close().await;
    sim.shutdown().await.unwrap();
}
