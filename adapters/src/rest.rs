//! The REST/JSON portal adapter.
//!
//! One [`RestAdapter`] talks to one endpoint. Its [`EndpointConfig::settings`] understand:
//!
//! | key          | required | meaning                                                        |
//! |--------------|----------|----------------------------------------------------------------|
//! | `base_url`   | yes      | e.g. `https://acme.example/api` or `http://127.0.0.1:8080/ep/ep-0001` |
//! | `timeout_ms` | no       | per-request timeout in milliseconds (default 10000)            |
//! | `token_env`  | no       | name of an environment variable holding a bearer token         |
//!
//! plus the [transport settings](crate::transport) (`ca_file`, `client_cert_file`,
//! `client_key_file`, `insecure_skip_verify`, `proxy`).
//!
//! The token is read once, at construction. It is sent as `Authorization: Bearer …` (marked
//! sensitive) and never appears in error messages, `Debug` output or logs: any response
//! excerpt quoted in an error is scrubbed of it.
//!
//! Protocol:
//!
//! * upload: `POST {base_url}/batches`, header `Idempotency-Key: <key>`, body
//!   `{"key", "snapshot", "index", "items"}` → 200/201 `{"receipt": "..."}`;
//! * verify: `POST {base_url}/items/query`, body `{"skus": [...]}` → 200 `{"items": [...]}`
//!   (unknown SKUs are absent); reconcile's read-back asks the same;
//! * probe: `GET {base_url}/uploads/{key}` → 200 `{"receipt": "..."}` or 404.
//!
//! Error classification (every call): 400/409/422 → [`AdapterError::Rejected`];
//! 401/403 → [`AdapterError::Auth`]; 429 → [`AdapterError::RateLimited`] (from
//! `Retry-After`, seconds or an HTTP-date, default 1000 ms); a 5xx with `Retry-After` →
//! [`AdapterError::Unavailable`] (retried no sooner); other 5xx, timeouts, connection and
//! decode errors → [`AdapterError::Transient`]; a TLS certificate refused (either way) →
//! [`AdapterError::Config`], naming the problem; any other status → [`AdapterError::Config`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterError, AdapterFactory, AdapterResult, EndpointConfig, ItemRejection, PortalAdapter,
    ReadBack, Receipt, Verification,
};
use bulwark_workflows::catalog::{Batch, Item};
use reqwest::StatusCode;

use crate::transport::{ClientPool, TRANSPORT_KEYS, TransportSettings, describe_send_error};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Delay assumed for a 429 without a usable `Retry-After` header.
pub const DEFAULT_RETRY_AFTER_MS: u64 = 1_000;
/// Longest excerpt of a response body quoted in an error, in characters.
pub const MAX_EXCERPT_CHARS: usize = 200;
/// How many differing SKUs a [`Verification::Mismatch`] names at most.
pub const MAX_MISMATCHES_SHOWN: usize = bulwark_workflows::adapter::MAX_DIFFERENCES_SHOWN;

/// The clients of adapters built by [`RestAdapter::new`] and [`RestAdapter::factory`],
/// one per distinct transport.
static SHARED_CLIENTS: LazyLock<ClientPool> = LazyLock::new(ClientPool::new);

/// A bearer token; its `Debug` never shows the value.
#[derive(Clone)]
struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A [`PortalAdapter`] for endpoints speaking Bulwark's REST/JSON protocol
/// (see the [module docs](self)).
#[derive(Clone)]
pub struct RestAdapter {
    endpoint: String,
    base_url: String,
    timeout: Duration,
    token: Option<Token>,
    client: reqwest::Client,
    /// `idempotency_keys = false`: the platform ignores `Idempotency-Key` (a repeated
    /// upload is applied again), so each upload is preceded by a lease confirmation.
    idempotency_keys: bool,
}

impl fmt::Debug for RestAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RestAdapter")
            .field("endpoint", &self.endpoint)
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Serialize)]
struct UploadBody<'a> {
    key: Uuid,
    snapshot: i64,
    index: u32,
    items: &'a [Item],
}

#[derive(Deserialize)]
struct ReceiptBody {
    receipt: String,
    /// Items the portal refused while applying the rest.
    #[serde(default)]
    rejected: Vec<RejectedBody>,
}

