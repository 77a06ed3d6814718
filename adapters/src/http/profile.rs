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

/// How a lookup step finds a SKU's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupMode {
    /// One request per SKU (variables `sku`, `item`, and earlier steps' `ids`).
    #[default]
    PerItem,
    /// One request per chunk of SKUs (`skus`, `items`): an `sku in [...]` query.
    PerBatch,
    /// The platform cannot be asked by SKU: list its records (paginated) and match
    /// them by SKU client-side.
    List,
}

/// One `lookup` step: resolve the platform's ids of a SKU. `lookup` may be a list of
/// steps (`[[profiles.NAME.lookup]]`): each later step sees the ids found before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// Per item (default), per batch of SKUs, or a listing.
    #[serde(default)]
    pub mode: LookupMode,
    /// The request.
    pub request: RequestConfig,
    /// JSON path of the records in the response (required for `per_batch` and `list`;
    /// `per_item` default: the whole response is the record).
    #[serde(default)]
    pub records: Option<String>,
    /// JSON path of a record's SKU, relative to the record (required for `per_batch`
    /// and `list`; with `per_item`, the record whose SKU matches is taken).
    #[serde(default)]
    pub sku: Option<String>,
    /// JSON path of the id (relative to the record); a shorthand for `ids = { id = … }`.
    /// No match means the SKU is unknown at the platform.
    #[serde(default)]
    pub id: Option<String>,
    /// Several named ids (e.g. `{ product = "$.product_id", variant = "$.id" }`);
    /// templates see them as `ids.NAME` (and `id` for the one called `id`).
    #[serde(default)]
    pub ids: BTreeMap<String, String>,
    /// `per_batch`: most SKUs in one request (default 50).
    #[serde(default)]
    pub skus_per_request: Option<usize>,
    /// How the answer is paged (a `list` lookup usually needs it).
    #[serde(default)]
    pub pagination: Option<PaginationConfig>,
}

/// How a listing is paged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageKind {
    /// Page numbers: templates use `page` (from `start`, default 1) and `limit`.
    Page,
    /// Offsets: templates use `offset` (from `start`, default 0) and `limit`.
    Offset,
    /// A cursor in the body (`next`): templates use `cursor` (null on the first page).
    Cursor,
    /// The `Link: <…>; rel="next"` response header (same origin as `base_url`).
    Link,
}

/// The `pagination` table of a lookup or read-back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaginationConfig {
    /// How pages are addressed.
    pub kind: PageKind,
    /// Records per page (`limit`; `page`/`offset`: a shorter page is the last).
    #[serde(default)]
    pub size: Option<u64>,
    /// First page number (`page`, default 1) or offset (`offset`, default 0).
    #[serde(default)]
    pub start: Option<u64>,
    /// `cursor`: JSON path of the next cursor (null, absent or empty: the last page).
    #[serde(default)]
    pub next: Option<String>,
    /// `cursor`: optional JSON path of a "has more pages" boolean.
    #[serde(default)]
    pub has_more: Option<String>,
    /// Most pages read in one go (default 1000): more is an error, not a silent cut.
    #[serde(default = "default_max_pages")]
    pub max_pages: u32,
}

fn default_max_pages() -> u32 {
    1000
}

/// A field an endpoint may own (write and verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The stock quantity.
    Qty,
    /// The price tiers.
    Prices,
}

impl Field {
    /// Every field.
    pub const ALL: [Field; 2] = [Field::Qty, Field::Prices];

    /// Its name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            Field::Qty => "qty",
            Field::Prices => "prices",
        }
    }

    /// Parse a comma-separated list (`"qty"`, `"qty, prices"`).
    pub fn parse_list(text: &str) -> Result<Vec<Field>, String> {
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let f = match part {
                "qty" => Field::Qty,
                "prices" => Field::Prices,
                other => return Err(format!("unknown field {other:?} (known: qty, prices)")),
            };
            if !out.contains(&f) {
                out.push(f);
            }
        }
        if out.is_empty() {
            return Err("names no field (known: qty, prices)".into());
        }
        out.sort();
        Ok(out)
    }
}

/// One table or a list of them (`[profiles.x.write]` or `[[profiles.x.write]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single table.
    One(T),
    /// A list, run in order.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The entries, in order.
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(t) => std::slice::from_ref(t),
            OneOrMany::Many(v) => v,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table or a list of tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(a)).map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                a: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(a))
                    .map(OneOrMany::Many)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
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

