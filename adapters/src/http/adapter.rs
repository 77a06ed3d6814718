//! [`HttpAdapter`]: one endpoint driven by a [`Profile`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterError, AdapterResult, Adjusted, Difference, EndpointConfig, ItemRejection, Partial,
    PortalAdapter, ReadBack, Receipt, Verification,
};
use bulwark_workflows::catalog::{Batch, Cas, Item};
use serde_json::{Map, Value, json};
use serde_json_path::JsonPath;
use uuid::Uuid;

use super::cache::IdCache;
use super::profile::{
    AuthKind, CompiledLookup, CompiledRequest, ErrorClass, Field, Ids, LookupMode, Mode, PageKind,
    Pagination, PriceUnit, Profile, Profiles, RESERVED_SETTINGS, ReadPaths, item_value,
};
use super::secrets::{REDACTED, Redactor, Secrets};
use crate::transport::{TRANSPORT_KEYS, describe_send_error, error_chain};

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Delay assumed for a rate limit without a usable `Retry-After`.
pub const DEFAULT_RETRY_AFTER_MS: u64 = 1_000;
/// Longest excerpt of a body quoted in an error or log line, in characters.
pub const MAX_EXCERPT_CHARS: usize = 300;
/// What a read-back found, by SKU (absent: the platform does not show the SKU).
type Shown2 = HashMap<String, Result<Shown, String>>;

/// What a per-item call settled so far.
#[derive(Default)]
struct ItemOutcomes {
    done: Vec<String>,
    rejected: Vec<ItemRejection>,
    /// The first failure that leaves items unsettled (a systemic one wins).
    rest: Option<AdapterError>,
    /// A systemic failure: the remaining items are not tried.
    stop: Option<AdapterError>,
    failed: Vec<String>,
    /// Items of `done` written lowered (compare-and-set stock).
    adjusted: Vec<Adjusted>,
}

impl ItemOutcomes {
    fn record(&mut self, sku: String, e: AdapterError) {
        match e {
            AdapterError::Rejected(message) => self.rejected.push(ItemRejection {
                sku,
                message,
                kept: false,
            }),
            e => {
                if is_systemic(&e) && self.stop.is_none() {
                    self.stop = Some(e.clone());
                    self.rest = Some(e);
                } else if self.rest.is_none() {
                    self.rest = Some(e);
                }
                self.failed.push(sku);
            }
        }
    }

    fn skus(&self) -> Vec<String> {
        self.rejected
            .iter()
            .map(|r| r.sku.clone())
            .chain(self.failed.iter().cloned())
            .collect()
    }

    fn into_result(self, receipt: Receipt) -> AdapterResult<Receipt> {
        if self.rejected.is_empty() && self.rest.is_none() && self.adjusted.is_empty() {
            return Ok(receipt);
        }
        if self.adjusted.is_empty() {
            return Err(AdapterError::partial(self.done, self.rejected, self.rest));
        }
        Err(AdapterError::Partial(Box::new(Partial {
            done: self.done,
            rejected: self.rejected,
            rest: self.rest,
            adjusted: self.adjusted,
        })))
    }
}

/// A failure that will not go away for the next item either: stop the call.
fn is_systemic(e: &AdapterError) -> bool {
    matches!(
        e,
        AdapterError::Auth(_) | AdapterError::Config(_) | AdapterError::RateLimited { .. }
    )
}

/// How many differing SKUs a mismatch names at most.
pub const MAX_MISMATCHES_SHOWN: usize = bulwark_workflows::adapter::MAX_DIFFERENCES_SHOWN;

/// A classified failure of one request (before it becomes an [`AdapterError`]).
#[derive(Debug)]
struct Failure {
    class: ErrorClass,
    message: String,
    /// The response's `Retry-After`, if it had one.
    retry_after_ms: Option<u64>,
    /// Not sent at all: effect fencing refused the request.
    fenced: bool,
    /// An item-level error rule matched: the items it names, each with its message
    /// (empty otherwise, or when a match named no item).
    items: Vec<ItemHit>,
    /// A stock write's compare failed (the profile's `conflict` rule matched), with the
    /// quantity the answer says the platform shows, if it says.
    conflict: Option<Option<i64>>,
}

/// One item an item-level error rule named in an answer.
#[derive(Debug, Clone)]
struct ItemHit {
    sku: Option<String>,
    index: Option<usize>,
    message: String,
}

impl Failure {
    fn new(class: ErrorClass, message: String) -> Self {
        Self {
            class,
            message,
            retry_after_ms: None,
            fenced: false,
            items: Vec::new(),
            conflict: None,
        }
    }

    fn into_error(self) -> AdapterError {
        if self.fenced {
            return AdapterError::Fenced(self.message);
        }
        match (self.class, self.retry_after_ms) {
            (ErrorClass::Rejected, _) => AdapterError::Rejected(self.message),
            (ErrorClass::Transient, None) => AdapterError::Transient(self.message),
            (ErrorClass::Transient, Some(retry_after_ms)) => AdapterError::Unavailable {
                retry_after_ms,
                message: self.message,
            },
            (ErrorClass::Auth, _) => AdapterError::Auth(self.message),
            (ErrorClass::Config | ErrorClass::NotFound, _) => AdapterError::Config(self.message),
            (ErrorClass::RateLimited, ms) => AdapterError::RateLimited {
                retry_after_ms: ms.unwrap_or(DEFAULT_RETRY_AFTER_MS),
                message: self.message,
            },
        }
    }
}

impl From<AdapterError> for Failure {
    fn from(e: AdapterError) -> Self {
        let (class, message, retry_after_ms) = match e {
            AdapterError::Fenced(m) => {
                return Self {
                    fenced: true,
                    ..Self::new(ErrorClass::Transient, m)
                };
            }
            AdapterError::Rejected(m) => (ErrorClass::Rejected, m, None),
            AdapterError::Auth(m) => (ErrorClass::Auth, m, None),
            AdapterError::RateLimited {
                retry_after_ms,
                message,
            } => (ErrorClass::RateLimited, message, Some(retry_after_ms)),
            AdapterError::Unavailable {
                retry_after_ms,
                message,
            } => (ErrorClass::Transient, message, Some(retry_after_ms)),
            AdapterError::Config(m) => (ErrorClass::Config, m, None),
            AdapterError::Transient(m) => (ErrorClass::Transient, m, None),
            other => (ErrorClass::Transient, other.to_string(), None),
        };
        Self {
            retry_after_ms,
            ..Self::new(class, message)
        }
    }
}

/// A response that passed the status and body checks.
struct Resp {
    headers: reqwest::header::HeaderMap,
    json: Value,
    /// The URL it answered (after redirects).
    url: String,
}

struct TokenState {
    value: String,
    expires_at: Option<Instant>,
    generation: u64,
}

/// The named id paths of a lookup step, rendered for one context.
type IdPaths = Vec<(String, JsonPath)>;

/// Where a paged listing goes on.
#[derive(Debug, Clone, Default)]
struct PageState {
    started: bool,
    page: u64,
    offset: u64,
    cursor: Option<String>,
    url: Option<String>,
}

/// What one SKU shows at the platform.
#[derive(Debug, PartialEq)]
struct Shown {
    qty: Option<i64>,
    tiers: Option<Vec<(i64, i64)>>,
    price: Option<i64>,
    currency: Option<String>,
}

/// A [`PortalAdapter`] whose protocol is a [`Profile`] (see the [module docs](super)).
pub struct HttpAdapter {
    profile: Arc<Profile>,
    endpoint: String,
    base_url: String,
    settings: Map<String, Value>,
    secrets: Map<String, Value>,
    currency: Option<String>,
    timeout: Duration,
    client: reqwest::Client,
    cache: Arc<dyn IdCache>,
    redactor: Redactor,
    token: tokio::sync::Mutex<Option<TokenState>>,
    generation: std::sync::atomic::AtomicU64,
    /// Keys probed without a positive answer: their upload reads back first.
    suspects: Mutex<HashSet<Uuid>>,
    /// The read-back's JSON paths for this endpoint's settings.
    read_paths: ReadPaths,
    /// The fields this endpoint writes and verifies.
    owns: Vec<Field>,
    /// Listing lookups run one at a time: a second batch waiting for the first finds
    /// most of its ids in the cache the first filled.
    listing: tokio::sync::Mutex<PageState>,
    /// Compare-and-set stock: what a failed compare leads to.
    on_conflict: OnConflict,
}

/// What a compare-and-set stock write does when the platform no longer shows what Bulwark
/// last confirmed there (the endpoint setting `on_conflict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnConflict {
    /// Write the ERP quantity less what the shop sold since the last confirmed write,
    /// never below 0, compared with what the shop shows now (the default).
    ErpMinusSold,
    /// Leave the shop's quantity as it is: the item is quarantined ("not overwritten")
    /// and alerted, the rest goes on.
    SkipAndAlert,
}

/// Most compare-and-set rounds for one item in one call (each round re-reads what the
/// shop shows); a shop still selling after that is tried again later.
pub(crate) const CAS_ROUNDS: u32 = 3;

/// Why a write request did not land.
enum WriteErr {
    /// The compare failed: the platform shows another quantity (`Some`: the answer said
    /// which), with the platform's message.
    Conflict(Option<i64>, String),
    Other(AdapterError),
}

impl From<AdapterError> for WriteErr {
    fn from(e: AdapterError) -> Self {
        WriteErr::Other(e)
    }
}

impl fmt::Debug for HttpAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret_names: Vec<&String> = self.secrets.keys().collect();
        f.debug_struct("HttpAdapter")
            .field("profile", &self.profile.name())
            .field("endpoint", &self.endpoint)
            .field("base_url", &self.base_url)
            .field("settings", &self.settings)
            .field("secrets", &secret_names)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn cfg_err(endpoint: &str, msg: impl fmt::Display) -> AdapterError {
    AdapterError::Config(format!("endpoint {endpoint}: {msg}"))
}