#[derive(Deserialize)]
struct RejectedBody {
    sku: String,
    #[serde(default)]
    error: String,
}

#[derive(Serialize)]
struct QueryBody<'a> {
    skus: Vec<&'a str>,
}

#[derive(Deserialize)]
struct ItemsBody {
    items: Vec<Item>,
}

impl RestAdapter {
    /// Build an adapter for `config` using the process-wide client for its transport
    /// settings (shared by every endpoint with the same settings).
    ///
    /// Fails with [`AdapterError::Config`] if `base_url` is missing or not an http(s) URL,
    /// `timeout_ms` is not a positive integer, `token_env` names an unset variable, or a
    /// transport setting is wrong (a CA or client-certificate file that cannot be read).
    pub fn new(config: &EndpointConfig) -> AdapterResult<Self> {
        let client = SHARED_CLIENTS
            .endpoint_client(&config.id, &config.settings)
            .map_err(AdapterError::Config)?;
        Self::build(config, client)
    }

    /// Build an adapter for `config` that uses `client` (clone a client to share its
    /// connection pool between adapters). The client's own TLS and proxy configuration
    /// apply, so `config` must not carry transport settings (`ca_file`, `proxy`, …).
    pub fn with_client(config: &EndpointConfig, client: reqwest::Client) -> AdapterResult<Self> {
        if let Some(k) = TRANSPORT_KEYS
            .iter()
            .find(|k| config.settings.contains_key(**k))
        {
            return Err(AdapterError::Config(format!(
                "endpoint {}: `{k}` has no effect on an adapter given its own HTTP client; configure the client instead",
                config.id
            )));
        }
        Self::build(config, client)
    }

