//! Platform profiles: the configuration types, and their loading and validation.
//!
//! A profiles file is TOML with one `[profiles.NAME]` table per platform (see
//! `docs/http-adapter.md` for the reference and worked examples). Everything is checked
//! when the file is **loaded**: unknown keys, templates that do not parse or reference a
//! variable (or item field, setting, secret) that does not exist, bodies that do not
//! render to JSON, and JSON paths that do not parse. Every error names the profile and
//! the field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use serde_json_path::JsonPath;

/// A profile could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProfileError(pub String);

fn perr(profile: &str, field: &str, msg: impl std::fmt::Display) -> ProfileError {
    ProfileError(format!("profile {profile:?}: field `{field}`: {msg}"))
}

// ---------------------------------------------------------------------------------------
// Configuration (what the TOML says)
// ---------------------------------------------------------------------------------------

/// One HTTP request, as templates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestConfig {
    /// HTTP method (default `POST`).
    #[serde(default = "default_method")]
    pub method: String,
    /// URL template, e.g. `"{{ base_url }}/products/{{ id }}"`.
    pub url: String,
    /// Extra header templates.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body template: `{{ … }}` expressions are written as JSON values.
    #[serde(default)]
    pub body: Option<String>,
    /// A GraphQL operation instead of `body`: sends `{"query": …, "variables": …}`.
    #[serde(default)]
    pub graphql: Option<GraphqlConfig>,
}

fn default_method() -> String {
    "POST".to_owned()
}

/// A GraphQL operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    /// The query or mutation document (sent verbatim, not a template).
    pub query: String,
    /// JSON template of the variables object.
    #[serde(default)]
    pub variables: Option<String>,
}

/// How requests authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// No authentication.
    #[default]
    None,
    /// A static header (`header` = `value`, usually from a secret).
    Header,
    /// A login request whose token is reused until it expires, refreshed once on 401.
    Login,
}

/// The `auth` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Kind of authentication.
    #[serde(default)]
    pub kind: AuthKind,
    /// Header carrying the credential (default `Authorization`).
    #[serde(default)]
    pub header: Option<String>,
    /// Template of its value (`header`: e.g. `"{{ secrets.api_key }}"`; `login`: default
    /// `"Bearer {{ token }}"`).
    #[serde(default)]
    pub value: Option<String>,
    /// `login`: the login request.
    #[serde(default)]
    pub login: Option<RequestConfig>,
    /// `login`: JSON path of the token in the login response.
    #[serde(default)]
    pub token_path: Option<String>,
    /// `login`: or the response header that carries it.
    #[serde(default)]
    pub token_header: Option<String>,
    /// `login`: JSON path of the token's lifetime in seconds.
    #[serde(default)]
    pub expires_in_path: Option<String>,
    /// `login`: lifetime assumed without `expires_in_path` (default: until refused).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// The `lookup` table: resolve the platform's id of a SKU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// The request (variables: `sku`, `item`).
    pub request: RequestConfig,
    /// JSON path of the id in the response; no match means the SKU is unknown there.
    pub id: String,
}

/// Per batch (chunks of items) or per item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One request carries many items (`items`).
    #[default]
    PerBatch,
    /// One request per item (`item`, `id`).
    PerItem,
}

/// The `write` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteConfig {
    /// Per batch or per item.
    #[serde(default)]
    pub mode: Mode,
    /// `per_batch`: most items in one request (default: the whole batch).
    #[serde(default)]
    pub items_per_request: Option<usize>,
    /// The request.
    pub request: RequestConfig,
    /// Header carrying the request's idempotency key (e.g. `Idempotency-Key`).
    #[serde(default)]
    pub idempotency_header: Option<String>,
    /// JSON path of the platform's receipt in the response (default: the batch key).
    #[serde(default)]
    pub receipt: Option<String>,
}