impl HttpAdapter {
    /// Build the adapter for `config`, whose `settings["profile"]` names one of `profiles`.
    ///
    /// Settings: `profile`, `base_url` (http or https), optional `timeout_ms` and
    /// `currency`, the [transport settings](crate::transport::TRANSPORT_KEYS), every
    /// setting the profile declares, and `<secret>_env` (the environment variable name)
    /// for every secret it declares. Unknown settings are refused, so a typo cannot go
    /// unnoticed.
    pub fn new(
        config: &EndpointConfig,
        profiles: &Profiles,
        cache: Arc<dyn IdCache>,
        secrets: &dyn Secrets,
        client: reqwest::Client,
    ) -> AdapterResult<Self> {
        let id = config.id.as_str();
        let s = &config.settings;
        let pname = s
            .get("profile")
            .ok_or_else(|| cfg_err(id, "setting `profile` is required"))?;
        let profile = profiles.get(pname).ok_or_else(|| {
            cfg_err(
                id,
                format!(
                    "unknown profile {pname:?} (known: {})",
                    profiles.names().join(", ")
                ),
            )
        })?;
        let pc = profile.config();
        let raw_url = s
            .get("base_url")
            .ok_or_else(|| cfg_err(id, "setting `base_url` is required"))?;
        let parsed = reqwest::Url::parse(raw_url)
            .map_err(|e| cfg_err(id, format!("`base_url` is not a valid URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(cfg_err(
                id,
                format!(
                    "`base_url` must use http or https, got {:?}",
                    parsed.scheme()
                ),
            ));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(cfg_err(
                id,
                "`base_url` must not embed credentials; declare a secret",
            ));
        }
        let base_url = raw_url.trim_end_matches('/').to_owned();
        let mut settings = Map::new();
        settings.insert("base_url".into(), Value::String(base_url.clone()));
        let redactor = Redactor::default();
        let mut secret_values = Map::new();
        let mut owns = pc.owns.clone();
        for (k, v) in s {
            if k == "profile"
                || k == "base_url"
                || k == bulwark_workflows::mapping::SETTINGS_KEY
                || TRANSPORT_KEYS.contains(&k.as_str())
            {
                // The mapping is applied before the adapter sees the items.
                continue;
            }
            if k == "owns" {
                owns = Field::parse_list(v)
                    .map_err(|e| cfg_err(id, format!("setting `owns`: {e}")))?;
                if let Some(f) = owns.iter().find(|f| !pc.owns.contains(f)) {
                    return Err(cfg_err(
                        id,
                        format!(
                            "setting `owns`: profile {pname:?} does not write {:?} (it owns: {})",
                            f.name(),
                            pc.owns
                                .iter()
                                .map(|f| f.name())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                continue;
            }
            if let Some(name) = k.strip_suffix("_env") {
                if !pc.secrets.iter().any(|x| x == name) {
                    return Err(cfg_err(
                        id,
                        format!("setting `{k}`: profile {pname:?} declares no secret {name:?}"),
                    ));
                }
                continue;
            }
            if !(RESERVED_SETTINGS.contains(&k.as_str()) || pc.settings.iter().any(|x| x == k)) {
                let mut known: Vec<String> = ["profile", "base_url"]
                    .iter()
                    .chain(RESERVED_SETTINGS.iter().filter(|r| **r != "profile"))
                    .chain(TRANSPORT_KEYS.iter())
                    .map(|s| (*s).to_owned())
                    .chain(pc.settings.iter().cloned())
                    .chain(pc.secrets.iter().map(|s| format!("{s}_env")))
                    .filter(|s| !s.is_empty())
                    .collect();
                known.dedup();
                return Err(cfg_err(
                    id,
                    format!(
                        "unknown setting `{k}` for profile {pname:?} (known: {})",
                        known.join(", ")
                    ),
                ));
            }
            settings.insert(k.clone(), Value::String(v.clone()));
        }
        for name in &pc.settings {
            if !settings.contains_key(name) {
                return Err(cfg_err(
                    id,
                    format!("setting `{name}` is required by profile {pname:?}"),
                ));
            }
        }
        for name in &pc.secrets {
            let var_key = format!("{name}_env");
            let var = s.get(&var_key).ok_or_else(|| {
                cfg_err(
                    id,
                    format!(
                        "setting `{var_key}` (the environment variable holding secret {name:?}) is required by profile {pname:?}"
                    ),
                )
            })?;
            let value = secrets.get(var).ok_or_else(|| {
                cfg_err(
                    id,
                    format!("environment variable {var:?} ({var_key}) is not set or empty"),
                )
            })?;
            redactor.add(&value);
            secret_values.insert(name.clone(), Value::String(value));
        }
        let timeout_ms = match s.get("timeout_ms") {
            None => pc.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
            Some(t) => match t.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => ms,
                _ => {
                    return Err(cfg_err(
                        id,
                        format!("`timeout_ms` must be a positive integer, got {t:?}"),
                    ));
                }
            },
        };
        let path_ctx = minijinja::Value::from_serialize(json!({
            "endpoint": id,
            "base_url": base_url,
            "settings": settings,
        }));
        let read_paths = profile
            .read_paths
            .resolve(&profile.env, &path_ctx)
            .map_err(|e| cfg_err(id, format!("read-back: {e}")))?;
        let compare_stock = bulwark_workflows::sync::endpoint_compares_stock(config)
            .map_err(AdapterError::Config)?;
        if compare_stock && profile.conflict.is_none() {
            return Err(cfg_err(
                id,
                format!(
                    "setting `stock_policy = \"compare_and_set\"`: profile {pname:?} has no `conflict` table (how the platform says a compare failed)"
                ),
            ));
        }
        if compare_stock && !owns.contains(&Field::Qty) {
            return Err(cfg_err(
                id,
                "setting `stock_policy = \"compare_and_set\"`: the endpoint does not write qty (`owns`)",
            ));
        }
        let on_conflict = match s.get("on_conflict").map(|v| v.trim()) {
            None | Some("erp_minus_sold") => OnConflict::ErpMinusSold,
            Some("skip_and_alert") => OnConflict::SkipAndAlert,
            Some(other) => {
                return Err(cfg_err(
                    id,
                    format!(
                        "setting `on_conflict`: {other:?} is neither \"erp_minus_sold\" nor \"skip_and_alert\""
                    ),
                ));
            }
        };
        if s.contains_key("on_conflict") && !compare_stock {
            return Err(cfg_err(
                id,
                "setting `on_conflict` is for `stock_policy = \"compare_and_set\"`",
            ));
        }
        Ok(Self {
            on_conflict,
            read_paths,
            owns,
            listing: tokio::sync::Mutex::new(PageState::default()),
            currency: s.get("currency").cloned(),
            profile,
            endpoint: id.to_owned(),
            base_url,
            settings,
            secrets: secret_values,
            timeout: Duration::from_millis(timeout_ms),
            client,
            cache,
            redactor,
            token: tokio::sync::Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
            suspects: Mutex::new(HashSet::new()),
        })
    }

    /// The endpoint id.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The profile's name.
    pub fn profile(&self) -> &str {
        self.profile.name()
    }

    /// Scrub secrets and tokens from `text`.
    pub fn scrub(&self, text: &str) -> String {
        self.redactor.scrub(text)
    }

    fn base_ctx(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("endpoint".into(), Value::String(self.endpoint.clone()));
        m.insert("base_url".into(), Value::String(self.base_url.clone()));
        m.insert("settings".into(), Value::Object(self.settings.clone()));
        m.insert("secrets".into(), Value::Object(self.secrets.clone()));
        m
    }

    fn batch_ctx(batch: &Batch) -> Value {
        json!({"key": batch.key.to_string(), "snapshot": batch.snapshot, "index": batch.index})
    }

    fn render(&self, op: &str, tname: &str, ctx: &minijinja::Value) -> Result<String, Failure> {
        let tmpl = self.profile.env.get_template(tname).map_err(|e| {
            Failure::new(ErrorClass::Config, format!("{}: {op}: {e}", self.endpoint))
        })?;
        tmpl.render(ctx).map_err(|e| {
            Failure::new(
                ErrorClass::Config,
                self.scrub(&format!(
                    "endpoint {}: {op}: template {tname} failed: {e}",
                    self.endpoint
                )),
            )
        })
    }

    /// Render and send one request; classify the answer.
    async fn send(
        &self,
        op: &str,
        req: &CompiledRequest,
        ctx: &Map<String, Value>,
        token: Option<&str>,
        extra_headers: &[(String, String)],
        url_override: Option<&str>,
    ) -> Result<Resp, Failure> {
        let mut ctx = ctx.clone();
        if let Some(t) = token {
            ctx.insert("token".into(), Value::String(t.to_owned()));
        }
        let ctx = minijinja::Value::from_serialize(Value::Object(ctx));
        let url = match url_override {
            Some(u) => u.to_owned(),
            None => self.render(op, &req.url, &ctx)?,
        };
        let mut rb = self
            .client
            .request(req.method.clone(), url.trim())
            .timeout(self.timeout);
        let mut headers: Vec<(String, String, bool)> = Vec::new();
        for (h, t) in &self.profile.headers {
            headers.push((h.clone(), self.render(op, t, &ctx)?, false));
        }
        // The login request itself carries no token header.
        if let Some((h, t)) = &self.profile.auth_header
            && (self.profile.config().auth.kind == AuthKind::Header || token.is_some())
        {
            headers.push((h.clone(), self.render(op, t, &ctx)?, true));
        }
        for (h, t) in &req.headers {
            headers.push((h.clone(), self.render(op, t, &ctx)?, false));
        }
        for (h, v) in extra_headers {
            headers.push((h.clone(), v.clone(), false));
        }
        for (h, v, sensitive) in headers {
            let mut value = reqwest::header::HeaderValue::from_str(&v).map_err(|_| {
                Failure::new(
                    ErrorClass::Config,
                    format!(
                        "endpoint {}: {op}: header {h} renders to an invalid value",
                        self.endpoint
                    ),
                )
            })?;
            value.set_sensitive(sensitive);
            rb = rb.header(h, value);
        }
        let body: Option<String> = if let Some(t) = &req.body {
            Some(self.render(op, t, &ctx)?)
        } else if let Some((query, vars)) = &req.graphql {
            let variables = match vars {
                Some(t) => {
                    let text = self.render(op, t, &ctx)?;
                    serde_json::from_str::<Value>(&text).map_err(|e| {
                        Failure::new(
                            ErrorClass::Config,
                            format!(
                                "endpoint {}: {op}: variables are not JSON: {e}",
                                self.endpoint
                            ),
                        )
                    })?
                }
                None => json!({}),
            };
            Some(json!({"query": query, "variables": variables}).to_string())
        } else {
            None
        };
        if let Some(b) = &body {
            rb = rb
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.clone());
        }
        tracing::debug!(endpoint = %self.endpoint, op, method = %req.method, url = %self.scrub(&url), "http adapter request");
        // Effect fencing: checked after rendering, right before the request leaves.
        bulwark_workflows::adapter::fence_check()?;
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                let failure = describe_send_error(&e);
                let msg = self.scrub(&format!(
                    "endpoint {}: {op}: {}: {}",
                    self.endpoint, failure.kind, failure.detail
                ));
                tracing::warn!(endpoint = %self.endpoint, op, error = %msg, request = %self.redact_body(body.as_deref()), "http adapter request failed");
                // A refused certificate does not heal by retrying: a configuration error.
                let class = if failure.certificate {
                    ErrorClass::Config
                } else {
                    ErrorClass::Transient
                };
                return Err(Failure::new(class, msg));
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let answered = resp.url().to_string();
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                return Err(Failure::new(
                    ErrorClass::Transient,
                    self.scrub(&format!(
                        "endpoint {}: {op}: response body failed: {}",
                        self.endpoint,
                        error_chain(&e)
                    )),
                ));
            }
        };
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::Null)
        };
        match self.classify(op, status, &headers, &text, &json) {
            Ok(()) => Ok(Resp {
                headers,
                json,
                url: answered,
            }),
            Err(f) => {
                if f.class != ErrorClass::NotFound {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        op,
                        status,
                        request = %self.redact_body(body.as_deref()),
                        response = %self.redact_body(Some(&text)),
                        "http adapter request refused"
                    );
                }
                Err(f)
            }
        }
    }

    /// Status and body checks of a response.
    fn classify(
        &self,
        op: &str,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        text: &str,
        json: &Value,
    ) -> Result<(), Failure> {
        let pc = self.profile.config();
        let msg = |detail: &str| {
            // Scrub before cutting: an excerpt must not end in half a secret.
            self.scrub(&format!(
                "endpoint {}: {op}: HTTP {status}: {}",
                self.endpoint,
                excerpt(&self.scrub(detail))
            ))
        };
        if op == "upload"
            && let Some(c) = &self.profile.conflict
            && (c.statuses.contains(&status)
                || c.path
                    .as_ref()
                    .is_some_and(|p| p.query(json).all().into_iter().any(|v| !is_empty_value(v))))
        {
            let shown = c
                .shown
                .as_ref()
                .and_then(|p| p.query(json).first().and_then(as_i64));
            return Err(Failure {
                conflict: Some(shown),
                ..Failure::new(ErrorClass::Rejected, msg(text))
            });
        }
        if pc.not_found_statuses.contains(&status) {
            return Err(Failure::new(ErrorClass::NotFound, msg(text)));
        }
        let ok = if pc.ok_statuses.is_empty() {
            (200..300).contains(&status)
        } else {
            pc.ok_statuses.contains(&status)
        };
        if !ok {
            let class = match status {
                400 | 409 | 422 => ErrorClass::Rejected,
                401 | 403 => ErrorClass::Auth,
                429 => ErrorClass::RateLimited,
                500..=599 => ErrorClass::Transient,
                _ => ErrorClass::Config,
            };
            let retry_after_ms = crate::transport::retry_after_ms(headers);
            return Err(Failure {
                retry_after_ms,
                ..Failure::new(class, msg(text))
            });
        }
        for rule in &self.profile.errors {
            let hits: Vec<&Value> = rule
                .path
                .query(json)
                .all()
                .into_iter()
                .filter(|v| !is_empty_value(v))
                .collect();
            if hits.is_empty() {
                continue;
            }
            let items = if rule.item_level() {
                self.item_hits(rule, &hits, &msg)
            } else {
                Vec::new()
            };
            let shown = Value::Array(hits.into_iter().cloned().collect()).to_string();
            return Err(Failure {
                items,
                ..Failure::new(
                    rule.class,
                    msg(&format!("{} matched: {shown}", rule.source)),
                )
            });
        }
        Ok(())
    }

    /// The items an item-level rule's matches name; empty when one of them names none
    /// (the whole request then fails with the rule's class).
    fn item_hits(
        &self,
        rule: &super::profile::CompiledErrorRule,
        hits: &[&Value],
        msg: &dyn Fn(&str) -> String,
    ) -> Vec<ItemHit> {
        let first = |p: &Option<JsonPath>, v: &Value| {
            p.as_ref()
                .and_then(|p| p.query(v).all().into_iter().next().cloned())
        };
        let mut out = Vec::with_capacity(hits.len());
        for hit in hits {
            let sku = first(&rule.sku, hit).as_ref().and_then(scalar_string);
            let index = first(&rule.index, hit).and_then(|v| match v {
                Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            });
            if sku.is_none() && index.is_none() {
                return Vec::new();
            }
            let text = match first(&rule.message, hit) {
                Some(Value::String(m)) => m,
                Some(v) => v.to_string(),
                None => hit.to_string(),
            };
            out.push(ItemHit {
                sku,
                index,
                message: msg(&text),
            });
        }
        out
    }

    /// A body for a log line: JSON fields that look like credentials blanked, known secrets
    /// scrubbed, bounded.
    fn redact_body(&self, body: Option<&str>) -> String {
        let Some(body) = body else {
            return String::new();
        };
        let text = match serde_json::from_str::<Value>(body) {
            Ok(mut v) => {
                redact_json(&mut v);
                v.to_string()
            }
            Err(_) => body.to_owned(),
        };
        excerpt(&self.scrub(&text))
    }

    async fn current_token(&self) -> AdapterResult<Option<(String, u64)>> {
        if self.profile.login.is_none() {
            return Ok(None);
        }
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref()
            && t.expires_at.is_none_or(|at| Instant::now() < at)
        {
            return Ok(Some((t.value.clone(), t.generation)));
        }
        let state = self.login().await?;
        let out = (state.value.clone(), state.generation);
        *guard = Some(state);
        Ok(Some(out))
    }

    async fn invalidate_token(&self, generation: u64) {
        let mut guard = self.token.lock().await;
        if guard.as_ref().is_some_and(|t| t.generation == generation) {
            *guard = None;
        }
    }

    async fn login(&self) -> AdapterResult<TokenState> {
        const OP: &str = "login";
        let Some(req) = &self.profile.login else {
            return Err(cfg_err(&self.endpoint, "profile has no login request"));
        };
        let resp = self
            .send(OP, req, &self.base_ctx(), None, &[], None)
            .await
            .map_err(|f| match f.class {
                ErrorClass::NotFound => AdapterError::Config(f.message),
                _ => f.into_error(),
            })?;
        let auth = &self.profile.config().auth;
        let token = if let Some(p) = &self.profile.token_path {
            p.query(&resp.json).first().and_then(scalar_string)
        } else {
            auth.token_header
                .as_deref()
                .and_then(|h| resp.headers.get(h))
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_owned())
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(AdapterError::Auth(format!(
                "endpoint {}: login: the response carries no token (auth.token_path / auth.token_header)",
                self.endpoint
            )));
        };
        self.redactor.add(&token);
        let ttl = self
            .profile
            .expires_in_path
            .as_ref()
            .and_then(|p| p.query(&resp.json).first().and_then(as_i64))
            .and_then(|s| u64::try_from(s).ok())
            .or(auth.ttl_secs);
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        tracing::debug!(endpoint = %self.endpoint, ttl_secs = ?ttl, "http adapter logged in");
        Ok(TokenState {
            value: token,
            // Renew a little early rather than be refused mid-run.
            expires_at: ttl.map(|s| Instant::now() + Duration::from_secs(s).mul_f64(0.9)),
            generation,
        })
    }

    /// Send with authentication: a refused token is renewed once; a second refusal in a
    /// row is an [`ErrorClass::Auth`] failure.
    async fn call(
        &self,
        op: &str,
        req: &CompiledRequest,
        ctx: &Map<String, Value>,
        extra_headers: &[(String, String)],
    ) -> Result<Resp, Failure> {
        self.call_at(op, req, ctx, extra_headers, None).await
    }

    /// [`Self::call`] at `url` instead of the request's URL template, if given.
    async fn call_at(
        &self,
        op: &str,
        req: &CompiledRequest,
        ctx: &Map<String, Value>,
        extra_headers: &[(String, String)],
        url: Option<&str>,
    ) -> Result<Resp, Failure> {
        let mut refreshed = false;
        loop {
            let token = self.current_token().await.map_err(Failure::from)?;
            let result = self
                .send(
                    op,
                    req,
                    ctx,
                    token.as_ref().map(|t| t.0.as_str()),
                    extra_headers,
                    url,
                )
                .await;
            match (result, token) {
                (Err(f), Some((_, generation))) if f.class == ErrorClass::Auth && !refreshed => {
                    tracing::info!(endpoint = %self.endpoint, op, "token refused; logging in again");
                    self.invalidate_token(generation).await;
                    refreshed = true;
                }
                (result, _) => return result,
            }
        }
    }

    fn transient_cache(&self, e: impl fmt::Display) -> AdapterError {
        AdapterError::Transient(format!("endpoint {}: {e}", self.endpoint))
    }

    fn config_failure(&self, op: &str, msg: impl fmt::Display) -> Failure {
        Failure::new(
            ErrorClass::Config,
            self.scrub(&format!("endpoint {}: {op}: {msg}", self.endpoint)),
        )
    }

    /// Send `req`, following `pagination` page by page from `state` (a fresh state
    /// starts at the first page). `on_page` gets each answer and says how many records it
    /// held and whether everything wanted was seen: then no further page is read, and
    /// `state` is left at the next page (a later listing may resume there). `Ok(true)`
    /// when the last page was read. More than `max_pages` pages, or a page that points
    /// back at itself, is a configuration error: never a silent cut.
    async fn paged(
        &self,
        op: &str,
        req: &CompiledRequest,
        mut ctx: Map<String, Value>,
        pagination: Option<&Pagination>,
        state: &mut PageState,
        mut on_page: impl FnMut(&Value) -> Result<(usize, bool), Failure>,
    ) -> Result<bool, Failure> {
        let Some(p) = pagination else {
            let resp = self.call(op, req, &ctx, &[]).await?;
            on_page(&resp.json)?;
            return Ok(true);
        };
        if !state.started {
            *state = PageState {
                started: true,
                page: p.start,
                offset: p.start,
                ..PageState::default()
            };
        }
        ctx.insert(
            "limit".into(),
            if p.size > 0 {
                json!(p.size)
            } else {
                Value::Null
            },
        );
        for _ in 0..p.max_pages {
            match p.kind {
                PageKind::Page => {
                    ctx.insert("page".into(), json!(state.page));
                }
                PageKind::Offset => {
                    ctx.insert("offset".into(), json!(state.offset));
                }
                PageKind::Cursor => {
                    ctx.insert(
                        "cursor".into(),
                        state.cursor.clone().map_or(Value::Null, Value::String),
                    );
                }
                PageKind::Link => {}
            }
            let resp = self
                .call_at(op, req, &ctx, &[], state.url.as_deref())
                .await?;
            let (count, done) = on_page(&resp.json)?;
            let more = self.advance(op, p, state, &resp, count)?;
            if !more {
                *state = PageState::default();
                return Ok(true);
            }
            if done {
                return Ok(false);
            }
        }
        Err(self.config_failure(
            op,
            format!(
                "pagination: more than max_pages = {} pages; raise `max_pages` if the listing is that long",
                p.max_pages
            ),
        ))
    }

    /// Move `state` past the page `resp` answered (`count` records): false at the end.
    fn advance(
        &self,
        op: &str,
        p: &Pagination,
        state: &mut PageState,
        resp: &Resp,
        count: usize,
    ) -> Result<bool, Failure> {
        match p.kind {
            PageKind::Page | PageKind::Offset => {
                if count == 0 || (count as u64) < p.size {
                    return Ok(false);
                }
                state.page += 1;
                state.offset += count as u64;
            }
            PageKind::Cursor => {
                if let Some(h) = &p.has_more
                    && h.query(&resp.json).first().is_none_or(is_empty_value)
                {
                    return Ok(false);
                }
                let next = p
                    .next
                    .as_ref()
                    .and_then(|n| n.query(&resp.json).first().and_then(scalar_string))
                    .filter(|c| !c.is_empty());
                let Some(next) = next else { return Ok(false) };
                if state.cursor.as_deref() == Some(next.as_str()) {
                    return Err(self.config_failure(
                        op,
                        format!("pagination: the next cursor {next:?} is the current one (the listing would never end)"),
                    ));
                }
                state.cursor = Some(next);
            }
            PageKind::Link => {
                let Some(next) = link_next(&resp.headers) else {
                    return Ok(false);
                };
                let next = reqwest::Url::parse(&resp.url)
                    .and_then(|u| u.join(&next))
                    .map_err(|e| {
                        self.config_failure(
                            op,
                            format!("pagination: Link next {next:?} is not a URL: {e}"),
                        )
                    })?;
                let base =
                    reqwest::Url::parse(&self.base_url).map_err(|e| self.config_failure(op, e))?;
                if next.origin() != base.origin() {
                    return Err(self.config_failure(
                        op,
                        format!(
                            "pagination: Link next {} leaves the origin of base_url (credentials are not sent elsewhere)",
                            next.origin().ascii_serialization()
                        ),
                    ));
                }
                if resp.url == next.as_str() {
                    return Err(self.config_failure(
                        op,
                        format!("pagination: Link next {next} is the current page (the listing would never end)"),
                    ));
                }
                state.url = Some(next.to_string());
            }
        }
        Ok(true)
    }

    fn decode_ids(&self, cached: &str) -> Option<Ids> {
        let names = &self.profile.id_names;
        if names.len() == 1 && names[0] == "id" {
            return Some(Ids::from([("id".to_owned(), cached.to_owned())]));
        }
        let ids: Ids = serde_json::from_str(cached).ok()?;
        // A profile that now captures more ids looks the SKU up again.
        names.iter().all(|n| ids.contains_key(n)).then_some(ids)
    }

    fn encode_ids(&self, ids: &Ids) -> String {
        let names = &self.profile.id_names;
        if names.len() == 1 && names[0] == "id" {
            return ids.get("id").cloned().unwrap_or_default();
        }
        serde_json::to_string(ids).unwrap_or_default()
    }

    fn unknown_sku(&self, sku: &str) -> AdapterError {
        AdapterError::Rejected(format!(
            "endpoint {}: lookup: SKU {sku:?} is unknown at the platform",
            self.endpoint
        ))
    }

    /// The values of `step`'s ids in `rec`: `Ok(None)` when one is missing (the SKU is
    /// unknown there), an error when one selects something that is not an id.
    fn capture(
        &self,
        ids: &[(String, JsonPath)],
        rec: &Value,
        sku: &str,
    ) -> Result<Option<Ids>, Failure> {
        let mut out = Ids::new();
        for (name, path) in ids {
            match path.query(rec).first() {
                None | Some(Value::Null) => return Ok(None),
                Some(v) => match scalar_string(v) {
                    Some(id) if !id.is_empty() => {
                        out.insert(name.clone(), id);
                    }
                    Some(_) => return Ok(None),
                    None => {
                        let what = if v.is_object() {
                            "an object"
                        } else if v.is_array() {
                            "a list"
                        } else {
                            "a non-id value"
                        };
                        return Err(self.config_failure(
                            "lookup",
                            format!("id `{name}` of SKU {sku:?}: its JSON path selected {what}, not a scalar id: {}", excerpt(&v.to_string())),
                        ));
                    }
                },
            }
        }
        Ok(Some(out))
    }

    /// `step`'s SKU path and id paths, rendered once for `ctx` (not per record).
    fn step_paths(
        &self,
        step: &CompiledLookup,
        ctx: &minijinja::Value,
    ) -> Result<(Option<JsonPath>, IdPaths), Failure> {
        let resolve = |p: &super::profile::PathT| {
            p.resolve(&self.profile.env, ctx)
                .map_err(|e| self.config_failure("lookup", e))
        };
        let sku = step.sku.as_ref().map(resolve).transpose()?;
        let ids = step
            .ids
            .iter()
            .map(|(n, p)| Ok((n.clone(), resolve(p)?)))
            .collect::<Result<_, Failure>>()?;
        Ok((sku, ids))
    }

    /// The platform's ids of `items` (empty without a lookup): cached ones, then the
    /// lookup chain for the others. A SKU whose lookup fails is listed with its error
    /// and the others go on (a systemic failure, e.g. refused credentials, stops the rest:
    /// each of them is listed with it). `Err` only when the id cache fails.
    async fn ids_each(
        &self,
        items: &[Item],
    ) -> AdapterResult<(HashMap<String, Ids>, Vec<(String, AdapterError)>)> {
        let mut failed = Vec::new();
        if self.profile.lookups.is_empty() {
            return Ok((HashMap::new(), failed));
        }
        let mut ids = self.cached_ids(items).await?;
        if items.iter().all(|i| ids.contains_key(&i.sku)) {
            return Ok((ids, failed));
        }
        let listing = self
            .profile
            .lookups
            .iter()
            .any(|l| l.mode == LookupMode::List);
        let mut turn = if listing {
            let guard = self.listing.lock().await;
            // Another batch may have listed while this one waited.
            ids = self.cached_ids(items).await?;
            Some(guard)
        } else {
            None
        };
        let mut partial: Vec<(&Item, Ids)> = items
            .iter()
            .filter(|i| !ids.contains_key(&i.sku))
            .map(|i| (i, Ids::new()))
            .collect();
        let mut others: Vec<(String, Ids)> = Vec::new();
        let single = self.profile.lookups.len() == 1;
        for step in &self.profile.lookups {
            let (kept, lost) = self
                .lookup_step(
                    step,
                    partial,
                    single.then_some(&mut others),
                    turn.as_deref_mut(),
                )
                .await;
            partial = kept;
            failed.extend(lost);
            if partial.is_empty() {
                break;
            }
        }
        let found: Vec<(String, String)> = partial
            .iter()
            .map(|(i, v)| (i.sku.clone(), self.encode_ids(v)))
            .chain(
                others
                    .iter()
                    .filter(|(sku, _)| !ids.contains_key(sku))
                    .map(|(sku, v)| (sku.clone(), self.encode_ids(v))),
            )
            .collect();
        for (item, v) in partial {
            ids.insert(item.sku.clone(), v);
        }
        if !found.is_empty() {
            self.cache
                .put_many(self.profile.name(), &self.endpoint, &found)
                .await
                .map_err(|e| self.transient_cache(e))?;
        }
        Ok((ids, failed))
    }

    async fn cached_ids(&self, items: &[Item]) -> AdapterResult<HashMap<String, Ids>> {
        let skus: Vec<String> = items.iter().map(|i| i.sku.clone()).collect();
        let cached = self
            .cache
            .get_many(self.profile.name(), &self.endpoint, &skus)
            .await
            .map_err(|e| self.transient_cache(e))?;
        Ok(cached
            .into_iter()
            .filter_map(|(sku, v)| self.decode_ids(&v).map(|ids| (sku, ids)))
            .collect())
    }

    /// Run one lookup step for `items` (with the ids found so far): the items it found,
    /// with its ids added, and the ones it did not, with why. `others` collects the ids
    /// of every other record a listing saw (to cache them too).
    async fn lookup_step<'i>(
        &self,
        step: &CompiledLookup,
        items: Vec<(&'i Item, Ids)>,
        mut others: Option<&mut Vec<(String, Ids)>>,
        mut resume: Option<&mut PageState>,
    ) -> (Vec<(&'i Item, Ids)>, Vec<(String, AdapterError)>) {
        const OP: &str = "lookup";
        let decimals = self.profile.config().price_decimals;
        let mut kept = Vec::new();
        let mut lost = Vec::new();
        let mut stop: Option<AdapterError> = None;
        let base = self.base_ctx();
        let base_path_ctx = minijinja::Value::from_serialize(Value::Object(base.clone()));
        match step.mode {
            LookupMode::PerItem => {
                for (item, mut have) in items {
                    if let Some(e) = &stop {
                        lost.push((item.sku.clone(), e.clone()));
                        continue;
                    }
                    let mut ctx = base.clone();
                    ctx.insert("sku".into(), Value::String(item.sku.clone()));
                    ctx.insert("item".into(), item_value(item, Some(&have), decimals));
                    ctx.insert("ids".into(), json!(have));
                    let path_ctx = minijinja::Value::from_serialize(Value::Object(ctx.clone()));
                    let mut got: Option<Ids> = None;
                    let result = match self.step_paths(step, &path_ctx) {
                        Err(f) => Err(f),
                        Ok((sku_path, id_paths)) => {
                            self.paged(
                                OP,
                                &step.request,
                                ctx,
                                step.pagination.as_ref(),
                                &mut PageState::default(),
                                |json| {
                                    let recs =
                                        self.records_of(step.records.as_ref(), json, &path_ctx)?;
                                    let n = recs.len();
                                    for rec in recs {
                                        if rec.is_null() {
                                            continue;
                                        }
                                        if let Some(sp) = &sku_path
                                            && sp
                                                .query(rec)
                                                .first()
                                                .and_then(scalar_string)
                                                .as_deref()
                                                != Some(item.sku.as_str())
                                        {
                                            continue;
                                        }
                                        if let Some(v) = self.capture(&id_paths, rec, &item.sku)? {
                                            got = Some(v);
                                            return Ok((n, true));
                                        }
                                    }
                                    Ok((n, false))
                                },
                            )
                            .await
                        }
                    };
                    match result {
                        Ok(_) => match got {
                            Some(v) => {
                                have.extend(v);
                                kept.push((item, have));
                            }
                            None => lost.push((item.sku.clone(), self.unknown_sku(&item.sku))),
                        },
                        Err(f) if f.class == ErrorClass::NotFound => {
                            lost.push((item.sku.clone(), self.unknown_sku(&item.sku)));
                        }
                        Err(f) => {
                            let e = f.into_error();
                            if is_systemic(&e) {
                                stop = Some(e.clone());
                            }
                            lost.push((item.sku.clone(), e));
                        }
                    }
                }
            }
            LookupMode::PerBatch | LookupMode::List => {
                let chunk = if step.mode == LookupMode::List {
                    usize::MAX
                } else {
                    step.per_request
                };
                // The paths see only the endpoint's values: rendered once for the step.
                let (sku_path, id_paths) = match self.step_paths(step, &base_path_ctx) {
                    Ok((Some(sp), ids)) => (sp, ids),
                    Ok((None, _)) => {
                        let e = self
                            .config_failure(OP, "lookup needs a `sku` path")
                            .into_error();
                        lost.extend(items.iter().map(|(i, _)| (i.sku.clone(), e.clone())));
                        return (kept, lost);
                    }
                    Err(f) => {
                        let e = f.into_error();
                        lost.extend(items.iter().map(|(i, _)| (i.sku.clone(), e.clone())));
                        return (kept, lost);
                    }
                };
                let mut rest = items;
                while !rest.is_empty() {
                    let take = chunk.min(rest.len());
                    let group: Vec<(&'i Item, Ids)> = rest.drain(..take).collect();
                    if let Some(e) = &stop {
                        lost.extend(group.iter().map(|(i, _)| (i.sku.clone(), e.clone())));
                        continue;
                    }
                    let mut ctx = base.clone();
                    if step.mode == LookupMode::PerBatch {
                        ctx.insert(
                            "skus".into(),
                            group
                                .iter()
                                .map(|(i, _)| Value::String(i.sku.clone()))
                                .collect(),
                        );
                        ctx.insert(
                            "items".into(),
                            group
                                .iter()
                                .map(|(i, have)| item_value(i, Some(have), decimals))
                                .collect(),
                        );
                    }
                    let wanted: HashSet<&str> = group.iter().map(|(i, _)| i.sku.as_str()).collect();
                    let mut got: HashMap<String, Ids> = HashMap::new();
                    let mut seen_others: Vec<(String, Ids)> = Vec::new();
                    let collect_others = others.is_some();
                    // A listing resumes where the last one of this run stopped (records
                    // come in a stable order); past the end, it starts over once.
                    let mut local = PageState::default();
                    let list_state = match resume.as_deref_mut() {
                        Some(st) if step.mode == LookupMode::List => st,
                        _ => &mut local,
                    };
                    let resumed = list_state.started;
                    let mut rounds = 0;
                    let result = loop {
                        rounds += 1;
                        let r = self
                            .paged(
                                OP,
                                &step.request,
                                ctx.clone(),
                                step.pagination.as_ref(),
                                list_state,
                                |json| {
                                    let recs = self.records_of(
                                        step.records.as_ref(),
                                        json,
                                        &base_path_ctx,
                                    )?;
                                    let n = recs.len();
                                    for rec in recs {
                                        let Some(sku) =
                                            sku_path.query(rec).first().and_then(scalar_string)
                                        else {
                                            continue;
                                        };
                                        if wanted.contains(sku.as_str()) {
                                            if !got.contains_key(&sku)
                                                && let Some(v) =
                                                    self.capture(&id_paths, rec, &sku)?
                                            {
                                                got.insert(sku, v);
                                            }
                                        } else if collect_others
                                            && let Ok(Some(v)) = self.capture(&id_paths, rec, &sku)
                                        {
                                            seen_others.push((sku, v));
                                        }
                                    }
                                    Ok((n, got.len() == wanted.len()))
                                },
                            )
                            .await;
                        match r {
                            Ok(true) if resumed && rounds == 1 && got.len() < wanted.len() => {
                                continue;
                            }
                            r => break r,
                        }
                    };
                    match result {
                        Ok(_) => {
                            if let Some(o) = others.as_deref_mut() {
                                o.extend(seen_others);
                            }
                            for (item, mut have) in group {
                                match got.remove(&item.sku) {
                                    Some(v) => {
                                        have.extend(v);
                                        kept.push((item, have));
                                    }
                                    None => {
                                        lost.push((item.sku.clone(), self.unknown_sku(&item.sku)))
                                    }
                                }
                            }
                        }
                        Err(f) => {
                            let e = if f.class == ErrorClass::NotFound {
                                AdapterError::Transient(f.message)
                            } else {
                                f.into_error()
                            };
                            if is_systemic(&e) {
                                stop = Some(e.clone());
                            }
                            lost.extend(group.iter().map(|(i, _)| (i.sku.clone(), e.clone())));
                        }
                    }
                }
            }
        }
        (kept, lost)
    }

    /// The records `path` selects in `json` (a path may select the list itself or its
    /// elements); without a path, the whole answer.
    fn records_of<'v>(
        &self,
        path: Option<&super::profile::PathT>,
        json: &'v Value,
        ctx: &minijinja::Value,
    ) -> Result<Vec<&'v Value>, Failure> {
        let Some(path) = path else {
            return Ok(vec![json]);
        };
        let path = path
            .resolve(&self.profile.env, ctx)
            .map_err(|e| self.config_failure("records", e))?;
        Ok(flatten(path.query(json).all()))
    }

    /// Forget `item`'s cached ids and look them up again.
    async fn relookup(&self, item: &Item) -> AdapterResult<Ids> {
        self.forget_id(&item.sku).await?;
        let (mut ids, failed) = self.ids_each(std::slice::from_ref(item)).await?;
        if let Some((_, e)) = failed.into_iter().next() {
            return Err(e);
        }
        ids.remove(&item.sku)
            .ok_or_else(|| self.unknown_sku(&item.sku))
    }

    async fn forget_id(&self, sku: &str) -> AdapterResult<()> {
        self.cache
            .invalidate(self.profile.name(), &self.endpoint, sku)
            .await
            .map_err(|e| self.transient_cache(e))
    }

    fn take_suspect(&self, key: Uuid) -> bool {
        self.suspects.lock().is_ok_and(|mut s| s.remove(&key))
    }

    fn mark_suspect(&self, key: Uuid) {
        if let Ok(mut s) = self.suspects.lock() {
            s.insert(key);
        }
    }

    fn item_ctx(
        &self,
        batch: &Batch,
        item: &Item,
        ids: Option<&Ids>,
        key: String,
    ) -> Map<String, Value> {
        let mut ctx = self.base_ctx();
        ctx.insert("key".into(), Value::String(key));
        ctx.insert("batch".into(), Self::batch_ctx(batch));
        ctx.insert("sku".into(), Value::String(item.sku.clone()));
        ctx.insert(
            "item".into(),
            item_value(item, ids, self.profile.config().price_decimals),
        );
        if let Some(ids) = ids {
            if let Some(id) = ids.get("id") {
                ctx.insert("id".into(), Value::String(id.clone()));
            }
            ctx.insert("ids".into(), json!(ids));
        }
        ctx
    }

    fn receipt_from(&self, path: Option<&JsonPath>, json: &Value, default: String) -> String {
        path.and_then(|p| p.query(json).first().and_then(scalar_string))
            .map(|r| self.scrub(&r))
            .unwrap_or(default)
    }

    /// The write requests to send for an item or chunk whose `needed` fields differ (or
    /// all of the endpoint's fields): (index, request).
    fn writes_for(&self, needed: Option<&[Field]>) -> Vec<(usize, &super::profile::CompiledWrite)> {
        self.profile
            .writes
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.fields
                    .iter()
                    .any(|f| self.owns.contains(f) && needed.is_none_or(|n| n.contains(f)))
            })
            .collect()
    }

    /// The idempotency key of write request `j` of the request keyed `key`: the first
    /// keeps it, the others derive theirs from it.
    /// The SKUs (with messages) of `chunk` that an item-level failure names; `None` when
    /// one of its matches names no item of the request.
    fn named_items(f: &Failure, chunk: &[Item]) -> Option<Vec<(String, String)>> {
        f.items
            .iter()
            .map(|hit| {
                let item = match (&hit.sku, hit.index) {
                    (Some(sku), _) => chunk.iter().find(|i| &i.sku == sku),
                    (None, Some(i)) => chunk.get(i),
                    (None, None) => None,
                }?;
                Some((item.sku.clone(), hit.message.clone()))
            })
            .collect()
    }

    fn request_key(key: Uuid, j: usize) -> Uuid {
        if j == 0 {
            key
        } else {
            Uuid::new_v5(&key, format!("request-{j}").as_bytes())
        }
    }

    /// Write one item (every write request its `needed` fields need). Compare-and-set
    /// stock: `Ok(Some(qty))` when the stock was written lowered, to `qty`; `Err(why)`
    /// when it was left as the shop has it (`skip_and_alert`; the other writes went).
    async fn write_item(
        &self,
        batch: &Batch,
        item: &Item,
        ids: &mut HashMap<String, Ids>,
        needed: Option<&[Field]>,
    ) -> AdapterResult<Result<Option<i64>, String>> {
        let key = Uuid::new_v5(&batch.key, item.sku.as_bytes());
        let cas = batch
            .cas
            .get(&item.sku)
            .copied()
            .filter(|_| self.compares_stock());
        let mut lowered = None;
        // Stock left alone (skip_and_alert): the other writes (prices) still go; the item
        // is then refused for its stock.
        let mut skipped = None;
        for (j, w) in self.writes_for(needed) {
            let key = Self::request_key(key, j);
            match cas.filter(|_| w.fields.contains(&Field::Qty)) {
                Some(cas) => match self.write_compared(batch, item, ids, w, key, cas).await? {
                    Ok(l) => lowered = l,
                    Err(message) => skipped = Some(message),
                },
                None => match self.write_request(batch, item, ids, w, key, None).await {
                    Ok(()) => {}
                    Err(WriteErr::Other(e)) => return Err(e),
                    Err(WriteErr::Conflict(_, message)) => {
                        return Err(AdapterError::Rejected(message));
                    }
                },
            }
        }
        Ok(match skipped {
            Some(message) => Err(message),
            None => Ok(lowered),
        })
    }

    /// Compare-and-set: write `item`'s stock only if the platform still shows what Bulwark
    /// last confirmed; when it does not, `on_conflict` decides (see [`OnConflict`]).
    /// `Ok(Err(why))`: left as the shop has it (`skip_and_alert`).
    async fn write_compared(
        &self,
        batch: &Batch,
        item: &Item,
        ids: &mut HashMap<String, Ids>,
        w: &super::profile::CompiledWrite,
        key: Uuid,
        cas: Cas,
    ) -> AdapterResult<Result<Option<i64>, String>> {
        let mut compare = cas.compare;
        for round in 0..CAS_ROUNDS {
            let target = cas.target(item.qty, compare);
            let sent = Item {
                qty: target,
                ..item.clone()
            };
            // Another round sends another request: a key of its own.
            let key = if round == 0 {
                key
            } else {
                Uuid::new_v5(&key, format!("compare-{round}").as_bytes())
            };
            match self
                .write_request(batch, &sent, ids, w, key, Some(compare))
                .await
            {
                Ok(()) => return Ok(Ok((target < item.qty).then_some(target))),
                Err(WriteErr::Other(e)) => return Err(e),
                Err(WriteErr::Conflict(shown, message)) => {
                    let shown = match shown {
                        Some(q) => q,
                        None => self.shown_qty(batch, item, ids).await?,
                    };
                    tracing::info!(endpoint = %self.endpoint, sku = %item.sku, compared = compare, shown, erp = item.qty, "compare-and-set: the shop's stock moved since the last confirmed write");
                    if self.on_conflict == OnConflict::SkipAndAlert {
                        return Ok(Err(self.scrub(&format!(
                            "stock not overwritten: the shop shows {shown}, not the {compare} Bulwark last confirmed (on_conflict = \"skip_and_alert\"; the ERP has {}): {message}",
                            item.qty
                        ))));
                    }
                    compare = shown;
                }
            }
        }
        Err(AdapterError::Transient(format!(
            "endpoint {}: stock of {}: the compare failed {CAS_ROUNDS} times in a row (the shop's stock keeps moving); tried again later",
            self.endpoint, item.sku
        )))
    }

    /// The quantity the platform shows for `item` now (after a failed compare whose
    /// answer did not say).
    async fn shown_qty(
        &self,
        batch: &Batch,
        item: &Item,
        ids: &HashMap<String, Ids>,
    ) -> AdapterResult<i64> {
        let one = Batch {
            items: vec![item.clone()],
            cas: Default::default(),
            ..batch.clone()
        };
        let (shown, unread) = self.read_shown(&one, ids).await?;
        if let Some(e) = unread.get(&item.sku) {
            return Err(e.clone());
        }
        match shown.get(&item.sku) {
            Some(Ok(Shown { qty: Some(q), .. })) => Ok(*q),
            Some(Err(e)) => Err(AdapterError::Transient(self.scrub(&format!(
                "endpoint {}: stock of {}: the compare failed and its stock cannot be read: {e}",
                self.endpoint, item.sku
            )))),
            _ => Err(AdapterError::Transient(format!(
                "endpoint {}: stock of {}: the compare failed and the read-back shows no quantity",
                self.endpoint, item.sku
            ))),
        }
    }

    /// Send write request `w` for `item` under `key` (`confirmed`: the quantity a
    /// compare-and-set write compares with). A stale cached id is looked up again once.
    async fn write_request(
        &self,
        batch: &Batch,
        item: &Item,
        ids: &mut HashMap<String, Ids>,
        w: &super::profile::CompiledWrite,
        key: Uuid,
        confirmed: Option<i64>,
    ) -> Result<(), WriteErr> {
        const OP: &str = "upload";
        let key = key.to_string();
        let extra: Vec<(String, String)> = w
            .idempotency_header
            .iter()
            .map(|h| (h.clone(), key.clone()))
            .collect();
        for attempt in 0..2 {
            let mut ctx = self.item_ctx(batch, item, ids.get(&item.sku), key.clone());
            if let (Some(q), Some(Value::Object(iv))) = (confirmed, ctx.get_mut("item")) {
                iv.insert("confirmed_qty".into(), json!(q));
            }
            match self.call(OP, &w.request, &ctx, &extra).await {
                Ok(_) => return Ok(()),
                Err(f) if f.conflict.is_some() && confirmed.is_some() => {
                    return Err(WriteErr::Conflict(f.conflict.flatten(), f.message));
                }
                Err(f) if f.class == ErrorClass::NotFound && self.profile.uses_lookup() => {
                    // The cached ids went stale: look them up again, retry once.
                    ids.remove(&item.sku);
                    if attempt == 1 {
                        self.forget_id(&item.sku).await?;
                        return Err(WriteErr::Other(AdapterError::Rejected(f.message)));
                    }
                    let fresh = self.relookup(item).await?;
                    ids.insert(item.sku.clone(), fresh);
                }
                Err(f) => return Err(WriteErr::Other(f.into_error())),
            }
        }
        Ok(())
    }

    /// What the platform shows for each item of `batch` (absent SKUs are missing), and,
    /// reading item by item, the items that could not be read, with why (a per-batch
    /// read is all or nothing).
    async fn read_shown(
        &self,
        batch: &Batch,
        ids: &HashMap<String, Ids>,
    ) -> AdapterResult<(Shown2, HashMap<String, AdapterError>)> {
        const OP: &str = "verify";
        let paths = &self.read_paths;
        let decimals = self.profile.config().price_decimals;
        let mut out = HashMap::new();
        let mut unread: HashMap<String, AdapterError> = HashMap::new();
        match self.profile.config().read.mode {
            Mode::PerBatch => {
                let mut ctx = self.base_ctx();
                ctx.insert("batch".into(), Self::batch_ctx(batch));
                ctx.insert(
                    "items".into(),
                    batch
                        .items
                        .iter()
                        .map(|i| item_value(i, ids.get(&i.sku), decimals))
                        .collect(),
                );
                ctx.insert(
                    "skus".into(),
                    batch
                        .items
                        .iter()
                        .map(|i| Value::String(i.sku.clone()))
                        .collect(),
                );
                let wanted: HashSet<&str> = batch.items.iter().map(|i| i.sku.as_str()).collect();
                let sku_path = paths.sku.as_ref();
                self.paged(
                    OP,
                    &self.profile.read,
                    ctx,
                    self.profile.read_pagination.as_ref(),
                    &mut PageState::default(),
                    |json| {
                        let recs = match &paths.records {
                            Some(p) => flatten(p.query(json).all()),
                            None => vec![json],
                        };
                        let n = recs.len();
                        for r in recs {
                            let sku =
                                sku_path.and_then(|p| p.query(r).first().and_then(scalar_string));
                            if let Some(sku) = sku
                                && wanted.contains(sku.as_str())
                            {
                                out.insert(sku, self.parse_shown(r));
                            }
                        }
                        Ok((n, out.len() >= wanted.len()))
                    },
                )
                .await
                .map_err(Failure::into_error)?;
            }
            Mode::PerItem => {
                let mut stop: Option<AdapterError> = None;
                for item in &batch.items {
                    if let Some(e) = &stop {
                        unread.insert(item.sku.clone(), e.clone());
                        continue;
                    }
                    if self.profile.uses_lookup() && !ids.contains_key(&item.sku) {
                        // Its id could not be looked up (the caller knows why).
                        continue;
                    }
                    let ctx = self.item_ctx(batch, item, ids.get(&item.sku), batch.key.to_string());
                    match self.call(OP, &self.profile.read, &ctx, &[]).await {
                        Ok(resp) => {
                            let rec = match &paths.records {
                                Some(p) => p.query(&resp.json).first(),
                                None => Some(&resp.json),
                            };
                            if let Some(rec) = rec.filter(|r| !r.is_null()) {
                                out.insert(item.sku.clone(), self.parse_shown(rec));
                            }
                        }
                        Err(f) if f.class == ErrorClass::NotFound => {
                            if self.profile.uses_lookup() {
                                self.forget_id(&item.sku).await?;
                            }
                        }
                        Err(f) => {
                            let e = f.into_error();
                            if is_systemic(&e) {
                                stop = Some(e.clone());
                            }
                            unread.insert(item.sku.clone(), e);
                        }
                    }
                }
            }
        }
        Ok((out, unread))
    }

    fn parse_shown(&self, rec: &Value) -> Result<Shown, String> {
        let paths = &self.read_paths;
        let read = &self.profile.config().read;
        let decimals = self.profile.config().price_decimals;
        let price = |v: &Value| parse_price(v, read.price_unit, decimals);
        let qty = match paths.qty.as_ref().and_then(|p| p.query(rec).first()) {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_i64(v).ok_or_else(|| format!("quantity {v} is not an integer"))?),
        };
        let tiers = match &paths.tiers {
            None => None,
            Some((list, min_qty, p)) => {
                let mut tiers = Vec::new();
                for t in flatten(list.query(rec).all()) {
                    let m = min_qty
                        .query(t)
                        .first()
                        .and_then(as_i64)
                        .ok_or_else(|| format!("tier {t} has no integer minimum quantity"))?;
                    let pv = p
                        .query(t)
                        .first()
                        .ok_or_else(|| format!("tier {t} has no price"))?;
                    tiers.push((m, price(pv)?));
                }
                tiers.sort();
                Some(tiers)
            }
        };
        let price = match &paths.price {
            None => None,
            Some(p) => match p.query(rec).first() {
                None | Some(Value::Null) => None,
                Some(v) => Some(price(v)?),
            },
        };
        let currency = paths
            .currency
            .as_ref()
            .and_then(|p| p.query(rec).first().and_then(scalar_string));
        Ok(Shown {
            qty,
            tiers,
            price,
            currency,
        })
    }

    /// `None` when `shown` equals `want` in every field this endpoint owns, else a
    /// description of the difference.
    fn differs(
        &self,
        want: &Item,
        shown: Option<&Result<Shown, String>>,
        compared: bool,
    ) -> Option<String> {
        let (_, d) = self.diff(want, shown, compared);
        d
    }

    /// Is `sku`'s stock written compare-and-set in `batch`? Its read-back then accepts
    /// any quantity from 0 up to the batch's: the shop may have sold some since, and a
    /// lowered write shows less.
    fn compared(&self, batch: &Batch, sku: &str) -> bool {
        self.compares_stock() && batch.cas.contains_key(sku)
    }

    /// The owned fields that differ (all of them when nothing readable shows), and a
    /// description.
    fn diff(
        &self,
        want: &Item,
        shown: Option<&Result<Shown, String>>,
        compared: bool,
    ) -> (Vec<Field>, Option<String>) {
        let shown = match shown {
            None => return (self.owns.clone(), Some("shown absent".into())),
            Some(Err(e)) => return (self.owns.clone(), Some(format!("unreadable: {e}"))),
            Some(Ok(s)) => s,
        };
        let mut fields = Vec::new();
        let mut diffs = Vec::new();
        let qty_ok = match shown.qty {
            Some(q) if compared => (0..=want.qty).contains(&q),
            q => q == Some(want.qty),
        };
        if self.owns.contains(&Field::Qty) && !qty_ok {
            if compared {
                diffs.push(format!(
                    "qty expected at most {} shown {:?}",
                    want.qty, shown.qty
                ));
            } else {
                diffs.push(format!("qty expected {} shown {:?}", want.qty, shown.qty));
            }
            fields.push(Field::Qty);
        }
        if self.owns.contains(&Field::Prices) {
            let before = diffs.len();
            if let Some(tiers) = &shown.tiers {
                let mut expected: Vec<(i64, i64)> = want
                    .tiers
                    .iter()
                    .map(|t| (i64::from(t.min_qty), t.price_minor))
                    .collect();
                expected.sort();
                if *tiers != expected {
                    diffs.push(format!("tiers expected {expected:?} shown {tiers:?}"));
                }
            }
            if self.read_paths.price.is_some()
                && let Some(first) = want.tiers.first()
                && shown.price != Some(first.price_minor)
            {
                diffs.push(format!(
                    "price expected {} shown {:?}",
                    first.price_minor, shown.price
                ));
            }
            if let Some(cur) = &self.currency
                && self.read_paths.currency.is_some()
                && shown.currency.as_deref() != Some(cur.as_str())
            {
                diffs.push(format!(
                    "currency expected {cur} shown {:?}",
                    shown.currency
                ));
            }
            if diffs.len() > before {
                fields.push(Field::Prices);
            }
        }
        if diffs.is_empty() {
            (fields, None)
        } else {
            (fields, Some(diffs.join(", ")))
        }
    }

    fn compare(
        &self,
        items: &[Item],
        shown: &HashMap<String, Result<Shown, String>>,
    ) -> Verification {
        let read = ReadBack::of(
            items,
            |_| None,
            |want| self.differs(want, shown.get(&want.sku), false),
        );
        self.verdict(items.len(), &read.differing)
    }

    /// The verdict on `items` items read, of which `differing` differ (scrubbed).
    fn verdict(&self, items: usize, differing: &[Difference]) -> Verification {
        match Verification::of(items, differing) {
            Verification::Mismatch { details } => Verification::Mismatch {
                details: self.scrub(&details),
            },
            v => v,
        }
    }
}

