//! TLS at every contact point, over real TLS on loopback with certificates made up in the
//! test: the REST adapter (server trust by `ca_file`, refused CAs and host names, mutual
//! TLS, `insecure_skip_verify`), the webhook, the real binary against an HTTPS simulator
//! (`SSL_CERT_FILE`, `bulwark status` listing unverified endpoints), and PostgreSQL with
//! `sslmode=verify-ca`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bulwark_adapters::sim_tls::{TestCa, TlsListener};
use bulwark_adapters::simulator::{self, SimConfig, SimHandle};
use bulwark_adapters::webhook::WebhookSink;
use bulwark_engine::AlertRow;
use bulwark_engine::alerts::AlertSink;
use bulwark_tests::{KillOnDrop, bulwark, free_port, legacy_snapshot, run_ok, wait_for_port};
use bulwark_workflows::adapter::{AdapterError, EndpointConfig, PortalAdapter, Verification};
use bulwark_workflows::catalog::{Batch, Item, PriceTier, batch_key, payload_hash};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn batch(endpoint: &str) -> Batch {
    let items: Vec<Item> = (0..5)
        .map(|i| Item {
            sku: format!("SKU-{i:03}"),
            qty: 10 + i,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 1000 + i,
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

fn rest(
    sim: &SimHandle,
    id: &str,
    extra: &[(&str, String)],
) -> Result<Arc<dyn PortalAdapter>, AdapterError> {
    let mut settings = HashMap::from([("base_url".to_string(), sim.base_url(id))]);
    for (k, v) in extra {
        settings.insert(k.to_string(), v.clone());
    }
    bulwark_adapters::default_registry().build(&EndpointConfig {
        id: id.into(),
        adapter: "rest".into(),
        settings,
        policy: None,
    })
}

/// Upload and verify one batch; the error of the first call that fails.
async fn round_trip(a: &dyn PortalAdapter, id: &str) -> Result<(), AdapterError> {
    let b = batch(id);
    let receipt = a.upload(&b).await?;
    match a.verify(&b, &receipt).await? {
        Verification::Verified => Ok(()),
        other => panic!("{id}: {other:?}"),
    }
}

fn config_error(r: Result<(), AdapterError>) -> String {
    match r {
        Err(AdapterError::Config(m)) => m,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_over_tls_trusts_only_what_it_is_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "portal").unwrap();
    let other = TestCa::new(dir.path(), "other").unwrap();
    let sim = simulator::start_with(
        SimConfig::default(),
        loopback(),
        Some(&ca.server_tls(&["127.0.0.1", "localhost"], None).unwrap()),
    )
    .await
    .unwrap();
    assert!(sim.base_url("x").starts_with("https://127.0.0.1:"));
    let ca_file = ca.ca_file.display().to_string();

    // Trusted through ca_file: the batch lands and reads back.
    let a = rest(&sim, "ep-ca", &[("ca_file", ca_file.clone())]).unwrap();
    round_trip(a.as_ref(), "ep-ca").await.unwrap();
    assert_eq!(sim.stats().batches_applied, 1);

    // Not trusted (platform roots only, or another CA): refused at the handshake, as a
    // configuration error naming the endpoint and the problem; nothing is applied.
    let a = rest(&sim, "ep-plain", &[]).unwrap();
    let e = config_error(round_trip(a.as_ref(), "ep-plain").await);
    assert!(
        e.contains("endpoint ep-plain")
            && e.contains("TLS certificate problem")
            && e.contains("not signed by a trusted CA")
            && e.contains("UnknownIssuer"),
        "{e}"
    );
    let a = rest(
        &sim,
        "ep-other",
        &[("ca_file", other.ca_file.display().to_string())],
    )
    .unwrap();
    let e = config_error(round_trip(a.as_ref(), "ep-other").await);
    assert!(
        e.contains("endpoint ep-other") && e.contains("UnknownIssuer"),
        "{e}"
    );
    assert_eq!(sim.stats().batches_applied, 1, "nothing got through");

    // Verification off, explicitly: it goes through (and the adapter says so in the log).
    let a = rest(
        &sim,
        "ep-insecure",
        &[("insecure_skip_verify", "true".into())],
    )
    .unwrap();
    round_trip(a.as_ref(), "ep-insecure").await.unwrap();
    assert_eq!(sim.stats().batches_applied, 2);

    // A certificate for another host name is refused even from a trusted CA.
    let misnamed = simulator::start_with(
        SimConfig::default(),
        loopback(),
        Some(&ca.server_tls(&["shop.example"], None).unwrap()),
    )
    .await
    .unwrap();
    let a = rest(&misnamed, "ep-name", &[("ca_file", ca_file.clone())]).unwrap();
    let e = config_error(round_trip(a.as_ref(), "ep-name").await);
    assert!(e.contains("not valid for this host name"), "{e}");

    // A missing or malformed ca_file fails when the adapter is built, naming the file.
    let err = rest(
        &sim,
        "ep-x",
        &[("ca_file", dir.path().join("nope.pem").display().to_string())],
    )
    .err()
    .expect("a missing ca_file is refused");
    let AdapterError::Config(m) = err else {
        panic!("{err:?}")
    };
    assert!(m.contains("endpoint ep-x") && m.contains("nope.pem"), "{m}");
    misnamed.shutdown().await.unwrap();
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "portal").unwrap();
    let clients = TestCa::new(dir.path(), "clients").unwrap();
    let strangers = TestCa::new(dir.path(), "strangers").unwrap();
    let sim = simulator::start_with(
        SimConfig::default(),
        loopback(),
        Some(&ca.server_tls(&["127.0.0.1"], Some(&clients)).unwrap()),
    )
    .await
    .unwrap();
    let ca_file = ("ca_file", ca.ca_file.display().to_string());
    let ours = clients.client_cert("bulwark", "bulwark-worker").unwrap();
    let a = rest(
        &sim,
        "ep-mtls",
        &[
            ca_file.clone(),
            ("client_cert_file", ours.cert_file.display().to_string()),
            ("client_key_file", ours.key_file.display().to_string()),
        ],
    )
    .unwrap();
    round_trip(a.as_ref(), "ep-mtls").await.unwrap();

    // Without a certificate, or with one the server does not trust: refused, saying why.
    for (id, cert) in [
        ("ep-nocert", None),
        (
            "ep-stranger",
            Some(strangers.client_cert("x", "x").unwrap()),
        ),
    ] {
        let mut extra = vec![ca_file.clone()];
        if let Some(c) = &cert {
            extra.push(("client_cert_file", c.cert_file.display().to_string()));
            extra.push(("client_key_file", c.key_file.display().to_string()));
        }
        let a = rest(&sim, id, &extra).unwrap();
        let e = config_error(round_trip(a.as_ref(), id).await);
        assert!(
            e.contains(&format!("endpoint {id}")) && e.contains("client certificate"),
            "{e}"
        );
    }
    assert_eq!(sim.stats().batches_applied, 1);
    sim.shutdown().await.unwrap();
}

fn alert() -> AlertRow {
    AlertRow {
        id: 7,
        at: 1_764_614_400_000,
        kind: "circuit_opened".into(),
        level: bulwark_engine::AlertLevel::Error,
        subject: "ep-1".into(),
        workflow: Some(3),
        message: "tripped".into(),
        delivered_at: None,
        delivery_attempts: 1,
        delivery_error: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_over_tls_with_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "hooks").unwrap();
    let received = Arc::new(AtomicU32::new(0));
    let counter = received.clone();
    let app = axum::Router::new().route(
        "/hook/{token}",
        axum::routing::post(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let tcp = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let acceptor = ca
        .server_tls(&["127.0.0.1"], None)
        .unwrap()
        .acceptor()
        .unwrap();
    let server =
        tokio::spawn(axum::serve(TlsListener::new(tcp, acceptor).unwrap(), app).into_future());
    let url = format!("https://{addr}/hook/s3cret-token");

    let trusted = bulwark_adapters::transport::TransportSettings {
        ca_file: Some(ca.ca_file.clone()),
        ..Default::default()
    };
    let sink = WebhookSink::with_transport(&url, Duration::from_secs(5), &trusted).unwrap();
    sink.deliver(&alert()).await.unwrap();
    assert_eq!(received.load(Ordering::SeqCst), 1);

    // Without the CA the delivery fails, saying why, without the URL's token.
    let sink = WebhookSink::new(&url, Duration::from_secs(5)).unwrap();
    let e = sink.deliver(&alert()).await.unwrap_err();
    assert!(
        e.contains("webhook TLS certificate problem") && e.contains("not signed by a trusted CA"),
        "{e}"
    );
    assert!(!e.contains("s3cret-token"), "{e}");
    assert_eq!(received.load(Ordering::SeqCst), 1);
    server.abort();
}

/// The real binary against `bulwark simulate` serving HTTPS: an endpoint trusted by
/// `ca_file`, one with verification off (listed by `status`), one trusting nothing but
/// the platform roots (tripped, saying why); then `SSL_CERT_FILE` makes the last one
/// trusted too, and `reset-circuit` + a new sync delivers it.
#[test]
fn binary_syncs_an_https_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "sim").unwrap();
    let server = ca.server_cert("server", &["127.0.0.1"]).unwrap();
    let port = free_port();
    let _sim = KillOnDrop(
        bulwark()
            .args([
                "simulate",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--endpoints",
                "3",
            ])
            .arg("--tls-cert")
            .arg(&server.cert_file)
            .arg("--tls-key")
            .arg(&server.key_file)
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    let db = dir.path().join("bulwark.db");
    legacy_snapshot(dir.path(), 60, &db);
    std::fs::copy(&ca.ca_file, dir.path().join("trusted.pem")).unwrap();
    let config = dir.path().join("bulwark.toml");
    let base = |id: &str| format!("https://127.0.0.1:{port}/ep/{id}");
    std::fs::write(
        &config,
        format!(
            r#"
[sync]
batch_size = 20
max_attempts = 2
backoff_base_ms = 10

[[endpoint]]
id = "ep-ca"
adapter = "rest"
settings = {{ base_url = "{}", ca_file = "trusted.pem" }}

[[endpoint]]
id = "ep-insecure"
adapter = "rest"
settings = {{ base_url = "{}", insecure_skip_verify = "true" }}

[[endpoint]]
id = "ep-env"
adapter = "rest"
settings = {{ base_url = "{}" }}
"#,
            base("ep-ca"),
            base("ep-insecure"),
            base("ep-env")
        ),
    )
    .unwrap();
    let sync = || {
        let mut c = bulwark();
        c.args(["sync", "--config"])
            .arg(&config)
            .arg("--db")
            .arg(&db)
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR");
        c
    };
    let out = sync().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ep-insecure") && stderr.contains("verification is OFF"),
        "a warning at start: {stderr}"
    );
    let endpoints = run_ok(bulwark().args(["endpoints", "--json", "--db"]).arg(&db));
    let rows: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let state = |id: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["endpoint"] == id)
            .unwrap_or_else(|| panic!("{id} in {rows}"))
            .clone()
    };
    assert_eq!(state("ep-ca")["state"], "Done", "{rows}");
    assert_eq!(state("ep-insecure")["state"], "Done", "{rows}");
    let env = state("ep-env");
    assert_eq!(env["state"], "Tripped", "{rows}");
    let why = env.to_string();
    assert!(why.contains("not signed by a trusted CA"), "{why}");

    let status = run_ok(bulwark().args(["status", "--db"]).arg(&db));
    assert!(
        status.contains("TLS verification OFF") && status.contains("ep-insecure"),
        "{status}"
    );
    assert!(
        !status.contains("ep-ca,") && !status.contains("ep-env"),
        "{status}"
    );
    let json: serde_json::Value = serde_json::from_str(&run_ok(
        bulwark().args(["status", "--json", "--db"]).arg(&db),
    ))
    .unwrap();
    assert_eq!(json["insecure_tls"], serde_json::json!(["ep-insecure"]));

    // SSL_CERT_FILE stands in for the platform roots: now ep-env is trusted too.
    run_ok(bulwark().args(["reset-circuit", "ep-env", "--db"]).arg(&db));
    run_ok(sync().env("SSL_CERT_FILE", &ca.ca_file));
    let rows: serde_json::Value = serde_json::from_str(&run_ok(
        bulwark().args(["endpoints", "--json", "--db"]).arg(&db),
    ))
    .unwrap();
    for r in rows.as_array().unwrap() {
        assert_eq!(r["state"], "Done", "{rows}");
    }
}