    fn build(config: &EndpointConfig, client: reqwest::Client) -> AdapterResult<Self> {
        let id = &config.id;
        let settings: &HashMap<String, String> = &config.settings;
        let raw_url = settings.get("base_url").ok_or_else(|| {
            AdapterError::Config(format!("endpoint {id}: setting `base_url` is required"))
        })?;
        let parsed = reqwest::Url::parse(raw_url).map_err(|e| {
            AdapterError::Config(format!("endpoint {id}: `base_url` is not a valid URL: {e}"))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(AdapterError::Config(format!(
                "endpoint {id}: `base_url` must use http or https, got scheme {:?}",
                parsed.scheme()
            )));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(AdapterError::Config(format!(
                "endpoint {id}: `base_url` must not embed credentials; use `token_env`"
            )));
        }
        let base_url = raw_url.trim_end_matches('/').to_owned();
        let timeout_ms = match settings.get("timeout_ms") {
            None => DEFAULT_TIMEOUT_MS,
            Some(s) => match s.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => ms,
                _ => {
                    return Err(AdapterError::Config(format!(
                        "endpoint {id}: `timeout_ms` must be a positive integer, got {s:?}"
                    )));
                }
            },
        };
        let idempotency_keys = match settings.get("idempotency_keys").map(|s| s.trim()) {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(AdapterError::Config(format!(
                    "endpoint {id}: `idempotency_keys` must be true or false, got {other:?}"
                )));
            }
        };
        let token = match settings.get("token_env") {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(t) if !t.is_empty() => Some(Token(Arc::from(t))),
                Ok(_) => {
                    return Err(AdapterError::Config(format!(
                        "endpoint {id}: environment variable {var:?} (token_env) is empty"
                    )));
                }
                Err(_) => {
                    return Err(AdapterError::Config(format!(
                        "endpoint {id}: environment variable {var:?} (token_env) is not set or not unicode"
                    )));
                }
            },
        };
        Ok(Self {
            endpoint: id.clone(),
            base_url,
            timeout: Duration::from_millis(timeout_ms),
            token,
            client,
            idempotency_keys,
        })
    }

    /// The process-wide HTTP client shared by adapters built with [`RestAdapter::new`]
    /// for endpoints without transport settings.
    ///
    /// Note: pooled connections are driven by the Tokio runtime that opened them; use one
    /// long-lived runtime per process (as the CLI does), or [`RestAdapter::with_client`]
    /// with a per-runtime client.
    pub fn shared_client() -> reqwest::Client {
        SHARED_CLIENTS
            .client(&TransportSettings::default())
            .expect("the default transport reads no files and always builds")
    }

    /// A registry factory for `"rest"`: adapters with the same transport settings share
    /// one HTTP client (one connection pool, which matters with thousands of endpoints on
    /// one host).
    pub fn factory() -> AdapterFactory {
        Arc::new(move |config: &EndpointConfig| {
            let adapter: Arc<dyn PortalAdapter> = Arc::new(Self::new(config)?);
            Ok(adapter)
        })
    }

    /// The endpoint id this adapter serves.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The endpoint's base URL (without trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base_url, path))
            .timeout(self.timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(&*token.0);
        }
        req
    }

    /// Send a request, mapping transport failures to [`AdapterError::Transient`].
    async fn send(
        &self,
        op: &str,
        req: reqwest::RequestBuilder,
    ) -> AdapterResult<reqwest::Response> {
        bulwark_workflows::adapter::fence_check()?;
        req.send().await.map_err(|e| self.transport_error(op, &e))
    }

    fn transport_error(&self, op: &str, e: &reqwest::Error) -> AdapterError {
        if e.is_builder() {
            return AdapterError::Config(format!(
                "endpoint {}: {op}: invalid request",
                self.endpoint
            ));
        }
        let failure = describe_send_error(e);
        // The chain may quote the URL (which holds no credentials: they are refused at
        // construction) but never headers; scrub anyway.
        let message = format!(
            "endpoint {}: {op}: {}: {}",
            self.endpoint,
            failure.kind,
            self.scrub(&failure.detail)
        );
        if failure.certificate {
            AdapterError::Config(message)
        } else {
            AdapterError::Transient(message)
        }
    }

    /// Remove the token from text that came from outside (response bodies, error chains).
    fn scrub(&self, text: &str) -> String {
        match &self.token {
            Some(t) if text.contains(&*t.0) => text.replace(&*t.0, "<redacted>"),
            _ => text.to_owned(),
        }
    }

    /// Classify a non-success response. Consumes the body for the excerpt.
    async fn status_error(&self, op: &str, resp: reqwest::Response) -> AdapterError {
        let status = resp.status();
        let retry_after_ms = crate::transport::retry_after_ms(resp.headers());
        let body = resp.text().await.unwrap_or_default();
        let excerpt = self.scrub(&excerpt(&body));
        let message = format!(
            "endpoint {}: {op}: HTTP {}: {excerpt}",
            self.endpoint,
            status.as_u16()
        );
        classify(status, retry_after_ms, message)
    }

    async fn decode<T: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        resp: reqwest::Response,
    ) -> AdapterResult<T> {
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(op, &e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            AdapterError::Transient(format!(
                "endpoint {}: {op}: could not decode response body: {e}",
                self.endpoint
            ))
        })
    }
}

/// Map an HTTP error status to an [`AdapterError`] class.
/// `retry_after_ms` is the response's `Retry-After`: a 429 waits for it (or
/// [`DEFAULT_RETRY_AFTER_MS`]), a 5xx carrying it becomes [`AdapterError::Unavailable`].
fn classify(status: StatusCode, retry_after_ms: Option<u64>, message: String) -> AdapterError {
    match (status.as_u16(), retry_after_ms) {
        (400 | 409 | 422, _) => AdapterError::Rejected(message),
        (401 | 403, _) => AdapterError::Auth(message),
        (429, ms) => AdapterError::RateLimited {
            retry_after_ms: ms.unwrap_or(DEFAULT_RETRY_AFTER_MS),
            message,
        },
        (500..=599, None) => AdapterError::Transient(message),
        (500..=599, Some(retry_after_ms)) => AdapterError::Unavailable {
            retry_after_ms,
            message,
        },
        _ => AdapterError::Config(message),
    }
}

/// At most [`MAX_EXCERPT_CHARS`] characters of `body`, whitespace-trimmed.
fn excerpt(body: &str) -> String {
    let body = body.trim();
    let mut out: String = body.chars().take(MAX_EXCERPT_CHARS).collect();
    if out.len() < body.len() {
        out.push('…');
    }
    out
}