/// Records selected by a path: a selected list counts as its elements.
fn flatten(nodes: Vec<&Value>) -> Vec<&Value> {
    let mut out = Vec::new();
    for n in nodes {
        match n {
            Value::Array(a) => out.extend(a.iter()),
            v => out.push(v),
        }
    }
    out
}

/// The `rel="next"` target of a `Link` header (RFC 8288), if any.
fn link_next(headers: &reqwest::header::HeaderMap) -> Option<String> {
    for value in headers.get_all(reqwest::header::LINK) {
        let Ok(text) = value.to_str() else { continue };
        let mut rest = text;
        while let Some(open) = rest.find('<') {
            let after = &rest[open + 1..];
            let close = after.find('>')?;
            let target = &after[..close];
            let params_end = after[close..].find('<').map_or(after.len(), |i| close + i);
            let params = &after[close + 1..params_end];
            let is_next = params.split(';').any(|p| {
                let p = p.trim().trim_end_matches(',').trim();
                p.to_ascii_lowercase()
                    .strip_prefix("rel=")
                    .is_some_and(|v| {
                        v.trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|r| r == "next")
                    })
            });
            if is_next {
                return Some(target.to_owned());
            }
            rest = &after[params_end..];
        }
    }
    None
}

#[async_trait]
impl PortalAdapter for HttpAdapter {
    fn compares_stock(&self) -> bool {
        self.profile.conflict.is_some() && self.owns.contains(&Field::Qty)
    }