/// The `read` table: read-back for verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadConfig {
    /// Per batch (`items`, `skus`) or per item (`item`, `id`).
    #[serde(default)]
    pub mode: Mode,
    /// The request.
    pub request: RequestConfig,
    /// `per_batch`: JSON path of the records list; `per_item`: of the record (default `$`).
    #[serde(default)]
    pub records: Option<String>,
    /// `per_batch`: JSON path of a record's SKU (relative to the record).
    #[serde(default)]
    pub sku: Option<String>,
    /// JSON path of the quantity (relative to the record).
    pub qty: String,
    /// JSON path of the tier list (relative to the record).
    #[serde(default)]
    pub tiers: Option<String>,
    /// JSON path of a tier's minimum quantity (relative to the tier).
    #[serde(default)]
    pub tier_min_qty: Option<String>,
    /// JSON path of a tier's price (relative to the tier).
    #[serde(default)]
    pub tier_price: Option<String>,
    /// Or: JSON path of one price (compared with the first tier).
    #[serde(default)]
    pub price: Option<String>,
    /// How prices are written in the response.
    #[serde(default)]
    pub price_unit: PriceUnit,
    /// JSON path of the currency code, compared with the endpoint's `currency` setting.
    #[serde(default)]
    pub currency: Option<String>,
}

/// How a price is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PriceUnit {
    /// Integer minor units (cents).
    #[default]
    Minor,
    /// A decimal amount (`"12.34"` or `12.34`) with `price_decimals` decimals.
    Decimal,
}

/// The `probe` table: ask the platform whether a key landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// The request (variable `key`); a not-found answer means "did not land".
    pub request: RequestConfig,
    /// JSON path of the receipt in the response (default: the key).
    #[serde(default)]
    pub receipt: Option<String>,
}

/// Classes an error rule can assign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The platform refused the data (counts toward the circuit).
    Rejected,
    /// Retry with backoff.
    Transient,
    /// Credentials refused (a login token is refreshed once first).
    Auth,
    /// Configuration unusable.
    Config,
    /// The addressed record does not exist (a cached id went stale).
    NotFound,
    /// Slow down (retried after the default delay).
    RateLimited,
}

/// A body check: if `path` matches a non-empty value, the response is a failure of
/// `class`. Rules are tried in order; the first match wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRule {
    /// JSON path (e.g. `$.errors`, `$.data.*.userErrors[*]`).
    pub path: String,
    /// What a match means.
    pub class: ErrorClass,
}

/// One `[profiles.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Names of secrets; an endpoint gives `<name>_env` = environment variable name.
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Names of further per-endpoint settings templates may use (`settings.NAME`).
    #[serde(default)]
    pub settings: Vec<String>,
    /// Per-request timeout (default 10000 ms; an endpoint may set `timeout_ms`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Decimals of the currency for `item.price` and decimal read-back (default 2).
    #[serde(default = "default_decimals")]
    pub price_decimals: u32,
    /// Statuses that count as success (default: any 2xx).
    #[serde(default)]
    pub ok_statuses: Vec<u16>,
    /// Statuses that mean "record not found" (default 404).
    #[serde(default = "default_not_found")]
    pub not_found_statuses: Vec<u16>,
    /// Header templates sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Id lookup.
    #[serde(default)]
    pub lookup: Option<LookupConfig>,
    /// Writes.
    pub write: WriteConfig,
    /// Read-back.
    pub read: ReadConfig,
    /// Probe by key.
    #[serde(default)]
    pub probe: Option<ProbeConfig>,
    /// Body checks applied to every response.
    #[serde(default)]
    pub errors: Vec<ErrorRule>,
}

fn default_decimals() -> u32 {
    2
}

fn default_not_found() -> Vec<u16> {
    vec![404]
}

// ---------------------------------------------------------------------------------------
// Compiled profile
// ---------------------------------------------------------------------------------------

/// Which variables a template sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Login,
    Common,
    Lookup,
    WriteBatch,
    WriteItem,
    ReadBatch,
    ReadItem,
    Probe,
}

impl Scope {
    fn vars(self, login: bool, lookup: bool) -> Vec<&'static str> {
        let mut v = vec!["endpoint", "base_url", "settings", "secrets"];
        if login && self != Scope::Login {
            v.push("token");
        }
        match self {
            Scope::Login | Scope::Common => {}
            Scope::Lookup => v.extend(["sku", "item"]),
            Scope::WriteBatch => v.extend(["key", "batch", "items"]),
            Scope::WriteItem | Scope::ReadItem => {
                v.extend(["key", "batch", "item", "sku"]);
                if lookup {
                    v.push("id");
                }
            }
            Scope::ReadBatch => v.extend(["batch", "items", "skus"]),
            Scope::Probe => v.push("key"),
        }
        v
    }
}