fn describe_item(item: Option<&Item>) -> String {
    match item {
        None => "absent".to_owned(),
        Some(item) => {
            let tiers: Vec<String> = item
                .tiers
                .iter()
                .map(|t| format!("{}@{}", t.min_qty, t.price_minor))
                .collect();
            format!("qty={} tiers=[{}]", item.qty, tiers.join(","))
        }
    }
}

/// Compare what the endpoint shows with what the batch says, item by item.
fn read_items(expected: &[Item], shown: Vec<Item>) -> ReadBack {
    let shown: HashMap<String, Item> = shown.into_iter().map(|i| (i.sku.clone(), i)).collect();
    ReadBack::of(
        expected,
        |_| None,
        |want| {
            let got = shown.get(&want.sku);
            (got != Some(want)).then(|| {
                format!(
                    "expected {}, shown {}",
                    describe_item(Some(want)),
                    describe_item(got)
                )
            })
        },
    )
}

/// Compare what the endpoint shows with what the batch says.
fn compare(expected: &[Item], shown: Vec<Item>) -> Verification {
    Verification::of(expected.len(), &read_items(expected, shown).differing)
}

impl RestAdapter {
    /// What the portal shows for the batch's SKUs (unknown SKUs are absent).
    async fn query(&self, op: &'static str, batch: &Batch) -> AdapterResult<Vec<Item>> {
        if batch.items.is_empty() {
            return Ok(Vec::new());
        }
        let body = QueryBody {
            skus: batch.items.iter().map(|i| i.sku.as_str()).collect(),
        };
        let req = self
            .request(reqwest::Method::POST, "/items/query")
            .json(&body);
        let resp = self.send(op, req).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(op, resp).await);
        }
        let shown: ItemsBody = self.decode(op, resp).await?;
        Ok(shown.items)
    }
}