/// The `write` table; `write` may be a list of them (`[[profiles.NAME.write]]`), run in
/// order for each item or chunk (e.g. stock and prices are separate resources).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteConfig {
    /// What this request writes (default: every field); it is skipped for an endpoint
    /// that owns none of them, and not re-sent when they already show.
    #[serde(default)]
    pub fields: Option<Vec<Field>>,
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
    /// JSON path of the quantity (relative to the record); required if the profile
    /// owns `qty`.
    #[serde(default)]
    pub qty: Option<String>,
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
    /// `per_batch`: how the records are paged; reading stops once every SKU of the
    /// batch was seen.
    #[serde(default)]
    pub pagination: Option<PaginationConfig>,
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
///
/// With `sku` or `index`, the rule is **item-level**: each value `path` matches is the
/// failure of one item of a `per_batch` write request (an error list or an error-result
/// union inside a 200), located by its SKU or by its 0-based position among the request's
/// `items`; the request's other items landed. Such a rule's class is `rejected`
/// (quarantined), `transient` (sent again) or `not_found` (the item's cached ids are
/// forgotten and looked up again). A match that does not name an item of the request
/// fails the whole request with the rule's class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorRule {
    /// JSON path (e.g. `$.errors`, `$.data.*.userErrors[*]`).
    pub path: String,
    /// What a match means.
    pub class: ErrorClass,
    /// Item-level: JSON path, relative to each match, of the item's SKU.
    #[serde(default)]
    pub sku: Option<String>,
    /// Item-level: JSON path, relative to each match, of the item's 0-based position in
    /// the request (a number or a numeric string, e.g. `$.field[2]` of
    /// `["input", "quantities", "3", "quantity"]`).
    #[serde(default)]
    pub index: Option<String>,
    /// JSON path, relative to each match, of the platform's message (default: the match).
    #[serde(default)]
    pub message: Option<String>,
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
    /// What this platform's endpoints write and verify (default both `qty` and
    /// `prices`); an endpoint's `owns` setting may narrow it.
    #[serde(default = "default_owns")]
    pub owns: Vec<Field>,
    /// Id lookup: one step, or a chain.
    #[serde(default)]
    pub lookup: Option<OneOrMany<LookupConfig>>,
    /// Writes: one request, or several run in order.
    pub write: OneOrMany<WriteConfig>,
    /// Read-back.
    pub read: ReadConfig,
    /// Probe by key.
    #[serde(default)]
    pub probe: Option<ProbeConfig>,
    /// Body checks applied to every response.
    #[serde(default)]
    pub errors: Vec<ErrorRule>,
    /// Compare-and-set stock: how the platform answers a stock write whose
    /// `item.confirmed_qty` is not what it shows (endpoints with
    /// `stock_policy = "compare_and_set"` need it).
    #[serde(default)]
    pub conflict: Option<ConflictConfig>,
}

/// The `conflict` table: a stock write's "compare failed" answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictConfig {
    /// Statuses of a failed compare (e.g. `[409]`).
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Or: a JSON path that matches a non-empty value in a failed compare's body (e.g. a
    /// `userErrors` entry with code `COMPARE_QUANTITY_STALE` inside a 200).
    #[serde(default)]
    pub path: Option<String>,
    /// JSON path of the quantity the platform shows, in the failed compare's answer
    /// (absent: the item is read back to learn it).
    #[serde(default)]
    pub shown: Option<String>,
}

/// A compiled [`ConflictConfig`].
#[derive(Debug)]
pub(crate) struct CompiledConflict {
    pub(crate) statuses: Vec<u16>,
    pub(crate) path: Option<JsonPath>,
    pub(crate) shown: Option<JsonPath>,
}

fn default_owns() -> Vec<Field> {
    Field::ALL.to_vec()
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
    /// JSON paths fixed per endpoint (read-back, batch lookups).
    Path,
    /// JSON paths of a per-item lookup.
    LookupPath,
    Lookup,
    LookupBatch,
    LookupList,
    WriteBatch,
    WriteItem,
    ReadBatch,
    ReadItem,
    Probe,
}