/// Fields of `item` (and of each element of `items`).
const ITEM_FIELDS: &[&str] = &[
    "sku",
    "qty",
    "tiers",
    "price_minor",
    "price",
    "min_qty",
    "id",
];
/// Fields of `batch`.
const BATCH_FIELDS: &[&str] = &["key", "snapshot", "index"];
/// Template functions that look like variables.
const GLOBALS: &[&str] = &["range", "dict", "namespace", "debug"];

/// A request whose templates are registered in the profile's environment.
#[derive(Debug, Clone)]
pub(crate) struct CompiledRequest {
    pub(crate) method: reqwest::Method,
    /// Template names.
    pub(crate) url: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Option<String>,
    pub(crate) graphql: Option<(String, Option<String>)>,
}

/// A loaded, validated profile.
#[derive(Debug)]
pub struct Profile {
    pub(crate) name: String,
    pub(crate) config: ProfileConfig,
    pub(crate) env: Environment<'static>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) auth_header: Option<(String, String)>,
    pub(crate) login: Option<CompiledRequest>,
    pub(crate) token_path: Option<JsonPath>,
    pub(crate) expires_in_path: Option<JsonPath>,
    pub(crate) lookup: Option<(CompiledRequest, JsonPath)>,
    pub(crate) write: CompiledRequest,
    pub(crate) write_receipt: Option<JsonPath>,
    pub(crate) read: CompiledRequest,
    pub(crate) read_paths: ReadPaths,
    pub(crate) probe: Option<(CompiledRequest, Option<JsonPath>)>,
    pub(crate) errors: Vec<(JsonPath, ErrorClass, String)>,
}

/// Parsed JSON paths of the read-back.
#[derive(Debug)]
pub(crate) struct ReadPaths {
    pub(crate) records: Option<JsonPath>,
    pub(crate) sku: Option<JsonPath>,
    pub(crate) qty: JsonPath,
    pub(crate) tiers: Option<(JsonPath, JsonPath, JsonPath)>,
    pub(crate) price: Option<JsonPath>,
    pub(crate) currency: Option<JsonPath>,
}

impl Profile {
    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its configuration.
    pub fn config(&self) -> &ProfileConfig {
        &self.config
    }

    /// Whether writes or reads need the platform's ids (a `lookup` table exists).
    pub fn uses_lookup(&self) -> bool {
        self.lookup.is_some()
    }

    /// Compile and validate `config` as profile `name`.
    pub fn compile(name: &str, config: ProfileConfig) -> Result<Self, ProfileError> {
        Compiler::new(name, &config)?.finish(config)
    }
}

struct Compiler<'a> {
    name: &'a str,
    env: Environment<'static>,
    login: bool,
    lookup: bool,
    settings: BTreeSet<String>,
    secrets: BTreeSet<String>,
    sample: Value,
}