    fn deduplicates(&self) -> bool {
        // Without an idempotency header nothing tells a repeated write from a new one.
        self.writes_for(None)
            .iter()
            .all(|(_, w)| w.idempotency_header.is_some())
    }

    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        const OP: &str = "upload";
        let suspect = self.take_suspect(batch.request_key());
        let (mut ids, lookup_failed) = self.ids_each(&batch.items).await?;
        let default_receipt = batch.key.to_string();
        match self.profile.write_mode {
            Mode::PerItem => {
                // Item by item: one refused or failing item does not stop the others; the
                // answer says which landed (AdapterError::Partial), so a retry sends only
                // the rest.
                let mut outcome = ItemOutcomes::default();
                for (sku, e) in lookup_failed {
                    outcome.record(sku, e);
                }
                let mut skip: HashSet<String> = outcome.skus().into_iter().collect();
                let mut needed: HashMap<String, Vec<Field>> = HashMap::new();
                // After an unanswered attempt, write only what does not show yet.
                if suspect && outcome.stop.is_none() {
                    let (shown, unread) = self.read_shown(batch, &ids).await?;
                    for item in &batch.items {
                        if skip.contains(item.sku.as_str()) {
                            continue;
                        }
                        if let Some(e) = unread.get(&item.sku) {
                            outcome.record(item.sku.clone(), e.clone());
                            skip.insert(item.sku.clone());
                            continue;
                        }
                        let compared = self.compared(batch, &item.sku);
                        let (fields, differs) = self.diff(item, shown.get(&item.sku), compared);
                        if differs.is_none() {
                            // Compare-and-set: what shows lower (written lowered, or sold
                            // since) is what the next write compares with.
                            if compared
                                && let Some(Ok(Shown { qty: Some(q), .. })) = shown.get(&item.sku)
                                && *q < item.qty
                            {
                                outcome.adjusted.push(Adjusted {
                                    sku: item.sku.clone(),
                                    qty: *q,
                                });
                            }
                            outcome.done.push(item.sku.clone());
                            skip.insert(item.sku.clone());
                        } else {
                            needed.insert(item.sku.clone(), fields);
                        }
                    }
                }
                tracing::debug!(endpoint = %self.endpoint, key = %batch.key, items = batch.items.len() - skip.len(), of = batch.items.len(), suspect, "http adapter per-item upload");
                for item in &batch.items {
                    if skip.contains(item.sku.as_str()) {
                        continue;
                    }
                    if let Some(e) = &outcome.stop {
                        let e = e.clone();
                        outcome.record(item.sku.clone(), e);
                        continue;
                    }
                    let need = needed.get(&item.sku).map(Vec::as_slice);
                    match self.write_item(batch, item, &mut ids, need).await {
                        Ok(Err(message)) => outcome.rejected.push(ItemRejection {
                            sku: item.sku.clone(),
                            message,
                            kept: true,
                        }),
                        Ok(Ok(lowered)) => {
                            if let Some(qty) = lowered {
                                outcome.adjusted.push(Adjusted {
                                    sku: item.sku.clone(),
                                    qty,
                                });
                            }
                            outcome.done.push(item.sku.clone());
                        }
                        Err(e) => outcome.record(item.sku.clone(), e),
                    }
                }
                outcome.into_result(Receipt {
                    id: default_receipt,
                })
            }
            Mode::PerBatch => {
                if let Some((_, e)) = lookup_failed.into_iter().next() {
                    return Err(e);
                }
                let mut needed: Option<Vec<Field>> = None;
                if suspect {
                    let (shown, _) = self.read_shown(batch, &ids).await?;
                    if self.compare(&batch.items, &shown) == Verification::Verified {
                        tracing::info!(endpoint = %self.endpoint, key = %batch.key, "batch already shows; not sent again");
                        return Ok(Receipt {
                            id: default_receipt,
                        });
                    }
                    let mut fields: Vec<Field> = batch
                        .items
                        .iter()
                        .flat_map(|i| self.diff(i, shown.get(&i.sku), false).0)
                        .collect();
                    fields.sort();
                    fields.dedup();
                    needed = Some(fields);
                }
                let decimals = self.profile.config().price_decimals;
                let mut receipt = None;
                // Items an item-level error rule named, and what it said of them; the
                // other items of those requests landed.
                let mut failed: HashMap<String, AdapterError> = HashMap::new();
                // A remainder is a request of its own: its keys derive from its own key.
                let base = batch.request_key();
                for (j, w) in self.writes_for(needed.as_deref()) {
                    let per = w.items_per_request.unwrap_or(usize::MAX).max(1);
                    for (i, chunk) in batch.items.chunks(per).enumerate() {
                        let key = if i == 0 {
                            base
                        } else {
                            Uuid::new_v5(&base, format!("chunk-{i}").as_bytes())
                        };
                        let key = Self::request_key(key, j);
                        let mut ctx = self.base_ctx();
                        ctx.insert("key".into(), Value::String(key.to_string()));
                        ctx.insert("batch".into(), Self::batch_ctx(batch));
                        ctx.insert(
                            "items".into(),
                            chunk
                                .iter()
                                .map(|it| item_value(it, ids.get(&it.sku), decimals))
                                .collect(),
                        );
                        let extra: Vec<(String, String)> = w
                            .idempotency_header
                            .iter()
                            .map(|h| (h.clone(), key.to_string()))
                            .collect();
                        match self.call(OP, &w.request, &ctx, &extra).await {
                            Ok(resp) => {
                                if receipt.is_none() {
                                    receipt = Some(self.receipt_from(
                                        w.receipt.as_ref(),
                                        &resp.json,
                                        default_receipt.clone(),
                                    ));
                                }
                            }
                            Err(f)
                                if f.class == ErrorClass::NotFound
                                    && self.profile.uses_lookup() =>
                            {
                                for it in chunk {
                                    self.forget_id(&it.sku).await?;
                                }
                                return Err(AdapterError::Transient(format!(
                                    "{}; cached ids forgotten, looked up again on retry",
                                    f.message
                                )));
                            }
                            Err(f) if !f.items.is_empty() => {
                                let Some(named) = Self::named_items(&f, chunk) else {
                                    return Err(f.into_error());
                                };
                                if receipt.is_none() {
                                    receipt = Some(default_receipt.clone());
                                }
                                for (sku, message) in named {
                                    let e = match f.class {
                                        ErrorClass::Rejected => AdapterError::Rejected(message),
                                        ErrorClass::NotFound => {
                                            self.forget_id(&sku).await?;
                                            AdapterError::Transient(format!(
                                                "{message}; cached ids forgotten, looked up again on retry"
                                            ))
                                        }
                                        _ => AdapterError::Transient(message),
                                    };
                                    failed.entry(sku).or_insert(e);
                                }
                            }
                            Err(f) => return Err(f.into_error()),
                        }
                    }
                }
                let receipt = Receipt {
                    id: receipt.unwrap_or(default_receipt),
                };
                if failed.is_empty() {
                    return Ok(receipt);
                }
                let mut outcome = ItemOutcomes::default();
                for item in &batch.items {
                    match failed.remove(&item.sku) {
                        Some(e) => outcome.record(item.sku.clone(), e),
                        None => outcome.done.push(item.sku.clone()),
                    }
                }
                outcome.into_result(receipt)
            }
        }
    }

    async fn verify(&self, batch: &Batch, _receipt: &Receipt) -> AdapterResult<Verification> {
        let read = self.read_back(batch).await?;
        // Items that could be read must match; the others are read again later.
        if !read.differing.is_empty() || read.unread.is_empty() {
            let n = read.matching.len() + read.differing.len();
            return Ok(self.verdict(n, &read.differing));
        }
        Err(AdapterError::partial(
            read.matching,
            Vec::new(),
            read.unread_error,
        ))
    }

    async fn read_back(&self, batch: &Batch) -> AdapterResult<ReadBack> {
        if batch.items.is_empty() {
            return Ok(ReadBack::default());
        }
        let (ids, lookup_failed) = self.ids_each(&batch.items).await?;
        let (shown, mut unread) = self.read_shown(batch, &ids).await?;
        unread.extend(lookup_failed);
        let mut read = ReadBack::of(
            &batch.items,
            |sku| unread.get(sku),
            |want| self.differs(want, shown.get(&want.sku), self.compared(batch, &want.sku)),
        );
        for d in &mut read.differing {
            d.detail = self.scrub(&d.detail);
        }
        Ok(read)
    }

    async fn probe(&self, endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>> {
        const OP: &str = "probe";
        if endpoint != self.endpoint {
            tracing::warn!(adapter_endpoint = %self.endpoint, asked = %endpoint, "probe for another endpoint");
        }
        let no_idempotency = !self.deduplicates();
        let Some((req, receipt_path)) = &self.profile.probe else {
            // No way to ask: the upload reads back before it writes anything.
            if no_idempotency {
                self.mark_suspect(key);
            }
            return Ok(None);
        };
        let mut ctx = self.base_ctx();
        ctx.insert("key".into(), Value::String(key.to_string()));
        match self.call(OP, req, &ctx, &[]).await {
            Ok(resp) => Ok(Some(Receipt {
                id: self.receipt_from(receipt_path.as_ref(), &resp.json, key.to_string()),
            })),
            Err(f) if f.class == ErrorClass::NotFound => {
                if no_idempotency {
                    self.mark_suspect(key);
                }
                Ok(None)
            }
            Err(f) => Err(f.into_error()),
        }
    }
}