/// Bulwark's own PostgreSQL database over TLS, with the server's certificate verified
/// (`sslmode=verify-ca`, `sslrootcert`), and the connection really encrypted. Needs a
/// server with `ssl = on` whose certificate file is readable here (Debian's default,
/// `/etc/ssl/certs/ssl-cert-snakeoil.pem`; elsewhere set `BULWARK_TEST_PG_ROOTCERT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verified() {
    use sqlx::Connection;
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    let (ssl,): (String,) = sqlx::query_as("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let (cert,): (String,) = sqlx::query_as("SHOW ssl_cert_file")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    let rootcert = std::env::var("BULWARK_TEST_PG_ROOTCERT").unwrap_or(cert);
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if ssl != "on" || !std::path::Path::new(&rootcert).exists() {
        assert!(
            !ci,
            "CI's PostgreSQL must have ssl = on with a readable certificate"
        );
        eprintln!(
            "skipping: the PostgreSQL server has no TLS (ssl = {ssl}) or {rootcert} is unreadable"
        );
        return;
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = bulwark_tests::pg_schema_url(
        &format!("{base}{sep}sslmode=verify-ca&sslrootcert={rootcert}"),
        "tls",
    );
    let app = bulwark_workflows::app::Bulwark::open(&url, bulwark_adapters::default_registry())
        .await
        .unwrap();
    let bulwark_engine::Backend::Postgres(pg) = app.backend() else {
        panic!("a postgres URL opens PostgreSQL")
    };
    let (encrypted,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(pg.pool())
            .await
            .unwrap();
    assert!(encrypted, "the connection is encrypted");
    app.status().await.unwrap();
    app.close().await;

    // A root that did not sign the server's certificate is refused. (The platform store
    // may hold the server's own certificate, as Debian's does for snakeoil: SSL_CERT_FILE
    // replaces it, through the real binary.)
    let dir = tempfile::tempdir().unwrap();
    let other = TestCa::new(dir.path(), "other").unwrap();
    let wrong = bulwark_tests::pg_schema_url(
        &format!(
            "{base}{sep}sslmode=verify-ca&sslrootcert={}",
            other.ca_file.display()
        ),
        "tls",
    );
    let out = bulwark()
        .args(["status", "--db", &wrong])
        .env("SSL_CERT_FILE", &other.ca_file)
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an untrusted server certificate is refused"
    );
    assert!(
        stderr.contains("UnknownIssuer") || stderr.to_lowercase().contains("certificate"),
        "{stderr}"
    );
    // …and the same through the binary with the right root works.
    let out = run_ok(
        bulwark()
            .args(["status", "--db", &url])
            .env("SSL_CERT_FILE", &rootcert)
            .env_remove("SSL_CERT_DIR"),
    );
    assert!(out.contains("journal rows"), "{out}");
}

/// The README's own quick-start configuration (`base_url = "https://acme.example/api"`)
/// loads and its adapter builds, through `bulwark check`.
#[test]
fn the_readme_https_example_loads() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme.find("   ```toml\n").expect("a toml block") + 11;
    let block = &readme[start..start + readme[start..].find("   ```").unwrap()];
    let text: String = block
        .lines()
        .map(|l| l.strip_prefix("   ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains("https://acme.example/api"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bulwark.toml");
    std::fs::write(&config, &text).unwrap();
    let out = run_ok(
        bulwark()
            .args(["check", "--config"])
            .arg(&config)
            .env("ACME_TOKEN", "t0ken")
            .current_dir(dir.path()),
    );
    assert!(out.contains("valid; 1 endpoint(s)"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&run_ok(
        bulwark()
            .args(["check", "--json", "--config"])
            .arg(&config)
            .env("ACME_TOKEN", "t0ken")
            .current_dir(dir.path()),
    ))
    .unwrap();
    assert_eq!(json["endpoints"], 1, "{json}");
    assert_eq!(json["source"], true, "{json}");
    assert!(
        json["schedule"]["snapshot"].is_string() && json["schedule"]["sync"].is_string(),
        "{json}"
    );
    // Without its token the same file is refused, naming the endpoint and the variable.
    let out = bulwark()
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("ACME_TOKEN")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("acme-wholesale") && stderr.contains("ACME_TOKEN"),
        "{stderr}"
    );
}