impl<'a> Compiler<'a> {
    fn new(name: &'a str, config: &ProfileConfig) -> Result<Self, ProfileError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Templates may use `settings.base_url` and declared settings (which every endpoint
        // must give): an optional setting could be missing at render time.
        let mut settings: BTreeSet<String> = BTreeSet::from(["base_url".to_owned()]);
        for s in &config.settings {
            if s == "profile" || s.ends_with("_env") {
                return Err(perr(
                    name,
                    "settings",
                    format!("reserved setting name {s:?}"),
                ));
            }
            settings.insert(s.clone());
        }
        let mut secrets = BTreeSet::new();
        for s in &config.secrets {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(perr(name, "secrets", format!("invalid secret name {s:?}")));
            }
            secrets.insert(s.clone());
        }
        if config.price_decimals > 6 {
            return Err(perr(name, "price_decimals", "must be at most 6"));
        }
        let sample = sample_context(&settings, &secrets, config.price_decimals);
        Ok(Self {
            name,
            env,
            login: config.auth.kind == AuthKind::Login,
            lookup: config.lookup.is_some(),
            settings,
            secrets,
            sample,
        })
    }

    /// Register `source` as template `field`, check its variables against `scope`, and
    /// render it once with sample values (a JSON template must produce JSON).
    fn template(
        &mut self,
        field: &str,
        source: &str,
        scope: Scope,
        json: bool,
    ) -> Result<String, ProfileError> {
        let tname = format!("{field}{}", if json { ".json" } else { ".txt" });
        self.env
            .add_template_owned(tname.clone(), source.to_owned())
            .map_err(|e| perr(self.name, field, format!("template does not parse: {e}")))?;
        let tmpl = self
            .env
            .get_template(&tname)
            .map_err(|e| perr(self.name, field, e))?;
        let allowed = scope.vars(self.login, self.lookup);
        let mut used: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
        used.sort();
        for var in used {
            let mut parts = var.splitn(2, '.');
            let head = parts.next().unwrap_or_default();
            let rest = parts.next();
            if GLOBALS.contains(&head) {
                continue;
            }
            if !allowed.contains(&head) {
                let hint = match head {
                    "token" if !self.login => " (`token` needs auth kind = \"login\")",
                    "id" if !self.lookup => " (`id` needs a [lookup] table)",
                    _ => "",
                };
                return Err(perr(
                    self.name,
                    field,
                    format!(
                        "template references unknown variable `{var}`{hint}; available here: {}",
                        allowed.join(", ")
                    ),
                ));
            }
            let Some(rest) = rest else { continue };
            let sub = rest.split('.').next().unwrap_or_default();
            let ok = match head {
                "settings" => self.settings.contains(sub),
                "secrets" => self.secrets.contains(sub),
                "item" => ITEM_FIELDS.contains(&sub) && (sub != "id" || self.lookup),
                "batch" => BATCH_FIELDS.contains(&sub),
                _ => true,
            };
            if !ok {
                let known: Vec<String> = match head {
                    "settings" => self.settings.iter().cloned().collect(),
                    "secrets" => self.secrets.iter().cloned().collect(),
                    "item" => ITEM_FIELDS.iter().map(|s| s.to_string()).collect(),
                    _ => BATCH_FIELDS.iter().map(|s| s.to_string()).collect(),
                };
                return Err(perr(
                    self.name,
                    field,
                    format!(
                        "template references unknown field `{var}` (known {head} fields: {}){}",
                        known.join(", "),
                        match head {
                            "settings" => "; declare it in `settings`",
                            "secrets" => "; declare it in `secrets`",
                            _ => "",
                        }
                    ),
                ));
            }
        }
        // A trial render catches what the static check cannot (fields of loop variables,
        // filters applied to the wrong type, bodies that are not JSON).
        let mut ctx = self.sample.clone();
        if !self.login
            && let Some(o) = ctx.as_object_mut()
        {
            o.remove("token");
        }
        let out = tmpl
            .render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| {
                perr(
                    self.name,
                    field,
                    format!(
                        "template fails to render with sample values: {e:#} (e.g. an unknown field of a loop variable)"
                    ),
                )
            })?;
        if json && let Err(e) = serde_json::from_str::<Value>(&out) {
            return Err(perr(
                self.name,
                field,
                format!("template does not render to JSON ({e}); sample output: {out}"),
            ));
        }
        Ok(tname)
    }

    fn path(&self, field: &str, path: &str) -> Result<JsonPath, ProfileError> {
        JsonPath::parse(path)
            .map_err(|e| perr(self.name, field, format!("invalid JSON path {path:?}: {e}")))
    }

    fn request(
        &mut self,
        field: &str,
        req: &RequestConfig,
        scope: Scope,
    ) -> Result<CompiledRequest, ProfileError> {
        let method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                perr(
                    self.name,
                    &format!("{field}.method"),
                    format!("not an HTTP method: {:?}", req.method),
                )
            })?;
        let url = self.template(&format!("{field}.url"), &req.url, scope, false)?;
        let mut headers = Vec::new();
        for (h, v) in &req.headers {
            check_header_name(self.name, &format!("{field}.headers"), h)?;
            headers.push((
                h.clone(),
                self.template(&format!("{field}.headers.{h}"), v, scope, false)?,
            ));
        }
        if req.body.is_some() && req.graphql.is_some() {
            return Err(perr(
                self.name,
                field,
                "give either `body` or `graphql`, not both",
            ));
        }
        let body = match &req.body {
            Some(b) => Some(self.template(&format!("{field}.body"), b, scope, true)?),
            None => None,
        };
        let graphql = match &req.graphql {
            Some(g) => {
                if g.query.trim().is_empty() {
                    return Err(perr(
                        self.name,
                        &format!("{field}.graphql.query"),
                        "is empty",
                    ));
                }
                let vars = match &g.variables {
                    Some(v) => Some(self.template(
                        &format!("{field}.graphql.variables"),
                        v,
                        scope,
                        true,
                    )?),
                    None => None,
                };
                Some((g.query.clone(), vars))
            }
            None => None,
        };
        Ok(CompiledRequest {
            method,
            url,
            headers,
            body,
            graphql,
        })
    }

    fn finish(mut self, config: ProfileConfig) -> Result<Profile, ProfileError> {
        let name = self.name;
        let mut headers = Vec::new();
        for (h, v) in &config.headers {
            check_header_name(name, "headers", h)?;
            headers.push((
                h.clone(),
                self.template(&format!("headers.{h}"), v, Scope::Common, false)?,
            ));
        }
        let auth = &config.auth;
        let (mut auth_header, mut login, mut token_path, mut expires_in_path) =
            (None, None, None, None);
        match auth.kind {
            AuthKind::None => {
                for (f, set) in [
                    ("header", auth.header.is_some()),
                    ("value", auth.value.is_some()),
                    ("login", auth.login.is_some()),
                    ("token_path", auth.token_path.is_some()),
                    ("token_header", auth.token_header.is_some()),
                ] {
                    if set {
                        return Err(perr(
                            name,
                            &format!("auth.{f}"),
                            "set, but auth kind is \"none\"",
                        ));
                    }
                }
            }
            AuthKind::Header => {
                let header = auth
                    .header
                    .clone()
                    .unwrap_or_else(|| "Authorization".into());
                check_header_name(name, "auth.header", &header)?;
                let value = auth
                    .value
                    .as_deref()
                    .ok_or_else(|| perr(name, "auth.value", "required for auth kind \"header\""))?;
                let t = self.template("auth.value", value, Scope::Common, false)?;
                auth_header = Some((header, t));
                if auth.login.is_some() {
                    return Err(perr(name, "auth.login", "only for auth kind \"login\""));
                }
            }
            AuthKind::Login => {
                let req = auth
                    .login
                    .as_ref()
                    .ok_or_else(|| perr(name, "auth.login", "required for auth kind \"login\""))?;
                login = Some(self.request("auth.login", req, Scope::Login)?);
                match (&auth.token_path, &auth.token_header) {
                    (Some(p), None) => token_path = Some(self.path("auth.token_path", p)?),
                    (None, Some(h)) => check_header_name(name, "auth.token_header", h)?,
                    _ => {
                        return Err(perr(
                            name,
                            "auth.token_path",
                            "give exactly one of `token_path` and `token_header`",
                        ));
                    }
                }
                if let Some(p) = &auth.expires_in_path {
                    expires_in_path = Some(self.path("auth.expires_in_path", p)?);
                }
                let header = auth
                    .header
                    .clone()
                    .unwrap_or_else(|| "Authorization".into());
                check_header_name(name, "auth.header", &header)?;
                let value = auth.value.as_deref().unwrap_or("Bearer {{ token }}");
                let t = self.template("auth.value", value, Scope::Common, false)?;
                auth_header = Some((header, t));
            }
        }
        let lookup = match &config.lookup {
            Some(l) => Some((
                self.request("lookup.request", &l.request, Scope::Lookup)?,
                self.path("lookup.id", &l.id)?,
            )),
            None => None,
        };
        let w = &config.write;
        if w.items_per_request == Some(0) {
            return Err(perr(name, "write.items_per_request", "must be at least 1"));
        }
        if w.mode == Mode::PerItem && w.items_per_request.is_some() {
            return Err(perr(
                name,
                "write.items_per_request",
                "only for mode = \"per_batch\"",
            ));
        }
        if let Some(h) = &w.idempotency_header {
            check_header_name(name, "write.idempotency_header", h)?;
        }
        let write_scope = match w.mode {
            Mode::PerBatch => Scope::WriteBatch,
            Mode::PerItem => Scope::WriteItem,
        };
        let write = self.request("write.request", &w.request, write_scope)?;
        let write_receipt = match &w.receipt {
            Some(p) => Some(self.path("write.receipt", p)?),
            None => None,
        };
        let r = &config.read;
        let read_scope = match r.mode {
            Mode::PerBatch => Scope::ReadBatch,
            Mode::PerItem => Scope::ReadItem,
        };
        let read = self.request("read.request", &r.request, read_scope)?;
        let opt =
            |s: &Self, f: &str, p: &Option<String>| -> Result<Option<JsonPath>, ProfileError> {
                p.as_deref().map(|p| s.path(f, p)).transpose()
            };
        let records = opt(&self, "read.records", &r.records)?;
        let sku = opt(&self, "read.sku", &r.sku)?;
        if r.mode == Mode::PerBatch && (records.is_none() || sku.is_none()) {
            return Err(perr(
                name,
                "read.records",
                "mode = \"per_batch\" needs `records` and `sku` paths",
            ));
        }
        let tiers = match (&r.tiers, &r.tier_min_qty, &r.tier_price) {
            (None, None, None) => None,
            (Some(t), Some(m), Some(p)) => Some((
                self.path("read.tiers", t)?,
                self.path("read.tier_min_qty", m)?,
                self.path("read.tier_price", p)?,
            )),
            _ => {
                return Err(perr(
                    name,
                    "read.tiers",
                    "`tiers`, `tier_min_qty` and `tier_price` go together",
                ));
            }
        };
        let price = opt(&self, "read.price", &r.price)?;
        if tiers.is_some() == price.is_some() {
            return Err(perr(
                name,
                "read.price",
                "give either `price` or `tiers` (with `tier_min_qty`, `tier_price`)",
            ));
        }
        let read_paths = ReadPaths {
            records,
            sku,
            qty: self.path("read.qty", &r.qty)?,
            tiers,
            price,
            currency: opt(&self, "read.currency", &r.currency)?,
        };
        let probe = match &config.probe {
            Some(p) => Some((
                self.request("probe.request", &p.request, Scope::Probe)?,
                opt(&self, "probe.receipt", &p.receipt)?,
            )),
            None => None,
        };
        let mut errors = Vec::new();
        for (i, rule) in config.errors.iter().enumerate() {
            errors.push((
                self.path(&format!("errors[{i}].path"), &rule.path)?,
                rule.class,
                rule.path.clone(),
            ));
        }
        Ok(Profile {
            name: name.to_owned(),
            env: self.env,
            headers,
            auth_header,
            login,
            token_path,
            expires_in_path,
            lookup,
            write,
            write_receipt,
            read,
            read_paths,
            probe,
            errors,
            config,
        })
    }
}