#[async_trait]
impl PortalAdapter for RestAdapter {
    fn deduplicates(&self) -> bool {
        self.idempotency_keys
    }

    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        const OP: &str = "upload";
        // A remainder (items left after a partial attempt) is its own request.
        let key = batch.request_key();
        let body = UploadBody {
            key,
            snapshot: batch.snapshot,
            index: batch.index,
            items: &batch.items,
        };
        let req = self
            .request(reqwest::Method::POST, "/batches")
            .header("Idempotency-Key", key.to_string())
            .json(&body);
        let resp = self.send(OP, req).await?;
        if !resp.status().is_success() {
            return Err(self.status_error(OP, resp).await);
        }
        let receipt: ReceiptBody = self.decode(OP, resp).await?;
        tracing::debug!(endpoint = %self.endpoint, key = %batch.key, index = batch.index, receipt = %receipt.receipt, refused = receipt.rejected.len(), "batch uploaded");
        if receipt.rejected.is_empty() {
            return Ok(Receipt {
                id: receipt.receipt,
            });
        }
        // The portal applied the batch except these items.
        let refused: std::collections::HashSet<&str> =
            receipt.rejected.iter().map(|r| r.sku.as_str()).collect();
        let done = batch
            .items
            .iter()
            .filter(|i| !refused.contains(i.sku.as_str()))
            .map(|i| i.sku.clone())
            .collect();
        let rejected = receipt
            .rejected
            .into_iter()
            .map(|r| ItemRejection {
                kept: false,
                message: if r.error.is_empty() {
                    "refused by the portal (no reason given)".into()
                } else {
                    r.error
                },
                sku: r.sku,
            })
            .collect();
        Err(AdapterError::partial(done, rejected, None))
    }

    async fn verify(&self, batch: &Batch, _receipt: &Receipt) -> AdapterResult<Verification> {
        let shown = self.query("verify", batch).await?;
        Ok(compare(&batch.items, shown))
    }

    async fn read_back(&self, batch: &Batch) -> AdapterResult<ReadBack> {
        let shown = self.query("read back", batch).await?;
        Ok(read_items(&batch.items, shown))
    }

    async fn probe(&self, endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>> {
        const OP: &str = "probe";
        if endpoint != self.endpoint {
            tracing::warn!(adapter_endpoint = %self.endpoint, asked = %endpoint, "probe for another endpoint; using this adapter's base_url");
        }
        let req = self.request(reqwest::Method::GET, &format!("/uploads/{key}"));
        let resp = self.send(OP, req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.status_error(OP, resp).await);
        }
        let receipt: ReceiptBody = self.decode(OP, resp).await?;
        Ok(Some(Receipt {
            id: receipt.receipt,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulwark_workflows::catalog::PriceTier;

    fn item(sku: &str, qty: i64) -> Item {
        Item {
            sku: sku.into(),
            qty,
            tiers: vec![PriceTier {
                min_qty: 1,
                price_minor: 100,
            }],
        }
    }

    #[test]
    fn classification() {
        let c = |s: u16| classify(StatusCode::from_u16(s).unwrap(), None, "m".into());
        assert!(matches!(c(400), AdapterError::Rejected(_)));
        assert!(matches!(c(409), AdapterError::Rejected(_)));
        assert!(matches!(c(422), AdapterError::Rejected(_)));
        assert!(matches!(c(401), AdapterError::Auth(_)));
        assert!(matches!(c(403), AdapterError::Auth(_)));
        let after = |s: u16| classify(StatusCode::from_u16(s).unwrap(), Some(2000), "m".into());
        assert!(matches!(
            after(429),
            AdapterError::RateLimited {
                retry_after_ms: 2000,
                ..
            }
        ));
        assert!(matches!(
            c(429),
            AdapterError::RateLimited {
                retry_after_ms: DEFAULT_RETRY_AFTER_MS,
                ..
            }
        ));
        assert!(matches!(c(500), AdapterError::Transient(_)));
        assert!(matches!(c(503), AdapterError::Transient(_)));
        assert!(matches!(
            after(503),
            AdapterError::Unavailable {
                retry_after_ms: 2000,
                ..
            }
        ));
        assert!(matches!(after(400), AdapterError::Rejected(_)));
        assert!(matches!(c(404), AdapterError::Config(_)));
        assert!(matches!(c(405), AdapterError::Config(_)));
    }

    #[test]
    fn excerpt_is_bounded() {
        let long = "é".repeat(500);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), MAX_EXCERPT_CHARS + 1);
        assert_eq!(excerpt("  short "), "short");
    }

    #[test]
    fn compare_names_at_most_five() {
        let expected: Vec<Item> = (0..8).map(|i| item(&format!("S{i}"), i)).collect();
        assert_eq!(compare(&expected, expected.clone()), Verification::Verified);
        let shown: Vec<Item> = (0..7).map(|i| item(&format!("S{i}"), i + 1)).collect();
        let Verification::Mismatch { details } = compare(&expected, shown) else {
            panic!("expected mismatch")
        };
        assert!(details.starts_with("8 of 8 items differ"), "{details}");
        assert!(
            details.contains("S0: expected qty=0 tiers=[1@100], shown qty=1"),
            "{details}"
        );
        assert!(!details.contains("S5:"), "{details}");
        assert!(details.ends_with("and 3 more"), "{details}");
    }

    #[test]
    fn config_errors() {
        let mut cfg = EndpointConfig {
            policy: None,
            id: "ep-x".into(),
            adapter: "rest".into(),
            settings: HashMap::new(),
        };
        assert!(matches!(
            RestAdapter::new(&cfg),
            Err(AdapterError::Config(_))
        ));
        cfg.settings.insert("base_url".into(), "ftp://x".into());
        assert!(matches!(
            RestAdapter::new(&cfg),
            Err(AdapterError::Config(_))
        ));
        cfg.settings
            .insert("base_url".into(), "http://127.0.0.1:1/ep/x/".into());
        let a = RestAdapter::new(&cfg).unwrap();
        assert_eq!(a.base_url(), "http://127.0.0.1:1/ep/x");
        assert_eq!(a.timeout(), Duration::from_millis(DEFAULT_TIMEOUT_MS));
        cfg.settings.insert("timeout_ms".into(), "zero".into());
        assert!(matches!(
            RestAdapter::new(&cfg),
            Err(AdapterError::Config(_))
        ));
        cfg.settings.insert("timeout_ms".into(), "250".into());
        cfg.settings
            .insert("token_env".into(), "BULWARK_TEST_SURELY_UNSET_VAR".into());
        assert!(matches!(
            RestAdapter::new(&cfg),
            Err(AdapterError::Config(_))
        ));
    }
}
