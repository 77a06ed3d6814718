//! The declarative `http` adapter driven through the real endpoint-sync state machine
//! (`Bulwark::open` + a sealed snapshot + `sync`) against each simulator API style.

mod http_common;

use std::collections::HashMap;
use std::sync::Arc;

use bulwark_adapters::http::{IdCache, MemoryIdCache, SqliteIdCache};
use bulwark_adapters::sim_api::ApiSimHandle;
use bulwark_adapters::sim_tls::TestCa;
use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::Item;
use http_common::*;

/// What the API simulator shows for the SKUs of `want`.
fn shown(sim: &ApiSimHandle, endpoint: &str, want: &[Item]) -> Vec<Item> {
    let skus: Vec<&str> = want.iter().map(|i| i.sku.as_str()).collect();
    normalized(
        sim.items(endpoint)
            .into_iter()
            .filter(|i| skus.contains(&i.sku.as_str()))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rest_with_idempotency_key_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = simulator::start(
        SimConfig {
            required_token: Some(creds.portal_token.clone()),
            ..SimConfig::default()
        },
        loopback(),
    )
    .await
    .unwrap();
    let want = items(45, 0);
    seed(&db, &want).await;
    let endpoints: Vec<_> = ["ep-a", "ep-b"]
        .iter()
        .map(|id| {
            endpoint(
                id,
                "batch_rest",
                sim.base_url(id),
                &[("api_token_env", TOKEN_VAR)],
            )
        })
        .collect();
    let cache: Arc<dyn IdCache> = Arc::new(MemoryIdCache::new());
    let app = Bulwark::open(&db, registry(cache, creds.secrets()))
        .await
        .unwrap();
    let report = app.sync(&endpoints, &options(20), None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    assert_eq!(report.uploads, 6, "3 batches per endpoint: {report:?}");
    let stats = sim.stats();
    assert_eq!(stats.batches_applied, 6);
    assert_eq!(stats.duplicates_applied, 0);
    assert_clean_audit(&app).await;

    // Read what the portal shows through its own query route.
    let client = bulwark_adapters::rest::RestAdapter::shared_client();
    for ep in ["ep-a", "ep-b"] {
        let body: serde_json::Value = client
            .post(format!("{}/items/query", sim.base_url(ep)))
            .bearer_auth(&creds.portal_token)
            .json(&serde_json::json!({"skus": want.iter().map(|i| &i.sku).collect::<Vec<_>>()}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got: Vec<Item> = serde_json::from_value(body["items"].clone()).unwrap();
        assert_eq!(normalized(got), normalized(want.clone()), "{ep}");
    }

    // A changed snapshot: only the batches with changed values go out.
    let mut changed = want.clone();
    changed[3].qty += 100;
    changed[30].tiers[1].price_minor += 7;
    seed(&db, &changed).await;
    let report = app.sync(&endpoints, &options(20), None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    assert_eq!(report.uploads, 2, "{report:?}");
    assert_eq!(sim.stats().batches_applied, 8);
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_item_rest_with_login_and_cached_lookups_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(12, 0);
    seed(&db, &want).await;
    let cache: Arc<dyn IdCache> = Arc::new(SqliteIdCache::connect(&db).await.unwrap());
    let endpoints = vec![endpoint(
        "shop-1",
        "rest_items",
        sim.rest_base_url("shop-1"),
        &[REST_CREDS, &[("currency", "EUR")]].concat(),
    )];
    let app = Bulwark::open(&db, registry(cache.clone(), creds.secrets()))
        .await
        .unwrap();
    let report = app.sync(&endpoints, &options(5), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(&sim, "shop-1", &want), normalized(want.clone()));
    let stats = sim.stats();
    assert_eq!(stats.logins, 1, "the token is reused: {stats:?}");
    assert_eq!(stats.lookups, 12, "{stats:?}");
    assert_eq!(stats.writes_applied, 12, "{stats:?}");
    assert_eq!(stats.auth_refusals, 0, "{stats:?}");
    assert_clean_audit(&app).await;

    // The ids persist in Bulwark's database.
    let skus: Vec<String> = want.iter().map(|i| i.sku.clone()).collect();
    let cached = SqliteIdCache::connect(&db)
        .await
        .unwrap()
        .get_many("rest_items", "shop-1", &skus)
        .await
        .unwrap();
    assert_eq!(cached.len(), 12);

    // The platform renumbers its products: the first write gets 404, the stale id is
    // forgotten, looked up again, and the write retried.
    sim.renumber("shop-1");
    let mut changed = want.clone();
    changed[0].qty = 999;
    changed[7].tiers[0].price_minor = 1;
    seed(&db, &changed).await;
    let report = app.sync(&endpoints, &options(5), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(&sim, "shop-1", &changed), normalized(changed.clone()));
    let stats = sim.stats();
    assert_eq!(stats.lookups, 12 + 2, "only the two stale ids: {stats:?}");
    assert_eq!(stats.writes_refused, 2, "{stats:?}");
    assert_eq!(stats.writes_applied, 14, "{stats:?}");
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_with_errors_in_200_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(8, 0);
    seed(&db, &want).await;
    let cache: Arc<dyn IdCache> = Arc::new(SqliteIdCache::connect(&db).await.unwrap());
    let good = endpoint("gq-1", "gql", sim.graphql_url("gq-1"), GQL_CREDS);
    // A wrong key: the platform answers 200 with UNAUTHENTICATED, an auth failure.
    let secrets = Arc::new(
        bulwark_adapters::http::MapSecrets::new()
            .with(API_KEY_VAR, &creds.api_key)
            .with("WRONG_KEY", "not-the-key"),
    );
    let bad = endpoint(
        "gq-2",
        "gql",
        sim.graphql_url("gq-2"),
        &[("api_key_env", "WRONG_KEY")],
    );
    let app = Bulwark::open(&db, registry(cache, secrets)).await.unwrap();
    let report = app
        .sync(&[good.clone(), bad], &options(3), None)
        .await
        .unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(report.by_status.get("Tripped"), Some(&1), "{report:?}");
    assert_eq!(shown(&sim, "gq-1", &want), normalized(want.clone()));
    assert!(sim.items("gq-2").is_empty());
    let stats = sim.stats();
    assert_eq!(stats.writes_applied, 8, "{stats:?}");
    assert_eq!(
        stats.auth_refusals, 1,
        "no retry of an auth failure: {stats:?}"
    );
    assert!(app.status().await.unwrap().alerts >= 1);

    // NOT_FOUND inside a 200 after the platform renumbered: re-lookup and retry.
    sim.renumber("gq-1");
    let mut changed = want.clone();
    changed[5].qty = 0;
    seed(&db, &changed).await;
    let report = app.sync(&[good], &options(3), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(&sim, "gq-1", &changed), normalized(changed.clone()));
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_user_errors_are_rejected() {
    use bulwark_workflows::adapter::AdapterError;
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let registry = registry(Arc::new(MemoryIdCache::new()), creds.secrets());
    let a = registry
        .build(&endpoint("gq-v", "gql", sim.graphql_url("gq-v"), GQL_CREDS))
        .unwrap();
    let mut bad = items(1, 0);
    bad[0].qty = -1;
    let batch = bulwark_workflows::catalog::Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: "gq-v".into(),
        snapshot: 1,
        index: 0,
        key: uuid::Uuid::new_v4(),
        items: bad,
    };
    // Refused item by item: the SKU, with the platform's message.
    match a.upload(&batch).await {
        Err(AdapterError::Partial(p)) => {
            assert!(p.done.is_empty() && p.rest.is_none(), "{p:?}");
            assert_eq!(p.rejected.len(), 1, "{p:?}");
            let r = &p.rejected[0];
            assert_eq!(r.sku, batch.items[0].sku);
            assert!(
                r.message.contains("userErrors") && r.message.contains("must not be negative"),
                "{}",
                r.message
            )
        }
        other => panic!("expected the item refused, got {other:?}"),
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_mid_run_refreshes_once_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = Arc::new(api_sim(&creds).await);
    let want = items(20, 0);
    seed(&db, &want).await;
    let endpoints = vec![endpoint(
        "shop-t",
        "rest_items",
        sim.rest_base_url("shop-t"),
        REST_CREDS,
    )];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let s = sim.clone();
    // After the third transition (mid-run: 4 batches of 5), every token expires.
    let progress = Arc::new(OnTransition::new(move |_, n| {
        if n == 3 {
            s.expire_tokens();
        }
    }));
    let report = app
        .sync(&endpoints, &options(5), Some(progress))
        .await
        .unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(&sim, "shop-t", &want), normalized(want.clone()));
    let stats = sim.stats();
    assert_eq!(stats.logins, 2, "one refresh: {stats:?}");
    assert_eq!(stats.auth_refusals, 1, "{stats:?}");
    assert_eq!(stats.writes_applied, 20, "{stats:?}");
    assert_clean_audit(&app).await;
    app.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_401_in_a_row_is_an_auth_failure_that_trips_the_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    sim.refuse_tokens(true);
    let want = items(4, 0);
    seed(&db, &want).await;
    let endpoints = vec![endpoint(
        "shop-x",
        "rest_items",
        sim.rest_base_url("shop-x"),
        REST_CREDS,
    )];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let report = app.sync(&endpoints, &options(10), None).await.unwrap();
    assert_eq!(report.by_status.get("Tripped"), Some(&1), "{report:?}");
    let stats = sim.stats();
    assert_eq!(stats.logins, 2, "one refresh, then give up: {stats:?}");
    assert_eq!(stats.auth_refusals, 2, "{stats:?}");
    assert_eq!(stats.writes_applied, 0);
    assert!(app.status().await.unwrap().alerts >= 1);
    assert_clean_audit(&app).await;

    // The circuit is open: a new snapshot skips the endpoint without calling it.
    let mut changed = want.clone();
    changed[0].qty += 1;
    seed(&db, &changed).await;
    let report = app.sync(&endpoints, &options(10), None).await.unwrap();
    assert_eq!(report.by_status.get("Skipped"), Some(&1), "{report:?}");
    assert_eq!(sim.stats().logins, 2);
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_write_response_is_verified_on_replay_and_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(6, 0);
    seed(&db, &want).await;
    // REST per item: no idempotency key, no probe route; replay must read back.
    let rest = endpoint(
        "shop-l",
        "rest_items",
        sim.rest_base_url("shop-l"),
        REST_CREDS,
    );
    // GraphQL per item too.
    let gql = endpoint("gq-l", "gql", sim.graphql_url("gq-l"), GQL_CREDS);
    sim.lose_next_writes("shop-l", 1);
    sim.lose_next_writes("gq-l", 1);
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let report = app.sync(&[rest, gql], &options(6), None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    assert!(report.probes.0 >= 2, "replays probe first: {report:?}");
    let stats = sim.stats();
    assert_eq!(stats.responses_lost, 2, "{stats:?}");
    assert_eq!(
        stats.writes_applied, 12,
        "each item written exactly once: {stats:?}"
    );
    for ep in ["shop-l", "gq-l"] {
        assert_eq!(shown(&sim, ep, &want), normalized(want.clone()), "{ep}");
        let writes: HashMap<String, u64> = want
            .iter()
            .map(|i| (i.sku.clone(), sim.writes_for(ep, &i.sku)))
            .collect();
        assert!(writes.values().all(|w| *w == 1), "{ep}: {writes:?}");
    }
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_batch_writes_are_chunked_with_derived_idempotency_keys() {
    use bulwark_adapters::http::{self, Profiles};
    use bulwark_workflows::adapter::{AdapterRegistry, Verification};
    let creds = Creds::random();
    let sim = simulator::start(
        SimConfig {
            required_token: Some(creds.portal_token.clone()),
            ..SimConfig::default()
        },
        loopback(),
    )
    .await
    .unwrap();
    let chunked = PROFILES.replacen("items_per_request = 500", "items_per_request = 7", 1);
    assert_ne!(chunked, PROFILES);
    let mut registry = AdapterRegistry::new();
    registry.register(
        http::ADAPTER_NAME,
        http::factory_with(
            Arc::new(Profiles::from_toml_str(&chunked).unwrap()),
            Arc::new(MemoryIdCache::new()),
            creds.secrets(),
        ),
    );
    let a = registry
        .build(&endpoint(
            "ep-c",
            "batch_rest",
            sim.base_url("ep-c"),
            &[("api_token_env", TOKEN_VAR)],
        ))
        .unwrap();
    let batch = bulwark_workflows::catalog::Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: "ep-c".into(),
        snapshot: 1,
        index: 0,
        key: uuid::Uuid::new_v4(),
        items: items(20, 0),
    };
    assert_eq!(a.probe("ep-c", batch.key).await.unwrap(), None);
    let r = a.upload(&batch).await.unwrap();
    assert!(r.id.starts_with("r-"), "the platform's receipt: {r:?}");
    assert_eq!(sim.stats().batches_applied, 3, "20 items in chunks of 7");
    assert_eq!(a.verify(&batch, &r).await.unwrap(), Verification::Verified);
    assert_eq!(
        a.probe("ep-c", batch.key).await.unwrap().map(|r| r.id),
        Some(r.id.clone())
    );
    // A re-send uses the same chunk keys: the platform de-duplicates every chunk.
    let again = a.upload(&batch).await.unwrap();
    assert_eq!(again, r);
    let stats = sim.stats();
    assert_eq!((stats.batches_applied, stats.deduplicated), (3, 3));
    sim.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_token_from_a_response_header() {
    use bulwark_adapters::http::{self, Profiles};
    use bulwark_workflows::adapter::{AdapterError, AdapterRegistry, Verification};
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let by_header = PROFILES.replacen(
        "token_path = \"$.access_token\"\nexpires_in_path = \"$.expires_in\"",
        "token_header = \"X-Auth-Token\"",
        1,
    );
    assert_ne!(by_header, PROFILES);
    let mut registry = AdapterRegistry::new();
    registry.register(
        http::ADAPTER_NAME,
        http::factory_with(
            Arc::new(Profiles::from_toml_str(&by_header).unwrap()),
            Arc::new(MemoryIdCache::new()),
            creds.secrets(),
        ),
    );
    let a = registry
        .build(&endpoint(
            "shop-h",
            "rest_items",
            sim.rest_base_url("shop-h"),
            REST_CREDS,
        ))
        .unwrap();
    let batch = bulwark_workflows::catalog::Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: "shop-h".into(),
        snapshot: 1,
        index: 0,
        key: uuid::Uuid::new_v4(),
        items: items(3, 0),
    };
    let r = a.upload(&batch).await.unwrap();
    assert_eq!(a.verify(&batch, &r).await.unwrap(), Verification::Verified);
    assert_eq!(sim.stats().logins, 1);
    assert_eq!(sim.stats().auth_refusals, 0);

    // Wrong credentials: the login itself is refused, an auth failure.
    let wrong = Arc::new(
        bulwark_adapters::http::MapSecrets::new()
            .with(USER_VAR, &creds.username)
            .with(PASSWORD_VAR, "wrong-password"),
    );
    let mut registry = AdapterRegistry::new();
    registry.register(
        http::ADAPTER_NAME,
        http::factory_with(profiles(), Arc::new(MemoryIdCache::new()), wrong),
    );
    let a = registry
        .build(&endpoint(
            "shop-h",
            "rest_items",
            sim.rest_base_url("shop-h"),
            REST_CREDS,
        ))
        .unwrap();
    match a.upload(&batch).await {
        Err(AdapterError::Auth(m)) => assert!(m.contains("login") && m.contains("401"), "{m}"),
        other => panic!("expected Auth, got {other:?}"),
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_back_compares_quantities_prices_and_currency() {
    use bulwark_workflows::adapter::Verification;
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let registry = registry(Arc::new(MemoryIdCache::new()), creds.secrets());
    let gql = registry
        .build(&endpoint("gq-c", "gql", sim.graphql_url("gq-c"), GQL_CREDS))
        .unwrap();
    let batch = |items: Vec<Item>| bulwark_workflows::catalog::Batch {
        remainder: false,
        cas: Default::default(),
        endpoint: "gq-c".into(),
        snapshot: 1,
        index: 0,
        key: uuid::Uuid::new_v4(),
        items,
    };
    let b = batch(items(7, 0));
    let r = gql.upload(&b).await.unwrap();
    assert_eq!(gql.verify(&b, &r).await.unwrap(), Verification::Verified);

    // Another price, another quantity, a missing tier: each is a mismatch, named.
    let mut other = items(7, 0);
    other[1].tiers[1].price_minor += 1;
    other[2].qty += 1;
    other[3].tiers.pop();
    match gql.verify(&batch(other), &r).await.unwrap() {
        Verification::Mismatch { details } => {
            assert!(details.starts_with("3 of 7 items differ"), "{details}");
            assert!(details.contains("S-0001: tiers expected"), "{details}");
            assert!(
                details.contains("S-0002: qty expected 4 shown Some(3)"),
                "{details}"
            );
        }
        v => panic!("{v:?}"),
    }
    // The endpoint expects another currency than the platform shows.
    let usd = registry
        .build(&endpoint(
            "gq-c",
            "gql",
            sim.graphql_url("gq-c"),
            &[("api_key_env", API_KEY_VAR), ("currency", "USD")],
        ))
        .unwrap();
    match usd.verify(&b, &r).await.unwrap() {
        Verification::Mismatch { details } => {
            assert!(details.contains("currency expected USD"), "{details}")
        }
        v => panic!("{v:?}"),
    }

    // Decimal prices (REST) round-trip exactly.
    let rest = registry
        .build(&endpoint(
            "shop-c",
            "rest_items",
            sim.rest_base_url("shop-c"),
            REST_CREDS,
        ))
        .unwrap();
    let mut odd = items(3, 0);
    odd[0].tiers[0].price_minor = 5; // "0.05"
    odd[1].tiers[0].price_minor = 10_000_007; // "100000.07"
    let b = batch(odd.clone());
    let r = rest.upload(&b).await.unwrap();
    assert_eq!(rest.verify(&b, &r).await.unwrap(), Verification::Verified);
    assert_eq!(shown(&sim, "shop-c", &odd), normalized(odd));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_write_then_crash_then_a_new_process_reads_back_and_does_not_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(6, 0);
    seed(&db, &want).await;
    let eps = vec![endpoint(
        "shop-k",
        "rest_items",
        sim.rest_base_url("shop-k"),
        REST_CREDS,
    )];
    sim.lose_next_writes("shop-k", 1);
    let mut slow = options(6);
    slow.policy.backoff_base_ms = 1_500;
    slow.policy.backoff_max_ms = 1_500;
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    // The process dies while the sync backs off after the unanswered write.
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(400),
        app.sync(&eps, &slow, None),
    )
    .await;
    assert!(cut.is_err(), "still backing off: {cut:?}");
    drop(app);
    // The other items were written in the same attempt (one unanswered item does not
    // stop them), and that progress is journaled.
    let stats = sim.stats();
    assert_eq!(
        (stats.writes_applied, stats.responses_lost),
        (6, 1),
        "{stats:?}"
    );

    // A new process: fresh adapters (no memory of the attempt), same database.
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let report = app.sync(&eps, &options(6), None).await.unwrap();
    assert_eq!(report.resumed_runs.len(), 1, "{report:?}");
    assert_eq!(done(&report), 1, "{report:?}");
    assert!(report.probes.0 >= 1, "{report:?}");
    let stats = sim.stats();
    assert_eq!(stats.writes_applied, 6, "no item written twice: {stats:?}");
    for item in &want {
        assert_eq!(sim.writes_for("shop-k", &item.sku), 1, "{}", item.sku);
    }
    assert_eq!(shown(&sim, "shop-k", &want), normalized(want.clone()));
    assert_clean_audit(&app).await;
    app.close().await;
    sim.shutdown().await;
}

/// Both API styles over HTTPS (a CA made up here, trusted by `ca_file`): login, lookups,
/// writes and read-back all cross real TLS; the same endpoints without the CA are refused
/// at the handshake with a configuration error naming the endpoint and the problem, and
/// nothing reaches the platform.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_api_styles_over_https_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let ca = TestCa::new(dir.path(), "shop").unwrap();
    let creds = Creds::random();
    let sim = api_sim_with(&creds, Some(&ca.server_tls(&["127.0.0.1"], None).unwrap())).await;
    assert!(sim.rest_base_url("x").starts_with("https://"));
    let want = items(10, 0);
    seed(&db, &want).await;
    let ca_file = ca.ca_file.display().to_string();
    let trusted = [("ca_file", ca_file.as_str())];
    let endpoints = vec![
        endpoint(
            "shop-tls",
            "rest_items",
            sim.rest_base_url("shop-tls"),
            &[REST_CREDS, &[("currency", "EUR")], &trusted].concat(),
        ),
        endpoint(
            "gq-tls",
            "gql",
            sim.graphql_url("gq-tls"),
            &[GQL_CREDS, &trusted].concat(),
        ),
    ];
    let untrusted = vec![endpoint(
        "shop-untrusted",
        "rest_items",
        sim.rest_base_url("shop-untrusted"),
        &[REST_CREDS, &[("currency", "EUR")]].concat(),
    )];
    let cache: Arc<dyn IdCache> = Arc::new(MemoryIdCache::new());
    let app = Bulwark::open(&db, registry(cache, creds.secrets()))
        .await
        .unwrap();
    let report = app.sync(&endpoints, &options(4), None).await.unwrap();
    assert_eq!(done(&report), 2, "{report:?}");
    assert_eq!(shown(&sim, "shop-tls", &want), normalized(want.clone()));
    assert_eq!(shown(&sim, "gq-tls", &want), normalized(want.clone()));
    assert_clean_audit(&app).await;

    let before = sim.stats();
    let report = app.sync(&untrusted, &options(4), None).await.unwrap();
    assert_eq!(report.by_status.get("Tripped"), Some(&1), "{report:?}");
    let after = sim.stats();
    assert_eq!(after.logins, before.logins, "no request got through");
    assert_eq!(after.writes_applied, before.writes_applied);
    let rows = app.store().workflows(None, None).await.unwrap();
    let tripped = rows
        .iter()
        .find(|w| w.subject == "shop-untrusted")
        .expect("the untrusted endpoint's workflow");
    let reason = &tripped.state_json;
    assert!(
        reason.contains("shop-untrusted")
            && reason.contains("TLS certificate problem")
            && reason.contains("not signed by a trusted CA"),
        "{reason}"
    );
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_sku_is_quarantined_while_the_rest_syncs_and_retry_carries_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(12, 0);
    seed(&db, &want).await;
    let bad = want[6].sku.clone();
    sim.refuse_skus("shop-q", &[&bad]);
    let eps = vec![endpoint(
        "shop-q",
        "rest_items",
        sim.rest_base_url("shop-q"),
        REST_CREDS,
    )];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    // Default policy: the refusal is one item, not a failing endpoint.
    let mut opts = options(5);
    opts.policy.max_failures = 3;
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 1, "not tripped: {report:?}");
    let shown_now = shown(&sim, "shop-q", &want);
    for item in &want {
        let got = shown_now.iter().find(|i| i.sku == item.sku).unwrap();
        if item.sku == bad {
            assert_eq!(got.qty, 0, "left as the shop had it");
        } else {
            assert_eq!(got, item);
        }
    }
    // Refused once, never re-sent within the run.
    assert_eq!(sim.stats().writes_refused, 1, "{:?}", sim.stats());
    let q = app.quarantine().await.unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(
        (q[0].endpoint.as_str(), q[0].sku.as_str()),
        ("shop-q", bad.as_str())
    );
    assert!(q[0].reason.contains("cannot be sold"), "{q:?}");
    let alerts = app.store().alerts(20).await.unwrap();
    let quarantined: Vec<_> = alerts
        .iter()
        .filter(|a| a.kind == "item_quarantined")
        .collect();
    assert_eq!(quarantined.len(), 1, "alerted once: {alerts:?}");
    assert!(quarantined[0].message.contains(&bad));
    assert!(
        app.store()
            .circuits()
            .await
            .unwrap()
            .iter()
            .all(|c| !c.open),
        "no circuit opened"
    );
    assert_eq!(app.status().await.unwrap().quarantined, 1);
    assert_clean_audit(&app).await;

    // The snapshot does not change it: nothing is sent, it stays quarantined.
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(report.uploads, 0, "{report:?}");
    assert_eq!(app.quarantine().await.unwrap().len(), 1);

    // The shop accepts it now; an operator asks for a retry: the next sync carries only it.
    sim.refuse_skus("shop-q", &[]);
    assert_eq!(
        app.retry_quarantined(Some("shop-q"), None).await.unwrap(),
        1
    );
    let before = sim.stats().writes_applied;
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(
        sim.stats().writes_applied,
        before + 1,
        "only the retried SKU"
    );
    assert_eq!(shown(&sim, "shop-q", &want), normalized(want.clone()));
    assert!(app.quarantine().await.unwrap().is_empty());
    assert_clean_audit(&app).await;

    // Refused again after a snapshot changes it: quarantined again, from the new value.
    sim.refuse_skus("shop-q", &[&bad]);
    let mut changed = want.clone();
    changed[6].qty += 5;
    changed[2].qty += 5;
    seed(&db, &changed).await;
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    let q = app.quarantine().await.unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(shown(&sim, "shop-q", &changed)[2], changed[2]);
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mostly_refused_batch_still_trips_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(10, 0);
    seed(&db, &want).await;
    let refused: Vec<&str> = want[..6].iter().map(|i| i.sku.as_str()).collect();
    sim.refuse_skus("shop-r", &refused);
    let eps = vec![endpoint(
        "shop-r",
        "rest_items",
        sim.rest_base_url("shop-r"),
        REST_CREDS,
    )];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    let report = app.sync(&eps, &options(10), None).await.unwrap();
    assert_eq!(report.by_status.get("Tripped"), Some(&1), "{report:?}");
    assert!(
        app.quarantine().await.unwrap().is_empty(),
        "a failing endpoint is not a quarantine"
    );
    // Tripped, unconfirmed: the next sync of this endpoint reads back before writing.
    assert!(app.staging().unsettled().await.unwrap().contains("shop-r"));
    app.close().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_of_requests_failing_one_per_item_finishes_with_default_settings() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    let want = items(40, 0);
    seed(&db, &want).await;
    sim.fail_requests("shop-f", 0.3);
    let eps = vec![endpoint(
        "shop-f",
        "rest_items",
        sim.rest_base_url("shop-f"),
        REST_CREDS,
    )];
    let app = Bulwark::open(
        &db,
        registry(Arc::new(MemoryIdCache::new()), creds.secrets()),
    )
    .await
    .unwrap();
    // The defaults, except a short attempt timeout is not needed: nothing stalls.
    let opts = bulwark_workflows::sync::SyncOptions {
        batch_size: 20,
        ..Default::default()
    };
    let report = app.sync(&eps, &opts, None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(&sim, "shop-f", &want), normalized(want.clone()));
    let stats = sim.stats();
    assert!(stats.faults_injected >= 10, "{stats:?}");
    for item in &want {
        assert_eq!(
            sim.writes_for("shop-f", &item.sku),
            1,
            "{} written once: {stats:?}",
            item.sku
        );
    }
    assert!(
        app.store()
            .circuits()
            .await
            .unwrap()
            .iter()
            .all(|c| !c.open)
    );
    assert_clean_audit(&app).await;
    eprintln!("30 % faults: {stats:?}; {report:?}");
    app.close().await;
    sim.shutdown().await;
}