fn check_header_name(profile: &str, field: &str, h: &str) -> Result<(), ProfileError> {
    reqwest::header::HeaderName::from_bytes(h.as_bytes())
        .map(|_| ())
        .map_err(|_| perr(profile, field, format!("not a valid header name: {h:?}")))
}

/// Decimal text of `minor` with `decimals` decimals (`1234`, 2 → `"12.34"`).
pub(crate) fn minor_to_decimal(minor: i64, decimals: u32) -> String {
    if decimals == 0 {
        return minor.to_string();
    }
    let scale = 10i128.pow(decimals);
    let v = i128::from(minor);
    let sign = if v < 0 { "-" } else { "" };
    let a = v.abs();
    format!(
        "{sign}{}.{:0width$}",
        a / scale,
        a % scale,
        width = decimals as usize
    )
}

/// The template view of one item (with its remote id, if known).
pub(crate) fn item_value(
    item: &bulwark_workflows::catalog::Item,
    id: Option<&str>,
    decimals: u32,
) -> Value {
    let tiers: Vec<Value> = item
        .tiers
        .iter()
        .map(|t| {
            json!({
                "min_qty": t.min_qty,
                "price_minor": t.price_minor,
                "price": minor_to_decimal(t.price_minor, decimals),
            })
        })
        .collect();
    let first = item.tiers.first();
    json!({
        "sku": item.sku,
        "qty": item.qty,
        "tiers": tiers,
        "price_minor": first.map(|t| t.price_minor),
        "price": first.map(|t| minor_to_decimal(t.price_minor, decimals)),
        "min_qty": first.map(|t| t.min_qty),
        "id": id,
    })
}

