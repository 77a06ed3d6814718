//! Secrets (passwords, API keys, tokens, login tokens) never appear in error texts, the
//! journal (the whole database file), alerts, `Debug` output or logs — even when a
//! platform echoes requests back in its error responses.
//!
//! One test per binary: it installs a global log subscriber that captures everything.

mod http_common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::response::IntoResponse;
use bulwark_adapters::http::{HttpAdapter, MemoryIdCache, SqliteIdCache};
use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_workflows::adapter::{AdapterError, Receipt};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::Batch;
use http_common::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A platform that refuses everything with 422, quoting the request's headers and body.
async fn echo_server() -> std::net::SocketAddr {
    async fn echo(headers: HeaderMap, body: String) -> axum::response::Response {
        let hs: Vec<String> = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
            .collect();
        (
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "refused; you sent headers [{}] and body {body}",
                hs.join("; ")
            ),
        )
            .into_response()
    }
    let app = axum::Router::new().fallback(echo);
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_errors_journal_or_logs() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let api = api_sim(&creds).await;
    let portal = simulator::start(
        SimConfig {
            required_token: Some(creds.portal_token.clone()),
            ..SimConfig::default()
        },
        loopback(),
    )
    .await
    .unwrap();
    let echo = echo_server().await;
    let want = items(10, 0);
    seed(&db, &want).await;
    api.lose_next_writes("shop-ok", 1);
    let endpoints = vec![
        endpoint(
            "shop-ok",
            "rest_items",
            api.rest_base_url("shop-ok"),
            REST_CREDS,
        ),
        endpoint("gq-ok", "gql", api.graphql_url("gq-ok"), GQL_CREDS),
        endpoint(
            "portal-ok",
            "batch_rest",
            portal.base_url("portal-ok"),
            &[("api_token_env", TOKEN_VAR)],
        ),
        // Platforms that echo the credentials back in their refusals.
        endpoint(
            "echo-login",
            "rest_items",
            format!("http://{echo}/rest"),
            REST_CREDS,
        ),
        endpoint("echo-gql", "gql", format!("http://{echo}/gql"), GQL_CREDS),
        endpoint(
            "echo-portal",
            "batch_rest",
            format!("http://{echo}/portal"),
            &[("api_token_env", TOKEN_VAR)],
        ),
    ];
    let cache = Arc::new(SqliteIdCache::connect(&db).await.unwrap());
    let app = Bulwark::open(&db, registry(cache, creds.secrets()))
        .await
        .unwrap();
    let api = Arc::new(api);
    let a2 = api.clone();
    // Mid-run (shop-ok's third transition: it has logged in and written), every token
    // expires: one refresh.
    let progress = Arc::new(OnTransition::new(move |ep, n| {
        if ep == "shop-ok" && n == 3 {
            a2.expire_tokens();
        }
    }));
    let report = app
        .sync(&endpoints, &options(4), Some(progress))
        .await
        .unwrap();
    assert_eq!(report.by_status.get("Done"), Some(&3), "{report:?}");
    assert_eq!(report.by_status.get("Tripped"), Some(&3), "{report:?}");
    assert_eq!(api.stats().logins, 2, "{:?}", api.stats());
    assert_eq!(api.stats().responses_lost, 1);
    let status = app.status().await.unwrap();
    assert!(status.alerts >= 3);
    let audit = app.audit().await.unwrap();
    assert!(audit.findings.is_empty(), "{:?}", audit.findings);
    app.close().await;

    // Direct calls: the error texts themselves, and Debug output.
    let secrets = creds.secrets();
    let registry = registry(Arc::new(MemoryIdCache::new()), secrets.clone());
    let batch = Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: "x".into(),
        snapshot: 1,
        index: 0,
        key: uuid::Uuid::new_v4(),
        items: want.clone(),
    };
    let mut texts = vec![format!("{report:?}")];
    for ep in &endpoints[3..] {
        let a = registry.build(ep).unwrap();
        let e = a.upload(&batch).await.unwrap_err();
        assert!(
            matches!(&e, AdapterError::Rejected(_))
                || matches!(&e, AdapterError::Partial(p) if !p.rejected.is_empty()),
            "echo refuses with 422: {e:?}"
        );
        assert!(
            e.to_string().contains("<redacted>"),
            "echoed secret scrubbed: {e}"
        );
        texts.push(format!("{e} {e:?}"));
        texts.push(format!(
            "{:?}",
            a.verify(&batch, &Receipt { id: "r".into() }).await
        ));
        let built = HttpAdapter::new(
            ep,
            &profiles(),
            Arc::new(MemoryIdCache::new()),
            secrets.as_ref(),
            bulwark_adapters::rest::RestAdapter::shared_client(),
        )
        .unwrap();
        texts.push(format!("{built:?} {built:#?}"));
    }
    // Nothing listening: connection errors quote the URL, never a secret.
    let dead = registry
        .build(&endpoint(
            "dead",
            "gql",
            "http://127.0.0.1:9/g".into(),
            GQL_CREDS,
        ))
        .unwrap();
    texts.push(format!("{:?}", dead.upload(&batch).await));

    let mut journal = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        if let Ok(bytes) = std::fs::read(format!("{}{suffix}", db.display())) {
            journal.extend(bytes);
        }
    }
    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("http adapter request refused"),
        "logs captured"
    );
    assert!(logs.contains("<redacted>"), "bodies are logged redacted");
    let journal_text = String::from_utf8_lossy(&journal);
    assert!(
        journal_text.contains("HTTP 422"),
        "the journal holds the refusals"
    );

    let mut secrets_to_check = creds.secret_values();
    secrets_to_check.extend(api.issued_tokens());
    assert!(secrets_to_check.len() >= 5);
    for secret in &secrets_to_check {
        for t in &texts {
            assert!(
                !t.contains(secret.as_str()),
                "secret in error/debug text: {t}"
            );
        }
        assert!(!logs.contains(secret.as_str()), "secret in logs");
        assert!(
            !journal
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "secret in the database file"
        );
    }
    portal.shutdown().await.unwrap();
}