fn is_empty_value(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A price as minor units.
fn parse_price(v: &Value, unit: PriceUnit, decimals: u32) -> Result<i64, String> {
    match unit {
        PriceUnit::Minor => as_i64(v).ok_or_else(|| format!("price {v} is not an integer")),
        PriceUnit::Decimal => {
            let text = match v {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.trim().to_owned(),
                _ => return Err(format!("price {v} is not a number")),
            };
            decimal_to_minor(&text, decimals).ok_or_else(|| {
                format!("price {text:?} is not a decimal with at most {decimals} decimals")
            })
        }
    }
}

/// `"12.34"`, 2 → 1234. Exact: more significant decimals than `decimals` is an error.
pub(crate) fn decimal_to_minor(text: &str, decimals: u32) -> Option<i64> {
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.chars().all(|c| c.is_ascii_digit()) || !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > decimals as usize {
        return None;
    }
    let scale = 10i64.checked_pow(decimals)?;
    let int: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_val: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>().ok()? * 10i64.pow(decimals - frac.len() as u32)
    };
    let v = int.checked_mul(scale)?.checked_add(frac_val)?;
    Some(if neg { -v } else { v })
}

fn redact_json(v: &mut Value) {
    const SENSITIVE: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "authorization",
        "credential",
    ];
    match v {
        Value::Object(o) => {
            for (k, val) in o.iter_mut() {
                let lk = k.to_ascii_lowercase();
                if SENSITIVE.iter().any(|s| lk.contains(s)) && !val.is_null() {
                    *val = Value::String(REDACTED.to_owned());
                } else {
                    redact_json(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact_json),
        _ => {}
    }
}

fn excerpt(body: &str) -> String {
    let body = body.trim();
    let mut out: String = body.chars().take(MAX_EXCERPT_CHARS).collect();
    if out.len() < body.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_conversion_is_exact() {
        assert_eq!(decimal_to_minor("12.34", 2), Some(1234));
        assert_eq!(decimal_to_minor("12.3", 2), Some(1230));
        assert_eq!(decimal_to_minor("12", 2), Some(1200));
        assert_eq!(decimal_to_minor("12.340", 2), Some(1234));
        assert_eq!(decimal_to_minor("-0.05", 2), Some(-5));
        assert_eq!(decimal_to_minor("12.345", 2), None);
        assert_eq!(decimal_to_minor("1e3", 2), None);
        assert_eq!(decimal_to_minor("", 2), None);
        assert_eq!(parse_price(&json!(12.34), PriceUnit::Decimal, 2), Ok(1234));
        assert_eq!(parse_price(&json!("1234"), PriceUnit::Minor, 2), Ok(1234));
        assert!(parse_price(&json!("12.5"), PriceUnit::Minor, 2).is_err());
    }

    #[test]
    fn json_redaction() {
        let mut v = json!({"username": "u", "Password": "p4ss", "nested": [{"access_token": "t"}], "qty": 3});
        redact_json(&mut v);
        assert_eq!(
            v,
            json!({"username": "u", "Password": REDACTED, "nested": [{"access_token": REDACTED}], "qty": 3})
        );
    }

    #[test]
    fn empty_values_do_not_match_error_rules() {
        for v in [json!(null), json!([]), json!({}), json!(""), json!(false)] {
            assert!(is_empty_value(&v), "{v}");
        }
        for v in [json!([1]), json!({"a": 1}), json!("x"), json!(0)] {
            assert!(!is_empty_value(&v), "{v}");
        }
    }
}