fn sample_context(settings: &BTreeSet<String>, secrets: &BTreeSet<String>, decimals: u32) -> Value {
    let item = bulwark_workflows::catalog::Item {
        sku: "SKU-1".into(),
        qty: 5,
        tiers: vec![
            bulwark_workflows::catalog::PriceTier {
                min_qty: 1,
                price_minor: 1234,
            },
            bulwark_workflows::catalog::PriceTier {
                min_qty: 10,
                price_minor: 1100,
            },
        ],
    };
    let iv = item_value(&item, Some("sample-id"), decimals);
    let settings: serde_json::Map<String, Value> = settings
        .iter()
        .map(|s| (s.clone(), Value::String(format!("sample-{s}"))))
        .collect();
    let secrets: serde_json::Map<String, Value> = secrets
        .iter()
        .map(|s| (s.clone(), Value::String(format!("sample-{s}"))))
        .collect();
    json!({
        "endpoint": "sample-endpoint",
        "base_url": "http://127.0.0.1:1/sample",
        "settings": settings,
        "secrets": secrets,
        "token": "sample-token",
        "key": "00000000-0000-0000-0000-000000000000",
        "batch": {"key": "00000000-0000-0000-0000-000000000000", "snapshot": 1, "index": 0},
        "items": [iv.clone(), iv.clone()],
        "skus": ["SKU-1", "SKU-2"],
        "item": iv,
        "sku": "SKU-1",
        "id": "sample-id",
    })
}

