//! Helpers shared by the `http_*` integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bulwark_adapters::http::{self, IdCache, MapSecrets, Profiles, Secrets};
use bulwark_adapters::sim_api::{self, ApiSimConfig, ApiSimHandle};
use bulwark_adapters::sim_tls::ServerTls;
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig};
use bulwark_workflows::app::{Bulwark, SyncProgress, SyncReport};
use bulwark_workflows::catalog::{Item, PriceTier};
use bulwark_workflows::endpoint_sync::{State, SyncPolicy};
use bulwark_workflows::sync::SyncOptions;

/// The test profiles: the shipped examples (`examples/profiles/`) of the simulators'
/// REST, GraphQL and batch shapes, in one profiles file.
pub const PROFILES: &str = concat!(
    include_str!("../../../examples/profiles/batch_rest.toml"),
    "\n",
    include_str!("../../../examples/profiles/rest_items.toml"),
    "\n",
    include_str!("../../../examples/profiles/gql.toml"),
);

pub fn profiles() -> Arc<Profiles> {
    Arc::new(Profiles::from_toml_str(PROFILES).expect("test profiles load"))
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// `n` items; `offset` shifts every value (a later snapshot with changed values).
pub fn items(n: u32, offset: i64) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            sku: format!("S-{i:04}"),
            qty: i64::from(i) + 1 + offset,
            tiers: vec![
                PriceTier {
                    min_qty: 1,
                    price_minor: 1000 + i64::from(i) + offset,
                },
                PriceTier {
                    min_qty: 10,
                    price_minor: 900 + i64::from(i) + offset,
                },
            ],
        })
        .collect()
}

/// Add a sealed snapshot of `items` to the database at `db` (created if missing).
pub async fn seed(db: &Path, items: &[Item]) -> i64 {
    let app = Bulwark::open(db, AdapterRegistry::new()).await.unwrap();
    let snapshot = app.staging().import("test", items).await.unwrap();
    app.close().await;
    snapshot
}

/// A registry with the `http` adapter over `profiles`, `cache` and `secrets`.
pub fn registry(cache: Arc<dyn IdCache>, secrets: Arc<dyn Secrets>) -> AdapterRegistry {
    let mut r = AdapterRegistry::new();
    r.register(
        http::ADAPTER_NAME,
        http::factory_with(profiles(), cache, secrets),
    );
    r
}

/// An endpoint using profile `profile`.
pub fn endpoint(
    id: &str,
    profile: &str,
    base_url: String,
    extra: &[(&str, &str)],
) -> EndpointConfig {
    let mut settings = HashMap::from([
        ("profile".to_owned(), profile.to_owned()),
        ("base_url".to_owned(), base_url),
    ]);
    for (k, v) in extra {
        settings.insert((*k).to_owned(), (*v).to_owned());
    }
    EndpointConfig {
        policy: None,
        id: id.into(),
        adapter: http::ADAPTER_NAME.into(),
        settings,
    }
}

/// Sync options with fast retries.
pub fn options(batch_size: u32) -> SyncOptions {
    SyncOptions {
        limits: Default::default(),
        batch_size,
        policy: SyncPolicy {
            backoff_base_ms: 10,
            backoff_max_ms: 100,
            ..SyncPolicy::default()
        },
        max_in_flight: 8,
        ..SyncOptions::default()
    }
}

/// Secrets for the simulators, under these variable names.
pub const USER_VAR: &str = "SHOP_USER";
pub const PASSWORD_VAR: &str = "SHOP_PASSWORD";
pub const API_KEY_VAR: &str = "SHOP_API_KEY";
pub const TOKEN_VAR: &str = "PORTAL_TOKEN";

pub struct Creds {
    pub username: String,
    pub password: String,
    pub api_key: String,
    pub portal_token: String,
}

impl Creds {
    pub fn random() -> Self {
        let r = || uuid::Uuid::new_v4().simple().to_string();
        Self {
            username: format!("user-{}", &r()[..8]),
            password: format!("pw-{}", r()),
            api_key: format!("key-{}", r()),
            portal_token: format!("tok-{}", r()),
        }
    }

    pub fn secrets(&self) -> Arc<dyn Secrets> {
        Arc::new(
            MapSecrets::new()
                .with(USER_VAR, &self.username)
                .with(PASSWORD_VAR, &self.password)
                .with(API_KEY_VAR, &self.api_key)
                .with(TOKEN_VAR, &self.portal_token),
        )
    }

    /// The values that must never leak (the user name is not secret).
    pub fn secret_values(&self) -> Vec<String> {
        vec![
            self.password.clone(),
            self.api_key.clone(),
            self.portal_token.clone(),
        ]
    }
}

pub const REST_CREDS: &[(&str, &str)] =
    &[("username_env", USER_VAR), ("password_env", PASSWORD_VAR)];
pub const GQL_CREDS: &[(&str, &str)] = &[("api_key_env", API_KEY_VAR), ("currency", "EUR")];

/// Calls `f(endpoint, n)` on every transition, `n` counting that endpoint's transitions.
pub struct OnTransition<F: Fn(&str, u64) + Send + Sync>(
    pub F,
    pub std::sync::Mutex<HashMap<String, u64>>,
);

impl<F: Fn(&str, u64) + Send + Sync> OnTransition<F> {
    pub fn new(f: F) -> Self {
        Self(f, Default::default())
    }
}

impl<F: Fn(&str, u64) + Send + Sync> SyncProgress for OnTransition<F> {
    fn started(&self, _workflows: usize) {}
    fn transition(&self, endpoint: &str, _state: &State, _terminal: bool) {
        let n = {
            let mut counts = self.1.lock().unwrap();
            let n = counts.entry(endpoint.to_owned()).or_default();
            *n += 1;
            *n
        };
        (self.0)(endpoint, n);
    }
}

/// Sort items by SKU (and tiers by min_qty) for comparisons.
pub fn normalized(mut items: Vec<Item>) -> Vec<Item> {
    for i in &mut items {
        i.tiers.sort_by_key(|t| t.min_qty);
    }
    items.sort_by(|a, b| a.sku.cmp(&b.sku));
    items
}

/// Endpoint syncs of `report` that ended `Done`.
pub fn done(report: &SyncReport) -> usize {
    report.by_status.get("Done").copied().unwrap_or(0)
}

/// The API simulator, accepting `creds`, over plain HTTP.
pub async fn api_sim(creds: &Creds) -> ApiSimHandle {
    api_sim_with(creds, None).await
}

/// The API simulator, accepting `creds`, over TLS if `tls` is given.
pub async fn api_sim_with(creds: &Creds, tls: Option<&ServerTls>) -> ApiSimHandle {
    sim_api::start_with(
        ApiSimConfig {
            username: creds.username.clone(),
            password: creds.password.clone(),
            api_key: creds.api_key.clone(),
            token_ttl_secs: 3600,
            currency: "EUR".into(),
            latency_ms: 0,
            ..Default::default()
        },
        loopback(),
        tls,
    )
    .await
    .unwrap()
}

/// Every journal re-folds without a finding (and there is a journal).
pub async fn assert_clean_audit(app: &Bulwark) {
    let audit = app.audit().await.unwrap();
    assert!(audit.findings.is_empty(), "{:?}", audit.findings);
    assert!(audit.journal_rows > 0);
}