impl Scope {
    fn vars(self, login: bool, lookup: bool, chained: bool) -> Vec<&'static str> {
        let mut v = vec!["endpoint", "base_url", "settings"];
        if matches!(self, Scope::Path | Scope::LookupPath) {
            if self == Scope::LookupPath {
                v.extend(["sku", "item"]);
                if chained {
                    v.push("ids");
                }
            }
            return v;
        }
        v.push("secrets");
        if login && self != Scope::Login {
            v.push("token");
        }
        match self {
            Scope::Login | Scope::Common | Scope::Path | Scope::LookupPath => {}
            Scope::Lookup => {
                v.extend(["sku", "item"]);
                if chained {
                    v.push("ids");
                }
            }
            Scope::LookupBatch => v.extend(["skus", "items"]),
            Scope::LookupList => {}
            Scope::WriteBatch => v.extend(["key", "batch", "items"]),
            Scope::WriteItem | Scope::ReadItem => {
                v.extend(["key", "batch", "item", "sku"]);
                if lookup {
                    v.extend(["id", "ids"]);
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
    "ids",
    "confirmed_qty",
];
/// Fields of `batch`.
const BATCH_FIELDS: &[&str] = &["key", "snapshot", "index"];
/// Template functions that look like variables.
const GLOBALS: &[&str] = &["range", "dict", "namespace", "debug"];

/// What a template renders to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Text (URLs, header values).
    Text,
    /// A JSON document (bodies, GraphQL variables); values are written as JSON.
    Json,
    /// A JSON path; values are written as JSON string literals.
    Path,
}

/// A JSON path, or a template of one (rendered, then parsed, where it is used).
#[derive(Debug, Clone)]
pub(crate) enum PathT {
    Fixed(JsonPath),
    Template { name: String, source: String },
}

impl PathT {
    /// The path, rendering a template with `ctx`.
    pub(crate) fn resolve(
        &self,
        env: &Environment<'static>,
        ctx: &minijinja::Value,
    ) -> Result<JsonPath, String> {
        match self {
            PathT::Fixed(p) => Ok(p.clone()),
            PathT::Template { name, source } => {
                let text = env
                    .get_template(name)
                    .and_then(|t| t.render(ctx))
                    .map_err(|e| format!("JSON path template {source:?} failed: {e:#}"))?;
                JsonPath::parse(&text).map_err(|e| {
                    format!(
                        "JSON path template {source:?} rendered to {text:?}, not a JSON path: {e}"
                    )
                })
            }
        }
    }
}

/// Compiled `pagination`.
#[derive(Debug, Clone)]
pub(crate) struct Pagination {
    pub(crate) kind: PageKind,
    pub(crate) size: u64,
    pub(crate) start: u64,
    pub(crate) next: Option<JsonPath>,
    pub(crate) has_more: Option<JsonPath>,
    pub(crate) max_pages: u32,
}

/// A compiled lookup step.
#[derive(Debug)]
pub(crate) struct CompiledLookup {
    pub(crate) mode: LookupMode,
    pub(crate) request: CompiledRequest,
    pub(crate) records: Option<PathT>,
    pub(crate) sku: Option<PathT>,
    /// (name, path) of every id it captures.
    pub(crate) ids: Vec<(String, PathT)>,
    pub(crate) per_request: usize,
    pub(crate) pagination: Option<Pagination>,
}

/// A compiled write request.
#[derive(Debug)]
pub(crate) struct CompiledWrite {
    pub(crate) request: CompiledRequest,
    pub(crate) fields: Vec<Field>,
    pub(crate) items_per_request: Option<usize>,
    pub(crate) idempotency_header: Option<String>,
    pub(crate) receipt: Option<JsonPath>,
}

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
    /// The lookup chain (empty: no lookup).
    pub(crate) lookups: Vec<CompiledLookup>,
    /// Names of every id the chain captures, in order.
    pub(crate) id_names: Vec<String>,
    pub(crate) writes: Vec<CompiledWrite>,
    pub(crate) write_mode: Mode,
    pub(crate) read: CompiledRequest,
    pub(crate) read_paths: ReadPathsT,
    pub(crate) read_pagination: Option<Pagination>,
    pub(crate) probe: Option<(CompiledRequest, Option<JsonPath>)>,
    pub(crate) errors: Vec<CompiledErrorRule>,
    pub(crate) conflict: Option<CompiledConflict>,
}

/// The read-back's JSON paths, possibly templates (of endpoint settings).
#[derive(Debug)]
pub(crate) struct ReadPathsT {
    pub(crate) records: Option<PathT>,
    pub(crate) sku: Option<PathT>,
    pub(crate) qty: Option<PathT>,
    pub(crate) tiers: Option<(PathT, PathT, PathT)>,
    pub(crate) price: Option<PathT>,
    pub(crate) currency: Option<PathT>,
}

impl ReadPathsT {
    /// The concrete paths for one endpoint (`ctx`: its settings).
    pub(crate) fn resolve(
        &self,
        env: &Environment<'static>,
        ctx: &minijinja::Value,
    ) -> Result<ReadPaths, String> {
        let r = |p: &Option<PathT>| p.as_ref().map(|p| p.resolve(env, ctx)).transpose();
        Ok(ReadPaths {
            records: r(&self.records)?,
            sku: r(&self.sku)?,
            qty: r(&self.qty)?,
            tiers: match &self.tiers {
                None => None,
                Some((a, b, c)) => Some((
                    a.resolve(env, ctx)?,
                    b.resolve(env, ctx)?,
                    c.resolve(env, ctx)?,
                )),
            },
            price: r(&self.price)?,
            currency: r(&self.currency)?,
        })
    }
}

/// Parsed JSON paths of the read-back.
#[derive(Debug)]
pub(crate) struct ReadPaths {
    pub(crate) records: Option<JsonPath>,
    pub(crate) sku: Option<JsonPath>,
    pub(crate) qty: Option<JsonPath>,
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
        !self.lookups.is_empty()
    }