// ---------------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------------

/// Every loaded profile, by name.
#[derive(Debug, Clone, Default)]
pub struct Profiles {
    map: BTreeMap<String, Arc<Profile>>,
}

impl Profiles {
    /// Parse and validate a profiles file's text (`[profiles.NAME]` tables).
    pub fn from_toml_str(text: &str) -> Result<Self, ProfileError> {
        let doc: toml::Table = toml::from_str(text)
            .map_err(|e| ProfileError(format!("profiles: not valid TOML: {e}")))?;
        let mut map = BTreeMap::new();
        for (key, value) in doc {
            if key != "profiles" {
                return Err(ProfileError(format!(
                    "profiles: unknown top-level key `{key}` (expected `[profiles.NAME]` tables)"
                )));
            }
            let toml::Value::Table(profiles) = value else {
                return Err(ProfileError("profiles: `profiles` must be a table".into()));
            };
            for (name, value) in profiles {
                let config: ProfileConfig =
                    serde_path_to_error::deserialize(value).map_err(|e| {
                        let path = e.path().to_string();
                        let field = if path == "." {
                            "(profile)".to_owned()
                        } else {
                            path
                        };
                        perr(&name, &field, e.into_inner())
                    })?;
                map.insert(name.clone(), Arc::new(Profile::compile(&name, config)?));
            }
        }
        Ok(Self { map })
    }

    /// Read and validate the profiles file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ProfileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ProfileError(format!("profiles file {}: {e}", path.display())))?;
        Self::from_toml_str(&text)
            .map_err(|e| ProfileError(format!("profiles file {}: {e}", path.display())))
    }

    /// Add an already compiled profile.
    pub fn insert(&mut self, profile: Profile) {
        self.map.insert(profile.name.clone(), Arc::new(profile));
    }

    /// The profile called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Profile>> {
        self.map.get(name).cloned()
    }

    /// Names of every profile, sorted.
    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        assert_eq!(minor_to_decimal(1234, 2), "12.34");
        assert_eq!(minor_to_decimal(5, 2), "0.05");
        assert_eq!(minor_to_decimal(-5, 2), "-0.05");
        assert_eq!(minor_to_decimal(7, 0), "7");
        assert_eq!(minor_to_decimal(1_000, 3), "1.000");
    }
}
