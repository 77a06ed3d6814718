//! Alert delivery to a webhook over real HTTP on loopback: alerts raised while the
//! receiver is down are retried and arrive once it is up; a receiver that fails is retried;
//! the URL (which may carry a token) never shows in the recorded errors.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use bulwark_adapters::webhook::WebhookSink;
use bulwark_engine::alerts::{DeliveryOptions, deliver_alerts};
use bulwark_engine::{AlertLevel, Backend, NewAlert, Store};

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<serde_json::Value>>>,
    fail_first: Arc<AtomicU32>,
}

async fn start_receiver(port: u16, r: Receiver) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new().route(
        "/hook/secret-token",
        post(move |Json(body): Json<serde_json::Value>| {
            let r = r.clone();
            async move {
                if r.fail_first
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                r.got.lock().unwrap().push(body);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

async fn raise(store: &dyn Store, n: u32) -> i64 {
    let run = store.create_run("sync", "{}").await.unwrap();
    store
        .finish_run(
            run,
            "finished",
            Some(NewAlert {
                kind: "run_tripped".into(),
                level: AlertLevel::Warn,
                subject: format!("run:{run}"),
                message: format!("alert {n}"),
            }),
        )
        .await
        .unwrap();
    run
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_webhook_after_it_comes_back_and_after_it_fails() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::open(&dir.path().join("a.db").display().to_string())
        .await
        .unwrap();
    let store = backend.store();
    let port = bulwark_tests::free_port();
    let url = format!("http://127.0.0.1:{port}/hook/secret-token");
    let sink = Arc::new(WebhookSink::new(&url, Duration::from_millis(500)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let delivery = tokio::spawn(deliver_alerts(
        store.clone(),
        sink,
        DeliveryOptions {
            retry: Duration::from_millis(100),
            max_attempts: 50,
            since_ms: 0,
            poll: Duration::from_millis(50),
        },
        stop.clone(),
    ));

    // The receiver is down: the alert is attempted, fails, and waits for a retry.
    raise(store.as_ref(), 1).await;
    wait_until("a failed attempt", async || {
        store.alerts(1).await.unwrap()[0].delivery_error.is_some()
    })
    .await;
    let a = &store.alerts(1).await.unwrap()[0];
    assert!(a.delivered_at.is_none());
    let err = a.delivery_error.as_deref().unwrap();
    assert!(err.contains("unreachable"), "{err}");
    assert!(
        !err.contains("secret-token") && !err.contains(&port.to_string()),
        "{err}"
    );

    // It comes back, answering 503 twice before it accepts: both alerts arrive, once each.
    let receiver = Receiver::default();
    receiver.fail_first.store(2, Ordering::SeqCst);
    let server = start_receiver(port, receiver.clone()).await;
    raise(store.as_ref(), 2).await;
    wait_until("both deliveries", async || {
        store
            .alerts(10)
            .await
            .unwrap()
            .iter()
            .all(|a| a.delivered_at.is_some())
    })
    .await;
    let got = receiver.got.lock().unwrap().clone();
    let mut messages: Vec<&str> = got.iter().map(|b| b["message"].as_str().unwrap()).collect();
    messages.sort();
    assert_eq!(messages, ["alert 1", "alert 2"], "{got:?}");
    let alerts = store.alerts(10).await.unwrap();
    for body in &got {
        let a = alerts
            .iter()
            .find(|a| a.id == body["id"].as_i64().unwrap())
            .unwrap();
        assert_eq!(body["kind"], "run_tripped");
        assert_eq!(body["level"], "warn");
        assert_eq!(body["subject"].as_str().unwrap(), a.subject);
        assert!(body["at"].as_str().unwrap().ends_with('Z'));
    }
    // Alert 1 needed at least one attempt while down; 503s were retried too.
    assert!(
        alerts.iter().map(|a| a.delivery_attempts).sum::<i64>() >= 4,
        "{alerts:?}"
    );
    stop.store(true, Ordering::Relaxed);
    delivery.await.unwrap();
    server.abort();
    backend.close().await;
}