    /// Whether the platform de-duplicates re-sent writes: every write request carries an
    /// idempotency key.
    pub fn deduplicates(&self) -> bool {
        self.writes.iter().all(|w| w.idempotency_header.is_some())
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
    /// Compiling a lookup step after the first (it sees `ids`).
    chained: bool,
    /// Paging variables of the request being compiled.
    page_vars: &'static [&'static str],
    /// Variables the templates compiled since the last reset use.
    used: BTreeSet<String>,
    id_names: Vec<String>,
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
            if RESERVED_SETTINGS.contains(&s.as_str()) || s.ends_with("_env") {
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
        let mut id_names: Vec<String> = Vec::new();
        for (i, l) in config.lookup.iter().flat_map(|l| l.as_slice()).enumerate() {
            let field = lookup_field(config, i);
            let names: Vec<String> = match (&l.id, l.ids.is_empty()) {
                (Some(_), true) => vec!["id".to_owned()],
                (None, false) => l.ids.keys().cloned().collect(),
                (Some(_), false) => {
                    return Err(perr(
                        name,
                        &format!("{field}.ids"),
                        "give `id` or `ids`, not both",
                    ));
                }
                (None, true) => {
                    return Err(perr(
                        name,
                        &format!("{field}.id"),
                        "give `id` (a JSON path) or `ids` (named JSON paths)",
                    ));
                }
            };
            for n in names {
                if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(perr(
                        name,
                        &format!("{field}.ids"),
                        format!("invalid id name {n:?}"),
                    ));
                }
                if id_names.contains(&n) {
                    return Err(perr(
                        name,
                        &format!("{field}.ids"),
                        format!("id {n:?} is captured twice in the chain"),
                    ));
                }
                id_names.push(n);
            }
        }
        let sample = sample_context(&settings, &secrets, &id_names, config.price_decimals);
        Ok(Self {
            name,
            env,
            login: config.auth.kind == AuthKind::Login,
            lookup: config.lookup.is_some(),
            chained: false,
            page_vars: &[],
            used: BTreeSet::new(),
            id_names,
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
        kind: Kind,
    ) -> Result<String, ProfileError> {
        let json = kind != Kind::Text;
        let tname = format!("{field}{}", if json { ".json" } else { ".txt" });
        self.env
            .add_template_owned(tname.clone(), source.to_owned())
            .map_err(|e| perr(self.name, field, format!("template does not parse: {e}")))?;
        let tmpl = self
            .env
            .get_template(&tname)
            .map_err(|e| perr(self.name, field, e))?;
        let mut allowed = scope.vars(self.login, self.lookup, self.chained);
        if !matches!(scope, Scope::Path | Scope::LookupPath) {
            allowed.extend(self.page_vars.iter().copied());
        }
        let mut used: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
        used.sort();
        for var in used {
            let mut parts = var.splitn(2, '.');
            let head = parts.next().unwrap_or_default();
            let rest = parts.next();
            if GLOBALS.contains(&head) {
                continue;
            }
            self.used.insert(head.to_owned());
            if !allowed.contains(&head) {
                let hint = match head {
                    "token" if !self.login => " (`token` needs auth kind = \"login\")",
                    "id" | "ids" if !self.lookup => " (`id` and `ids` need a [lookup] table)",
                    "page" | "offset" | "cursor" | "limit" => {
                        " (paging variables need a matching `pagination` table)"
                    }
                    _ if matches!(scope, Scope::Path | Scope::LookupPath) => {
                        " (JSON paths may use endpoint values, not secrets)"
                    }
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
                "item" => ITEM_FIELDS.contains(&sub) && (!sub.starts_with("id") || self.lookup),
                "ids" => self.id_names.iter().any(|n| n == sub),
                "batch" => BATCH_FIELDS.contains(&sub),
                _ => true,
            };
            if !ok {
                let known: Vec<String> = match head {
                    "settings" => self.settings.iter().cloned().collect(),
                    "secrets" => self.secrets.iter().cloned().collect(),
                    "item" => ITEM_FIELDS.iter().map(|s| s.to_string()).collect(),
                    "ids" => self.id_names.clone(),
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
        if kind == Kind::Path {
            if let Err(e) = JsonPath::parse(&out) {
                return Err(perr(
                    self.name,
                    field,
                    format!("template does not render to a JSON path ({e}); sample output: {out}"),
                ));
            }
        } else if json && let Err(e) = serde_json::from_str::<Value>(&out) {
            return Err(perr(
                self.name,
                field,
                format!("template does not render to JSON ({e}); sample output: {out}"),
            ));
        }
        Ok(tname)
    }

    /// A JSON path that is not a template.
    fn path(&self, field: &str, path: &str) -> Result<JsonPath, ProfileError> {
        if path.contains("{{") || path.contains("{%") {
            return Err(perr(
                self.name,
                field,
                format!("{path:?} is not a template here: give a plain JSON path"),
            ));
        }
        JsonPath::parse(path)
            .map_err(|e| perr(self.name, field, format!("invalid JSON path {path:?}: {e}")))
    }

    /// A JSON path that may be a template of `scope`'s values (`{{ settings.x }}`,
    /// `{{ sku }}`), inserted as JSON string literals.
    fn tpath(&mut self, field: &str, path: &str, scope: Scope) -> Result<PathT, ProfileError> {
        if !(path.contains("{{") || path.contains("{%")) {
            return Ok(PathT::Fixed(self.path(field, path)?));
        }
        if path.contains("'{{") || path.contains("\"{{") {
            return Err(perr(
                self.name,
                field,
                format!(
                    "{path:?}: values are inserted as quoted JSON strings; write `== {{{{ sku }}}}`, not `== '{{{{ sku }}}}'`"
                ),
            ));
        }
        let name = self.template(field, path, scope, Kind::Path)?;
        Ok(PathT::Template {
            name,
            source: path.to_owned(),
        })
    }

    fn pagination(&self, field: &str, p: &PaginationConfig) -> Result<Pagination, ProfileError> {
        let f = |k: &str| format!("{field}.pagination.{k}");
        if p.max_pages == 0 {
            return Err(perr(self.name, &f("max_pages"), "must be at least 1"));
        }
        if p.size == Some(0) {
            return Err(perr(self.name, &f("size"), "must be at least 1"));
        }
        let size = match (p.kind, p.size) {
            (PageKind::Page | PageKind::Offset, None) => {
                return Err(perr(
                    self.name,
                    &f("size"),
                    "required for kind \"page\" and \"offset\" (a shorter page is the last)",
                ));
            }
            (_, s) => s.unwrap_or(0),
        };
        if p.start.is_some() && !matches!(p.kind, PageKind::Page | PageKind::Offset) {
            return Err(perr(
                self.name,
                &f("start"),
                "only for kind \"page\" and \"offset\"",
            ));
        }
        let (next, has_more) = match p.kind {
            PageKind::Cursor => {
                let next = p.next.as_deref().ok_or_else(|| {
                    perr(
                        self.name,
                        &f("next"),
                        "required for kind \"cursor\": the JSON path of the next cursor",
                    )
                })?;
                (
                    Some(self.path(&f("next"), next)?),
                    p.has_more
                        .as_deref()
                        .map(|h| self.path(&f("has_more"), h))
                        .transpose()?,
                )
            }
            _ => {
                if p.next.is_some() || p.has_more.is_some() {
                    return Err(perr(
                        self.name,
                        &f("next"),
                        "`next` and `has_more` are for kind \"cursor\"",
                    ));
                }
                (None, None)
            }
        };
        Ok(Pagination {
            kind: p.kind,
            size,
            start: p
                .start
                .unwrap_or(if p.kind == PageKind::Page { 1 } else { 0 }),
            next,
            has_more,
            max_pages: p.max_pages,
        })
    }

    /// Compile a request that may be paged by `pagination`: its templates see the paging
    /// variables, and must use the one that moves the page.
    fn paged_request(
        &mut self,
        field: &str,
        req: &RequestConfig,
        scope: Scope,
        pagination: Option<&Pagination>,
    ) -> Result<CompiledRequest, ProfileError> {
        let (vars, moving): (&'static [&'static str], Option<&str>) =
            match pagination.map(|p| p.kind) {
                None => (&[], None),
                Some(PageKind::Page) => (&["page", "limit"], Some("page")),
                Some(PageKind::Offset) => (&["offset", "limit"], Some("offset")),
                Some(PageKind::Cursor) => (&["cursor", "limit"], Some("cursor")),
                Some(PageKind::Link) => (&["limit"], None),
            };
        self.page_vars = vars;
        self.used.clear();
        let out = self.request(field, req, scope);
        self.page_vars = &[];
        let out = out?;
        if let Some(m) = moving
            && !self.used.contains(m)
        {
            return Err(perr(
                self.name,
                field,
                format!(
                    "is paged by `{m}` but no template of it uses `{{{{ {m} }}}}`: every page would be the first"
                ),
            ));
        }
        Ok(out)
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
        let url = self.template(&format!("{field}.url"), &req.url, scope, Kind::Text)?;
        let mut headers = Vec::new();
        for (h, v) in &req.headers {
            check_header_name(self.name, &format!("{field}.headers"), h)?;
            headers.push((
                h.clone(),
                self.template(&format!("{field}.headers.{h}"), v, scope, Kind::Text)?,
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
            Some(b) => Some(self.template(&format!("{field}.body"), b, scope, Kind::Json)?),
            None => None,
        };
        let graphql = match &req.graphql {
            Some(g) => {
                if g.query.contains("{{") || g.query.contains("{%") {
                    return Err(perr(
                        self.name,
                        &format!("{field}.graphql.query"),
                        "is sent verbatim, not a template: pass values through `variables`",
                    ));
                }
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
                        Kind::Json,
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
                self.template(&format!("headers.{h}"), v, Scope::Common, Kind::Text)?,
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
                let t = self.template("auth.value", value, Scope::Common, Kind::Text)?;
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
                let t = self.template("auth.value", value, Scope::Common, Kind::Text)?;
                auth_header = Some((header, t));
            }
        }
        let mut lookups = Vec::new();
        for (i, l) in config.lookup.iter().flat_map(|l| l.as_slice()).enumerate() {
            let field = lookup_field(&config, i);
            self.chained = i > 0;
            let pagination = l
                .pagination
                .as_ref()
                .map(|p| self.pagination(&field, p))
                .transpose()?;
            let (scope, path_scope) = match l.mode {
                LookupMode::PerItem => (Scope::Lookup, Scope::LookupPath),
                LookupMode::PerBatch => (Scope::LookupBatch, Scope::Path),
                LookupMode::List => (Scope::LookupList, Scope::Path),
            };
            if l.mode != LookupMode::PerBatch && l.skus_per_request.is_some() {
                return Err(perr(
                    name,
                    &format!("{field}.skus_per_request"),
                    "only for mode = \"per_batch\"",
                ));
            }
            if l.skus_per_request == Some(0) {
                return Err(perr(
                    name,
                    &format!("{field}.skus_per_request"),
                    "must be at least 1",
                ));
            }
            if l.mode != LookupMode::PerItem && (l.records.is_none() || l.sku.is_none()) {
                return Err(perr(
                    name,
                    &format!("{field}.records"),
                    "mode = \"per_batch\" and \"list\" need `records` and `sku` paths (records are matched to SKUs by `sku`)",
                ));
            }
            let request = self.paged_request(
                &format!("{field}.request"),
                &l.request,
                scope,
                pagination.as_ref(),
            )?;
            let records = l
                .records
                .as_deref()
                .map(|p| self.tpath(&format!("{field}.records"), p, path_scope))
                .transpose()?;
            let sku = l
                .sku
                .as_deref()
                .map(|p| self.tpath(&format!("{field}.sku"), p, path_scope))
                .transpose()?;
            let mut ids = Vec::new();
            if let Some(p) = &l.id {
                ids.push((
                    "id".to_owned(),
                    self.tpath(&format!("{field}.id"), p, path_scope)?,
                ));
            }
            for (n, p) in &l.ids {
                ids.push((
                    n.clone(),
                    self.tpath(&format!("{field}.ids.{n}"), p, path_scope)?,
                ));
            }
            lookups.push(CompiledLookup {
                mode: l.mode,
                request,
                records,
                sku,
                ids,
                per_request: l.skus_per_request.unwrap_or(50),
                pagination,
            });
        }
        self.chained = false;
        if config.owns.is_empty() {
            return Err(perr(name, "owns", "names no field (known: qty, prices)"));
        }
        let mut owns = config.owns.clone();
        owns.sort();
        owns.dedup();
        let write_list = config.write.as_slice();
        if write_list.is_empty() {
            return Err(perr(name, "write", "needs at least one request"));
        }
        let write_mode = write_list[0].mode;
        let mut writes = Vec::new();
        for (i, w) in write_list.iter().enumerate() {
            let field = if write_list.len() == 1 && matches!(config.write, OneOrMany::One(_)) {
                "write".to_owned()
            } else {
                format!("write[{i}]")
            };
            if w.mode != write_mode {
                return Err(perr(
                    name,
                    &format!("{field}.mode"),
                    "every write request must have the same mode",
                ));
            }
            if w.items_per_request == Some(0) {
                return Err(perr(
                    name,
                    &format!("{field}.items_per_request"),
                    "must be at least 1",
                ));
            }
            if w.mode == Mode::PerItem && w.items_per_request.is_some() {
                return Err(perr(
                    name,
                    &format!("{field}.items_per_request"),
                    "only for mode = \"per_batch\"",
                ));
            }
            if let Some(h) = &w.idempotency_header {
                check_header_name(name, &format!("{field}.idempotency_header"), h)?;
            }
            let mut fields = w.fields.clone().unwrap_or_else(|| owns.clone());
            fields.sort();
            fields.dedup();
            if fields.is_empty() {
                return Err(perr(
                    name,
                    &format!("{field}.fields"),
                    "names no field (known: qty, prices)",
                ));
            }
            if let Some(f) = fields.iter().find(|f| !owns.contains(f)) {
                return Err(perr(
                    name,
                    &format!("{field}.fields"),
                    format!("writes {:?}, which `owns` does not list", f.name()),
                ));
            }
            let write_scope = match w.mode {
                Mode::PerBatch => Scope::WriteBatch,
                Mode::PerItem => Scope::WriteItem,
            };
            let request = self.request(&format!("{field}.request"), &w.request, write_scope)?;
            let receipt = match &w.receipt {
                Some(p) => Some(self.path(&format!("{field}.receipt"), p)?),
                None => None,
            };
            writes.push(CompiledWrite {
                request,
                fields,
                items_per_request: w.items_per_request,
                idempotency_header: w.idempotency_header.clone(),
                receipt,
            });
        }
        for f in &owns {
            if !writes.iter().any(|w| w.fields.contains(f)) {
                return Err(perr(
                    name,
                    "write",
                    format!("no write request writes {:?}, which `owns` lists", f.name()),
                ));
            }
        }
        let r = &config.read;
        let read_scope = match r.mode {
            Mode::PerBatch => Scope::ReadBatch,
            Mode::PerItem => Scope::ReadItem,
        };
        let read_pagination = r
            .pagination
            .as_ref()
            .map(|p| self.pagination("read", p))
            .transpose()?;
        if read_pagination.is_some() && r.mode == Mode::PerItem {
            return Err(perr(
                name,
                "read.pagination",
                "only for mode = \"per_batch\"",
            ));
        }
        let read = self.paged_request(
            "read.request",
            &r.request,
            read_scope,
            read_pagination.as_ref(),
        )?;
        let opt =
            |s: &mut Self, f: &str, p: &Option<String>| -> Result<Option<PathT>, ProfileError> {
                p.as_deref().map(|p| s.tpath(f, p, Scope::Path)).transpose()
            };
        let records = opt(&mut self, "read.records", &r.records)?;
        let sku = opt(&mut self, "read.sku", &r.sku)?;
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
                self.tpath("read.tiers", t, Scope::Path)?,
                self.tpath("read.tier_min_qty", m, Scope::Path)?,
                self.tpath("read.tier_price", p, Scope::Path)?,
            )),
            _ => {
                return Err(perr(
                    name,
                    "read.tiers",
                    "`tiers`, `tier_min_qty` and `tier_price` go together",
                ));
            }
        };
        let price = opt(&mut self, "read.price", &r.price)?;
        if tiers.is_some() && price.is_some() {
            return Err(perr(
                name,
                "read.price",
                "give either `price` or `tiers` (with `tier_min_qty`, `tier_price`), not both",
            ));
        }
        let qty = opt(&mut self, "read.qty", &r.qty)?;
        if owns.contains(&Field::Qty) && qty.is_none() {
            return Err(perr(
                name,
                "read.qty",
                "required: the profile owns `qty` (verify reads it back); set `owns = [\"prices\"]` if another system owns the stock",
            ));
        }
        if owns.contains(&Field::Prices) && tiers.is_none() && price.is_none() {
            return Err(perr(
                name,
                "read.price",
                "give `price` or `tiers` (with `tier_min_qty`, `tier_price`): the profile owns `prices` (verify reads them back); set `owns = [\"qty\"]` if another system owns the prices",
            ));
        }
        let read_paths = ReadPathsT {
            records,
            sku,
            qty,
            tiers,
            price,
            currency: opt(&mut self, "read.currency", &r.currency)?,
        };
        let probe = match &config.probe {
            Some(p) => Some((
                self.request("probe.request", &p.request, Scope::Probe)?,
                p.receipt
                    .as_deref()
                    .map(|x| self.path("probe.receipt", x))
                    .transpose()?,
            )),
            None => None,
        };
        let mut errors = Vec::new();
        for (i, rule) in config.errors.iter().enumerate() {
            let field = format!("errors[{i}]");
            let rel = |key: &str, p: &Option<String>| {
                p.as_deref()
                    .map(|x| self.path(&format!("{field}.{key}"), x))
                    .transpose()
            };
            let sku = rel("sku", &rule.sku)?;
            let index = rel("index", &rule.index)?;
            let message = rel("message", &rule.message)?;
            let item_level = sku.is_some() || index.is_some();
            if item_level
                && !matches!(
                    rule.class,
                    ErrorClass::Rejected | ErrorClass::Transient | ErrorClass::NotFound
                )
            {
                return Err(perr(
                    self.name,
                    &format!("{field}.class"),
                    "an item-level rule (with `sku` or `index`) has class rejected, transient or not_found",
                ));
            }
            errors.push(CompiledErrorRule {
                path: self.path(&format!("{field}.path"), &rule.path)?,
                class: rule.class,
                source: rule.path.clone(),
                sku,
                index,
                message,
            });
        }
        let conflict = match &config.conflict {
            None => None,
            Some(c) => {
                if c.statuses.is_empty() && c.path.is_none() {
                    return Err(perr(
                        name,
                        "conflict",
                        "give `statuses` or `path`: how the platform says a compare failed",
                    ));
                }
                if !owns.contains(&Field::Qty) {
                    return Err(perr(name, "conflict", "the profile does not write qty"));
                }
                if write_mode != Mode::PerItem {
                    return Err(perr(
                        name,
                        "conflict",
                        "compare-and-set stock writes need mode = \"per_item\" (each item compares on its own)",
                    ));
                }
                for (i, w) in write_list.iter().enumerate() {
                    let writes_qty = w.fields.as_ref().is_none_or(|f| f.contains(&Field::Qty));
                    let text = serde_json::to_string(&w.request).unwrap_or_default();
                    if writes_qty && !text.contains("confirmed_qty") {
                        return Err(perr(
                            name,
                            &format!("write[{i}].request"),
                            "writes qty but does not send `item.confirmed_qty` (the quantity to compare with), which `conflict` needs",
                        ));
                    }
                }
                Some(CompiledConflict {
                    statuses: c.statuses.clone(),
                    path: c
                        .path
                        .as_deref()
                        .map(|p| self.path("conflict.path", p))
                        .transpose()?,
                    shown: c
                        .shown
                        .as_deref()
                        .map(|p| self.path("conflict.shown", p))
                        .transpose()?,
                })
            }
        };
        Ok(Profile {
            name: name.to_owned(),
            env: self.env,
            headers,
            auth_header,
            login,
            token_path,
            expires_in_path,
            lookups,
            id_names: self.id_names,
            writes,
            write_mode,
            read,
            read_paths,
            read_pagination,
            probe,
            errors,
            conflict,
            config: ProfileConfig { owns, ..config },
        })
    }
}

/// A compiled [`ErrorRule`].
#[derive(Debug)]
pub(crate) struct CompiledErrorRule {
    pub(crate) path: JsonPath,
    pub(crate) class: ErrorClass,
    /// The rule's path as written (quoted in messages).
    pub(crate) source: String,
    pub(crate) sku: Option<JsonPath>,
    pub(crate) index: Option<JsonPath>,
    pub(crate) message: Option<JsonPath>,
}

impl CompiledErrorRule {
    /// Whether matches name items (`sku` or `index`).
    pub(crate) fn item_level(&self) -> bool {
        self.sku.is_some() || self.index.is_some()
    }
}

/// The field name of lookup step `i` in errors.
fn lookup_field(config: &ProfileConfig, i: usize) -> String {
    match &config.lookup {
        Some(OneOrMany::Many(_)) => format!("lookup[{i}]"),
        _ => "lookup".to_owned(),
    }
}

/// Endpoint settings with a meaning of their own (a profile cannot declare them).
pub(crate) const RESERVED_SETTINGS: &[&str] = &[
    "profile",
    "owns",
    "mapping",
    "timeout_ms",
    "currency",
    "on_removed",
    "stock_policy",
    "on_conflict",
];

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

/// The platform's ids of one SKU, by name.
pub(crate) type Ids = BTreeMap<String, String>;

/// The template view of one item (with its remote ids, if known).
pub(crate) fn item_value(
    item: &bulwark_workflows::catalog::Item,
    ids: Option<&Ids>,
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
        "id": ids.and_then(|i| i.get("id")),
        "ids": ids,
        // Compare-and-set: set by a stock write that compares (else null).
        "confirmed_qty": Value::Null,
    })
}

fn sample_context(
    settings: &BTreeSet<String>,
    secrets: &BTreeSet<String>,
    id_names: &[String],
    decimals: u32,
) -> Value {
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
    let ids: Ids = id_names
        .iter()
        .map(|n| (n.clone(), format!("sample-{n}")))
        .collect();
    let mut iv = item_value(&item, Some(&ids), decimals);
    iv["confirmed_qty"] = json!(5);
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
        "ids": ids,
        "page": 1,
        "offset": 0,
        "limit": 50,
        "cursor": "sample-cursor",
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
