//! [`ApiSimulator`]: a second portal simulator with two commerce-platform API styles, to
//! exercise the declarative [`http`](crate::http) adapter. Both serve any number of
//! virtual endpoints on one loopback port; item values are kept in memory.
//!
//! Every endpoint has a catalog in which **every SKU exists**: a product is created (with
//! quantity 0 and no prices) the first time its SKU is looked up, and gets an id of the
//! form `p-<n>` (REST) / `gid://sim/Product/<n>` (GraphQL). [`ApiSimHandle::renumber`]
//! gives every product of an endpoint a new id, so cached ids go stale.
//!
//! # Per-item REST (`/rest/{endpoint}/…`)
//!
//! * `POST /rest/{e}/login` `{"username", "password"}` → `{"access_token", "expires_in"}`,
//!   the token also in header `X-Auth-Token` (401 on wrong credentials). Every other
//!   route needs `Authorization: Bearer <token>` with a live token (else 401).
//! * `GET /rest/{e}/products?sku=S` → `{"products": [{"id", "sku"}]}`.
//! * `PATCH /rest/{e}/products/{id}` `{"stock": n, "prices": [{"min_qty", "amount":
//!   "12.34"}]}` → `{"id"}`; 404 for an unknown id; 422 `{"errors": {"stock": [...]}}`
//!   for a negative stock or a malformed amount. Prices are decimal strings.
//! * `GET /rest/{e}/products/{id}` → `{"product": {"id", "sku", "stock", "prices",
//!   "currency"}}` or 404.
//!
//! # GraphQL (`POST /graphql/{endpoint}`)
//!
//! Header `X-Api-Key` must carry the configured key; otherwise the answer is **200** with
//! `{"errors": [{"extensions": {"code": "UNAUTHENTICATED"}}]}`. Errors are always reported
//! in 200 responses. The simulator recognises the operation by its root field and takes
//! every input from `variables` (it does not execute selection sets):
//!
//! * `productBySku(sku: $sku)` → `data.productBySku {id, sku}`;
//! * `setInventory(id:, quantity:, tiers: [{minQty, amountMinor}])` →
//!   `data.setInventory {product {id}, userErrors: []}`; a negative quantity gives
//!   `userErrors: [{field, message}]`; an unknown id gives `errors: [{"extensions":
//!   {"code": "NOT_FOUND"}}]` and `data.setInventory: null`;
//! * `product(id:)` → `data.product {id, sku, quantity, tiers [{minQty, amountMinor}],
//!   currency}` or `null`. Prices are integer minor units.
//!
//! and in bulk (one request per batch, the shape of newer admin APIs):
//!
//! * `productsBySkus(skus: [String!]!)` → `data.productsBySkus [{id, sku}]`;
//! * `setInventories(inputs: [{id, quantity, tiers}])` → `data.setInventories`, one result
//!   per input in order, each a member of an **error-result union** told apart by
//!   `__typename`: `InventorySet {id, sku}`, `InventoryRejected {id, sku, code, message}`
//!   (validation, a refused SKU) or `ProductNotFound {id, inputIndex, message}`. The
//!   other inputs of a request apply whatever one of them answers;
//! * `products(ids: [ID!]!)` → `data.products`, a product or `null` per id.
//!
//! [`ApiSimHandle::throttle_next`] answers the next requests 200 with a `THROTTLED` error.
//!
//! # Catalog (`/catalog/{endpoint}/…`)
//!
//! A platform that cannot be asked by SKU, whose stock and prices are separate resources
//! addressed by different ids. Header `X-Api-Key` must carry the configured key (else
//! 401). Products exist only once [`ApiSimHandle::seed_catalog`] created them.
//!
//! * `GET /catalog/{e}/products?limit=L` plus one of `page=N` (from 1), `offset=O`,
//!   `cursor=C`, optionally `skus=A,B,…` (only those SKUs) → `{"products": [{"id", "title", "variants": [{"id", "product_id", "sku",
//!   "inventory_item_id", "prices": [{"min_qty", "amount"}], "inventory_levels":
//!   [{"location_id", "available"}]}]}], "next_cursor"}`, sorted by SKU, with a relative
//!   `Link: <…?cursor=…>; rel="next"` while more follow. No SKU filter exists.
//! * `GET /catalog/{e}/products/{id}` → `{"product": {…}}` or 404.
//! * `POST /catalog/{e}/inventory_levels/set` `{"inventory_item_id", "location_id",
//!   "available"}` sets the stock (location [`CATALOG_LOCATION`]; 422 otherwise). With
//!   `"compare_quantity": N` (not null) it is a compare-and-set: applied only if the
//!   stock is still N, else 409 `{"errors": {"compare_quantity": […]}, "available": M}`.
//! * `PUT /catalog/{e}/products/{product}/variants/{variant}` `{"variant": {"prices":
//!   [{"min_qty", "amount"}]}}` sets the prices (404 unless the ids belong together).
//!
//! Every write request counts in [`ApiSimHandle::writes_for`] (two per item here).
//!
//! # Faults
//!
//! * [`ApiSimHandle::lose_next_writes`]: the next writes of an endpoint are **applied, then
//!   the connection is closed without an answer** (a lost response);
//! * [`ApiSimHandle::expire_tokens`]: every issued token stops being accepted;
//! * [`ApiSimHandle::refuse_tokens`]: logins succeed but their tokens are never accepted.
//!
//! Orders: `POST /_sim/orders/{e}` `{"sku", "qty"}` (or [`ApiSimHandle::order`]) sells
//! `qty` units of a product as a customer at the shop would (not a write; 409 if fewer
//! are in stock).
//!
//! `GET /_sim/state` answers the counters and every endpoint's products as JSON
//! ([`ApiSimHandle::state`]), for a simulator run as a process of its own
//! (`bulwark simulate-api`).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bulwark_workflows::catalog::{Item, PriceTier};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

/// The shipped example profiles for this simulator's shapes (`examples/profiles/`), by
/// file name: per-item REST, per-item and bulk GraphQL, the catalog.
pub const PROFILES: &[(&str, &str)] = &[
    (
        "rest_items.toml",
        include_str!("../../examples/profiles/rest_items.toml"),
    ),
    ("gql.toml", include_str!("../../examples/profiles/gql.toml")),
    (
        "gql_batch.toml",
        include_str!("../../examples/profiles/gql_batch.toml"),
    ),
    (
        "catalog.toml",
        include_str!("../../examples/profiles/catalog.toml"),
    ),
];

/// Simulator configuration. Credentials are whatever the test chooses.
#[derive(Clone, Default)]
pub struct ApiSimConfig {
    /// REST login user name.
    pub username: String,
    /// REST login password.
    pub password: String,
    /// GraphQL `X-Api-Key` value.
    pub api_key: String,
    /// Lifetime of REST tokens in seconds (reported as `expires_in`); 0 means 3600.
    pub token_ttl_secs: u64,
    /// Currency every product reports.
    pub currency: String,
    /// Delay before answering each request (a slow platform).
    pub latency_ms: u64,
    /// SKUs every endpoint refuses to sell (as [`ApiSimHandle::refuse_skus`] on each).
    pub refuse_skus: Vec<String>,
}

impl fmt::Debug for ApiSimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSimConfig")
            .field("username", &self.username)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("currency", &self.currency)
            .field("latency_ms", &self.latency_ms)
            .finish_non_exhaustive()
    }
}

/// Live counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiSimStats {
    /// Successful logins.
    pub logins: u64,
    /// Requests refused for authentication (401, or UNAUTHENTICATED in GraphQL).
    pub auth_refusals: u64,
    /// Id lookups answered.
    pub lookups: u64,
    /// Item writes applied (REST PATCH or GraphQL `setInventory`).
    pub writes_applied: u64,
    /// Writes refused (validation, unknown id).
    pub writes_refused: u64,
    /// Read-back requests answered.
    pub reads: u64,
    /// Responses deliberately lost after applying.
    pub responses_lost: u64,
    /// Requests failed by [`ApiSimHandle::fail_requests`].
    pub faults_injected: u64,
    /// Catalog listing pages served.
    pub pages: u64,
}

#[derive(Debug, Clone)]
struct Product {
    id: String,
    /// Catalog mode: its one variant's id and inventory item's id.
    variant: String,
    inventory_item: String,
    sku: String,
    qty: i64,
    tiers: Vec<PriceTier>,
    writes: u64,
}

#[derive(Default)]
struct EpData {
    /// By SKU.
    products: HashMap<String, Product>,
    /// Id → SKU (product, variant and inventory item ids alike).
    ids: HashMap<String, String>,
    lose_writes: u32,
    /// SKUs every write of which is refused (422 / `userErrors`).
    refuse_skus: std::collections::HashSet<String>,
    /// Probability that a request (other than a login) fails.
    fail_rate: f64,
    /// GraphQL requests still to answer with a THROTTLED error (inside a 200).
    throttle: u32,
}

#[derive(Default)]
struct Counters {
    logins: AtomicU64,
    auth_refusals: AtomicU64,
    lookups: AtomicU64,
    writes_applied: AtomicU64,
    writes_refused: AtomicU64,
    reads: AtomicU64,
    responses_lost: AtomicU64,
    faults_injected: AtomicU64,
    pages: AtomicU64,
}

struct Inner {
    rng: Mutex<rand::rngs::StdRng>,
    config: ApiSimConfig,
    endpoints: Mutex<HashMap<String, EpData>>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    issued: Mutex<Vec<String>>,
    refuse_tokens: AtomicBool,
    next_id: AtomicU64,
    counters: Counters,
}

type Shared = Arc<Inner>;

impl Inner {
    fn ttl(&self) -> Duration {
        Duration::from_secs(if self.config.token_ttl_secs == 0 {
            3600
        } else {
            self.config.token_ttl_secs
        })
    }

    fn with_ep<T>(&self, endpoint: &str, f: impl FnOnce(&mut EpData) -> T) -> T {
        let mut map = self.endpoints.lock().expect("simulator state");
        f(map.entry(endpoint.to_owned()).or_insert_with(|| EpData {
            refuse_skus: self.config.refuse_skus.iter().cloned().collect(),
            ..EpData::default()
        }))
    }

    fn stats(&self) -> ApiSimStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        ApiSimStats {
            logins: l(&c.logins),
            auth_refusals: l(&c.auth_refusals),
            lookups: l(&c.lookups),
            writes_applied: l(&c.writes_applied),
            writes_refused: l(&c.writes_refused),
            reads: l(&c.reads),
            responses_lost: l(&c.responses_lost),
            faults_injected: l(&c.faults_injected),
            pages: l(&c.pages),
        }
    }

    /// Counters and every endpoint's products as JSON (`GET /_sim/state`).
    fn state_json(&self) -> Value {
        let stats = self.stats();
        let map = self.endpoints.lock().expect("simulator state");
        let endpoints: serde_json::Map<String, Value> = map
            .iter()
            .map(|(e, ep)| {
                let mut products: Vec<&Product> = ep.products.values().collect();
                products.sort_by(|a, b| a.sku.cmp(&b.sku));
                let products: Vec<Value> = products
                    .into_iter()
                    .map(|p| {
                        json!({"sku": p.sku, "id": p.id, "qty": p.qty, "tiers": p.tiers, "writes": p.writes})
                    })
                    .collect();
                (e.clone(), json!({"products": products}))
            })
            .collect();
        json!({"stats": stats, "endpoints": endpoints})
    }

    /// The product for `sku`, created on first sight (one lookup request answered).
    fn lookup(&self, endpoint: &str, sku: &str, graphql: bool) -> String {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        self.product_id(endpoint, sku, graphql)
    }

    /// The product for `sku`, created on first sight.
    fn product_id(&self, endpoint: &str, sku: &str, graphql: bool) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.with_ep(endpoint, |ep| {
            if let Some(p) = ep.products.get(sku) {
                return p.id.clone();
            }
            let id = if graphql {
                format!("gid://sim/Product/{n}")
            } else {
                format!("p-{n}")
            };
            insert_product(ep, sku, id.clone(), n);
            id
        })
    }

    fn bearer_ok(&self, endpoint: &str, headers: &HeaderMap) -> bool {
        let ok = !self.refuse_tokens.load(Ordering::SeqCst)
            && headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| {
                    let tokens = self.tokens.lock().expect("tokens");
                    tokens
                        .get(t)
                        .is_some_and(|(ep, at)| ep == endpoint && at.elapsed() < self.ttl())
                });
        if !ok {
            self.counters.auth_refusals.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Apply a write. `Err(None)`: unknown id; `Err(Some(msg))`: validation failed.
    /// `Ok(lose)`: applied; `lose` says whether to drop the response.
    fn apply(
        &self,
        endpoint: &str,
        id: &str,
        qty: i64,
        tiers: Vec<PriceTier>,
    ) -> Result<bool, Option<String>> {
        self.apply_with(
            endpoint,
            |p| p.id == id,
            id,
            |p| {
                if qty < 0 {
                    return Err("must not be negative".to_owned());
                }
                p.qty = qty;
                p.tiers = tiers;
                Ok(())
            },
        )
    }

    /// Apply `change` to the product that `id` names (if `is_it` agrees), with the
    /// faults and refusals every write gets.
    fn apply_with(
        &self,
        endpoint: &str,
        is_it: impl Fn(&Product) -> bool,
        id: &str,
        change: impl FnOnce(&mut Product) -> Result<(), String>,
    ) -> Result<bool, Option<String>> {
        let result = self.with_ep(endpoint, |ep| {
            let Some(sku) = ep.ids.get(id).cloned() else {
                return Err(None);
            };
            if ep.refuse_skus.contains(&sku) {
                return Err(Some(format!("SKU {sku} cannot be sold in this shop")));
            }
            let p = ep.products.get_mut(&sku).filter(|p| is_it(p)).ok_or(None)?;
            change(p).map_err(Some)?;
            p.writes += 1;
            let lose = ep.lose_writes > 0;
            if lose {
                ep.lose_writes -= 1;
            }
            Ok(lose)
        });
        match &result {
            Ok(_) => self.counters.writes_applied.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.counters.writes_refused.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    fn product_by_id(&self, endpoint: &str, id: &str) -> Option<Product> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.with_ep(endpoint, |ep| {
            ep.ids
                .get(id)
                .and_then(|sku| ep.products.get(sku))
                .filter(|p| p.id == id)
                .cloned()
        })
    }

    /// Close the connection without answering (the write was applied).
    fn lose_response(&self) -> ! {
        self.counters.responses_lost.fetch_add(1, Ordering::Relaxed);
        // Unwinding the connection task drops the socket: the client sees the connection
        // closed before any response. `resume_unwind` skips the panic hook (no noise).
        std::panic::resume_unwind(Box::new("simulated lost response"))
    }
}

/// Add a product (with its catalog variant and inventory item) to `ep`.
fn insert_product(ep: &mut EpData, sku: &str, id: String, n: u64) {
    let p = Product {
        variant: format!("v-{n}"),
        inventory_item: format!("ii-{n}"),
        id,
        sku: sku.to_owned(),
        qty: 0,
        tiers: Vec::new(),
        writes: 0,
    };
    for k in [&p.id, &p.variant, &p.inventory_item] {
        ep.ids.insert(k.clone(), sku.to_owned());
    }
    ep.products.insert(sku.to_owned(), p);
}

fn minor_to_amount(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let a = minor.unsigned_abs();
    format!("{sign}{}.{:02}", a / 100, a % 100)
}

fn amount_to_minor(text: &str) -> Option<i64> {
    let (int, frac) = text.split_once('.')?;
    if frac.len() != 2 || int.is_empty() || !int.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    int.parse::<i64>()
        .ok()?
        .checked_mul(100)?
        .checked_add(frac.parse().ok()?)
}

fn status_json(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct LoginReq {
    username: String,
    password: String,
}

async fn rest_login(
    State(s): State<Shared>,
    UrlPath(endpoint): UrlPath<String>,
    body: Result<Json<LoginReq>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let ok = body
        .is_ok_and(|Json(b)| b.username == s.config.username && b.password == s.config.password);
    if !ok {
        s.counters.auth_refusals.fetch_add(1, Ordering::Relaxed);
        return status_json(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid credentials"}),
        );
    }
    let token = format!("tk-{}", Uuid::new_v4().simple());
    s.tokens
        .lock()
        .expect("tokens")
        .insert(token.clone(), (endpoint, Instant::now()));
    s.issued.lock().expect("tokens").push(token.clone());
    s.counters.logins.fetch_add(1, Ordering::Relaxed);
    (
        [("x-auth-token", token.clone())],
        Json(
            json!({"access_token": token, "token_type": "Bearer", "expires_in": s.ttl().as_secs()}),
        ),
    )
        .into_response()
}

#[derive(Deserialize)]
struct SkuQuery {
    sku: String,
}

fn unauthorized() -> Response {
    status_json(
        StatusCode::UNAUTHORIZED,
        json!({"error": "invalid or expired token"}),
    )
}

async fn rest_lookup(
    State(s): State<Shared>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    Query(q): Query<SkuQuery>,
) -> Response {
    if !s.bearer_ok(&endpoint, &headers) {
        return unauthorized();
    }
    let id = s.lookup(&endpoint, &q.sku, false);
    Json(json!({"products": [{"id": id, "sku": q.sku}]})).into_response()
}

#[derive(Deserialize)]
struct RestPrice {
    min_qty: u32,
    amount: String,
}

#[derive(Deserialize)]
struct RestPatch {
    stock: i64,
    #[serde(default)]
    prices: Vec<RestPrice>,
}

/// A JSON body, or the 422 that says why it is not one. (The error is the handler's
/// answer, returned at once: its size does not matter.)
#[allow(clippy::result_large_err)]
fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, Response> {
    body.map(|Json(b)| b).map_err(|e| {
        status_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"body": [e.body_text()]}}),
        )
    })
}

/// Decimal-amount prices as tiers, or the 422 naming the bad amount.
#[allow(clippy::result_large_err)]
fn rest_tiers(prices: &[RestPrice]) -> Result<Vec<PriceTier>, Response> {
    prices
        .iter()
        .map(|p| {
            amount_to_minor(&p.amount)
                .map(|minor| PriceTier {
                    min_qty: p.min_qty,
                    price_minor: minor,
                })
                .ok_or_else(|| {
                    status_json(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"errors": {"prices": [format!("amount {:?} is not a decimal with 2 places", p.amount)]}}),
                    )
                })
        })
        .collect()
}

async fn rest_patch(
    State(s): State<Shared>,
    UrlPath((endpoint, id)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<RestPatch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !s.bearer_ok(&endpoint, &headers) {
        return unauthorized();
    }
    let body = match json_body(body) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let tiers = match rest_tiers(&body.prices) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    match s.apply(&endpoint, &id, body.stock, tiers) {
        Ok(true) => s.lose_response(),
        Ok(false) => Json(json!({"id": id})).into_response(),
        Err(None) => status_json(StatusCode::NOT_FOUND, json!({"error": "no such product"})),
        Err(Some(m)) => status_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"stock": [m]}}),
        ),
    }
}

async fn rest_get(
    State(s): State<Shared>,
    UrlPath((endpoint, id)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !s.bearer_ok(&endpoint, &headers) {
        return unauthorized();
    }
    match s.product_by_id(&endpoint, &id) {
        None => status_json(StatusCode::NOT_FOUND, json!({"error": "no such product"})),
        Some(p) => Json(json!({"product": {
            "id": p.id,
            "sku": p.sku,
            "stock": p.qty,
            "prices": p.tiers.iter().map(|t| json!({"min_qty": t.min_qty, "amount": minor_to_amount(t.price_minor)})).collect::<Vec<_>>(),
            "currency": s.config.currency,
        }}))
        .into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// GraphQL
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct GqlReq {
    query: String,
    #[serde(default)]
    variables: Value,
}

fn gql_error(code: &str, message: &str) -> Response {
    Json(json!({"errors": [{"message": message, "extensions": {"code": code}}], "data": null}))
        .into_response()
}

async fn graphql(
    State(s): State<Shared>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<GqlReq>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let key_ok = headers
        .get("x-api-key")
        .is_some_and(|v| v.as_bytes() == s.config.api_key.as_bytes());
    if !key_ok {
        s.counters.auth_refusals.fetch_add(1, Ordering::Relaxed);
        return gql_error("UNAUTHENTICATED", "missing or invalid API key");
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return gql_error("BAD_REQUEST", &e.body_text()),
    };
    let throttled = s.with_ep(&endpoint, |ep| {
        let t = ep.throttle > 0;
        ep.throttle = ep.throttle.saturating_sub(1);
        t
    });
    if throttled {
        return Json(json!({
            "errors": [{"message": "Throttled", "extensions": {"code": "THROTTLED"}}],
            "data": null
        }))
        .into_response();
    }
    let vars = &req.variables;
    let var_str = |k: &str| vars.get(k).and_then(Value::as_str).map(str::to_owned);
    let var_list = |k: &str| vars.get(k).and_then(Value::as_array).cloned();
    if req.query.contains("setInventories") {
        let Some(inputs) = var_list("inputs") else {
            return gql_error("BAD_USER_INPUT", "setInventories needs $inputs");
        };
        return gql_set_inventories(&s, &endpoint, &inputs);
    }
    if req.query.contains("productsBySkus") {
        let Some(skus) = var_list("skus") else {
            return gql_error("BAD_USER_INPUT", "productsBySkus needs $skus");
        };
        s.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let found: Vec<Value> = skus
            .iter()
            .filter_map(Value::as_str)
            .map(|sku| json!({"id": s.product_id(&endpoint, sku, true), "sku": sku}))
            .collect();
        return Json(json!({"data": {"productsBySkus": found}})).into_response();
    }
    if req.query.contains("products(") {
        let Some(ids) = var_list("ids") else {
            return gql_error("BAD_USER_INPUT", "products needs $ids");
        };
        let found: Vec<Value> = ids
            .iter()
            .map(|id| {
                id.as_str()
                    .and_then(|id| s.product_by_id(&endpoint, id))
                    .map_or(Value::Null, |p| gql_product(&s, &p))
            })
            .collect();
        return Json(json!({"data": {"products": found}})).into_response();
    }
    if req.query.contains("setInventory") {
        let (Some(id), Some(qty)) = (var_str("id"), vars.get("quantity").and_then(Value::as_i64))
        else {
            return gql_error("BAD_USER_INPUT", "setInventory needs $id and $quantity");
        };
        let tiers = match gql_tiers(vars.get("tiers")) {
            Ok(t) => t,
            Err(r) => return r,
        };
        match s.apply(&endpoint, &id, qty, tiers) {
            Ok(true) => s.lose_response(),
            Ok(false) => {
                Json(json!({"data": {"setInventory": {"product": {"id": id}, "userErrors": []}}}))
                    .into_response()
            }
            Err(None) => Json(json!({
                "errors": [{"message": format!("product {id} not found"), "path": ["setInventory"], "extensions": {"code": "NOT_FOUND"}}],
                "data": {"setInventory": null}
            }))
            .into_response(),
            Err(Some(m)) => Json(json!({"data": {"setInventory": {
                "product": null,
                "userErrors": [{"field": ["quantity"], "message": m}]
            }}}))
            .into_response(),
        }
    } else if req.query.contains("productBySku") {
        let Some(sku) = var_str("sku") else {
            return gql_error("BAD_USER_INPUT", "productBySku needs $sku");
        };
        let id = s.lookup(&endpoint, &sku, true);
        Json(json!({"data": {"productBySku": {"id": id, "sku": sku}}})).into_response()
    } else if req.query.contains("product(") {
        let Some(id) = var_str("id") else {
            return gql_error("BAD_USER_INPUT", "product needs $id");
        };
        let product = s.product_by_id(&endpoint, &id).map(|p| gql_product(&s, &p));
        Json(json!({"data": {"product": product}})).into_response()
    } else {
        gql_error("GRAPHQL_VALIDATION_FAILED", "unknown operation")
    }
}

/// A product as the GraphQL API shows it.
fn gql_product(s: &Inner, p: &Product) -> Value {
    json!({
        "id": p.id,
        "sku": p.sku,
        "quantity": p.qty,
        "tiers": p.tiers.iter().map(|t| json!({"minQty": t.min_qty, "amountMinor": t.price_minor})).collect::<Vec<_>>(),
        "currency": s.config.currency,
    })
}

/// GraphQL price tiers (`[{minQty, amountMinor}]`; absent: none).
fn gql_tiers(v: Option<&Value>) -> Result<Vec<PriceTier>, Response> {
    let mut tiers = Vec::new();
    for t in v.and_then(Value::as_array).into_iter().flatten() {
        let (Some(m), Some(a)) = (
            t.get("minQty").and_then(Value::as_u64),
            t.get("amountMinor").and_then(Value::as_i64),
        ) else {
            return Err(gql_error(
                "BAD_USER_INPUT",
                "tiers need integer minQty and amountMinor",
            ));
        };
        tiers.push(PriceTier {
            min_qty: u32::try_from(m).unwrap_or(u32::MAX),
            price_minor: a,
        });
    }
    Ok(tiers)
}

/// `setInventories(inputs: [{id, quantity, tiers}])`: each input applied on its own; the
/// answer is a list of results in input order, each one member of the union
/// `InventorySet {id, sku} | InventoryRejected {id, sku, code, message} |
/// ProductNotFound {id, inputIndex, message}`.
fn gql_set_inventories(s: &Inner, endpoint: &str, inputs: &[Value]) -> Response {
    let mut results = Vec::with_capacity(inputs.len());
    let mut lose = false;
    for (i, input) in inputs.iter().enumerate() {
        let (Some(id), Some(qty)) = (
            input.get("id").and_then(Value::as_str),
            input.get("quantity").and_then(Value::as_i64),
        ) else {
            return gql_error("BAD_USER_INPUT", "every input needs id and quantity");
        };
        let tiers = match gql_tiers(input.get("tiers")) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let sku = s.with_ep(endpoint, |ep| ep.ids.get(id).cloned());
        results.push(match s.apply(endpoint, id, qty, tiers) {
            Ok(l) => {
                lose |= l;
                json!({"__typename": "InventorySet", "id": id, "sku": sku})
            }
            Err(None) => json!({
                "__typename": "ProductNotFound", "id": id, "inputIndex": i,
                "message": format!("product {id} not found")
            }),
            Err(Some(m)) => json!({
                "__typename": "InventoryRejected", "id": id, "sku": sku,
                "code": "INVALID", "message": m
            }),
        });
    }
    if lose {
        s.lose_response();
    }
    Json(json!({"data": {"setInventories": results}})).into_response()
}

/// The simulator's routes over `state`.
fn router(state: Shared) -> Router {
    Router::new()
        .route("/rest/{endpoint}/login", post(rest_login))
        .route("/rest/{endpoint}/products", get(rest_lookup))
        .route(
            "/rest/{endpoint}/products/{id}",
            get(rest_get).patch(rest_patch),
        )
        .route("/graphql/{endpoint}", post(graphql))
        .route("/catalog/{endpoint}/products", get(catalog_list))
        .route("/catalog/{endpoint}/products/{id}", get(catalog_get))
        .route(
            "/catalog/{endpoint}/products/{product}/variants/{variant}",
            axum::routing::put(catalog_put_variant),
        )
        .route(
            "/catalog/{endpoint}/inventory_levels/set",
            post(catalog_set_inventory),
        )
        .route("/_sim/orders/{endpoint}", post(place_order))
        .route(
            "/_sim/state",
            get(|State(s): State<Shared>| async move { Json(s.state_json()) }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            inject_faults,
        ))
        .with_state(state)
}

#[derive(Deserialize)]
struct Order {
    sku: String,
    qty: i64,
}

/// `POST /_sim/orders/{endpoint}`: a customer buys (see [`ApiSimHandle::order`]).
async fn place_order(
    State(s): State<Shared>,
    UrlPath(endpoint): UrlPath<String>,
    body: Result<Json<Order>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let o = match json_body(body) {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    match s.order(&endpoint, &o.sku, o.qty) {
        Ok(left) => Json(json!({"sku": o.sku, "sold": o.qty, "available": left})).into_response(),
        Err(m) => status_json(StatusCode::CONFLICT, json!({"error": m})),
    }
}

impl Inner {
    /// Sell `qty` of `sku` at `endpoint`: the stock left, or why not.
    fn order(&self, endpoint: &str, sku: &str, qty: i64) -> Result<i64, String> {
        self.with_ep(endpoint, |ep| {
            let p = ep
                .products
                .get_mut(sku)
                .ok_or_else(|| format!("no product {sku:?}"))?;
            if qty <= 0 || qty > p.qty {
                return Err(format!("cannot sell {qty} of {sku}: {} in stock", p.qty));
            }
            p.qty -= qty;
            Ok(p.qty)
        })
    }
}

/// [`ApiSimHandle::fail_requests`]: roll the dice for every request but logins.
async fn inject_faults(
    State(s): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use rand::Rng;
    let path = req.uri().path().to_owned();
    let endpoint = path.split('/').nth(2).unwrap_or_default().to_owned();
    if s.config.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.config.latency_ms)).await;
    }
    let p = s.with_ep(&endpoint, |ep| ep.fail_rate);
    if p <= 0.0 || path.ends_with("/login") {
        return next.run(req).await;
    }
    let roll = {
        let mut rng = s.rng.lock().expect("simulator rng");
        rng.random_bool(p).then(|| rng.random_bool(0.5))
    };
    match roll {
        None => next.run(req).await,
        Some(before) => {
            s.counters.faults_injected.fetch_add(1, Ordering::Relaxed);
            if before {
                return status_json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "injected failure"}),
                );
            }
            let _ = next.run(req).await;
            s.lose_response()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Catalog (a listing without a SKU filter; stock and prices as separate resources)
// ---------------------------------------------------------------------------------------

/// The one location catalog stock lives at.
pub const CATALOG_LOCATION: &str = "loc-1";
/// Largest page the catalog listing serves.
pub const CATALOG_MAX_LIMIT: usize = 250;

fn catalog_key_ok(s: &Inner, headers: &HeaderMap) -> bool {
    let ok = headers
        .get("x-api-key")
        .is_some_and(|v| v.as_bytes() == s.config.api_key.as_bytes());
    if !ok {
        s.counters.auth_refusals.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn catalog_unauthorized() -> Response {
    status_json(
        StatusCode::UNAUTHORIZED,
        json!({"errors": "invalid API key"}),
    )
}

fn catalog_product(p: &Product) -> Value {
    json!({
        "id": p.id,
        "title": format!("Product {}", p.sku),
        "variants": [{
            "id": p.variant,
            "product_id": p.id,
            "sku": p.sku,
            "inventory_item_id": p.inventory_item,
            "prices": p.tiers.iter().map(|t| json!({"min_qty": t.min_qty, "amount": minor_to_amount(t.price_minor)})).collect::<Vec<_>>(),
            "inventory_levels": [{"location_id": CATALOG_LOCATION, "available": p.qty}],
        }],
    })
}

#[derive(Deserialize)]
struct ListQuery {
    /// Optional filter: comma-separated SKUs (an `sku in [...]` query).
    skus: Option<String>,
    page: Option<usize>,
    offset: Option<usize>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn catalog_cursor(offset: usize) -> String {
    format!("c{:x}", offset ^ 0x5a5a)
}

fn catalog_offset(cursor: &str) -> Option<usize> {
    usize::from_str_radix(cursor.strip_prefix('c')?, 16)
        .ok()
        .map(|o| o ^ 0x5a5a)
}

async fn catalog_list(
    State(s): State<Shared>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if !catalog_key_ok(&s, &headers) {
        return catalog_unauthorized();
    }
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > CATALOG_MAX_LIMIT {
        return status_json(
            StatusCode::BAD_REQUEST,
            json!({"errors": format!("limit must be 1..={CATALOG_MAX_LIMIT}")}),
        );
    }
    let offset = match (q.page, q.offset, q.cursor.as_deref()) {
        (Some(p), None, None) if p >= 1 => (p - 1) * limit,
        (None, Some(o), None) => o,
        (None, None, Some(c)) => match catalog_offset(c) {
            Some(o) => o,
            None => {
                return status_json(StatusCode::BAD_REQUEST, json!({"errors": "invalid cursor"}));
            }
        },
        (None, None, None) => 0,
        _ => {
            return status_json(
                StatusCode::BAD_REQUEST,
                json!({"errors": "give one of page (from 1), offset, cursor"}),
            );
        }
    };
    s.counters.pages.fetch_add(1, Ordering::Relaxed);
    let (page, total): (Vec<Value>, usize) = s.with_ep(&endpoint, |ep| {
        let filter: Option<std::collections::HashSet<&str>> =
            q.skus.as_deref().map(|f| f.split(',').collect());
        let mut all: Vec<&Product> = ep
            .products
            .values()
            .filter(|p| filter.as_ref().is_none_or(|f| f.contains(p.sku.as_str())))
            .collect();
        all.sort_by(|a, b| a.sku.cmp(&b.sku));
        (
            all.iter()
                .skip(offset)
                .take(limit)
                .map(|p| catalog_product(p))
                .collect(),
            all.len(),
        )
    });
    let next = offset + page.len();
    let more = next < total;
    let body = json!({
        "products": page,
        "next_cursor": if more { Value::String(catalog_cursor(next)) } else { Value::Null },
    });
    if more {
        let link = format!(
            "</catalog/{endpoint}/products?cursor={}&limit={limit}>; rel=\"next\"",
            catalog_cursor(next)
        );
        ([(header::LINK, link)], Json(body)).into_response()
    } else {
        Json(body).into_response()
    }
}

async fn catalog_get(
    State(s): State<Shared>,
    UrlPath((endpoint, id)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !catalog_key_ok(&s, &headers) {
        return catalog_unauthorized();
    }
    match s.product_by_id(&endpoint, &id) {
        None => status_json(StatusCode::NOT_FOUND, json!({"errors": "Not Found"})),
        Some(p) => Json(json!({"product": catalog_product(&p)})).into_response(),
    }
}

#[derive(Deserialize)]
struct InventorySet {
    inventory_item_id: String,
    location_id: String,
    available: i64,
    /// Compare-and-set: apply only if the stock is still this.
    #[serde(default)]
    compare_quantity: Option<i64>,
}

async fn catalog_set_inventory(
    State(s): State<Shared>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<InventorySet>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !catalog_key_ok(&s, &headers) {
        return catalog_unauthorized();
    }
    let b = match json_body(body) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if b.location_id != CATALOG_LOCATION {
        return status_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"location_id": [format!("unknown location {:?}", b.location_id)]}}),
        );
    }
    let item = b.inventory_item_id.clone();
    let mut stale: Option<i64> = None;
    let result = s.apply_with(
        &endpoint,
        |p| p.inventory_item == item,
        &b.inventory_item_id,
        |p| {
            if b.available < 0 {
                return Err("available must not be negative".into());
            }
            if let Some(c) = b.compare_quantity
                && c != p.qty
            {
                stale = Some(p.qty);
                return Err(format!("is {c}, but the stock is {}", p.qty));
            }
            p.qty = b.available;
            Ok(())
        },
    );
    if let (Some(available), Err(Some(m))) = (stale, &result) {
        return status_json(
            StatusCode::CONFLICT,
            json!({"errors": {"compare_quantity": [m]}, "available": available}),
        );
    }
    match result {
        Ok(true) => s.lose_response(),
        Ok(false) => Json(json!({"inventory_level": {
            "inventory_item_id": b.inventory_item_id,
            "location_id": b.location_id,
            "available": b.available,
        }}))
        .into_response(),
        Err(None) => status_json(StatusCode::NOT_FOUND, json!({"errors": "Not Found"})),
        Err(Some(m)) => status_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"available": [m]}}),
        ),
    }
}

#[derive(Deserialize)]
struct VariantPut {
    variant: VariantPrices,
}

#[derive(Deserialize)]
struct VariantPrices {
    prices: Vec<RestPrice>,
}

async fn catalog_put_variant(
    State(s): State<Shared>,
    UrlPath((endpoint, product, variant)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Json<VariantPut>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !catalog_key_ok(&s, &headers) {
        return catalog_unauthorized();
    }
    let b = match json_body(body) {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let tiers = match rest_tiers(&b.variant.prices) {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let result = s.apply_with(
        &endpoint,
        |p| p.variant == variant && p.id == product,
        &variant,
        |p| {
            p.tiers = tiers;
            Ok(())
        },
    );
    match result {
        Ok(true) => s.lose_response(),
        Ok(false) => {
            Json(json!({"variant": {"id": variant, "product_id": product}})).into_response()
        }
        Err(None) => status_json(StatusCode::NOT_FOUND, json!({"errors": "Not Found"})),
        Err(Some(m)) => status_json(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"errors": {"prices": [m]}}),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// Namespace for [`start`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiSimulator;

impl ApiSimulator {
    /// Same as [`start`].
    pub async fn start(config: ApiSimConfig, addr: SocketAddr) -> std::io::Result<ApiSimHandle> {
        start(config, addr).await
    }
}

/// A running [`ApiSimulator`]; dropping it stops the server in the background.
pub struct ApiSimHandle {
    addr: SocketAddr,
    scheme: &'static str,
    inner: Shared,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for ApiSimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSimHandle")
            .field("addr", &self.addr)
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl ApiSimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `base_url` of an endpoint's REST API: `http://{addr}/rest/{endpoint}`
    /// (`https://…` when started with TLS).
    pub fn rest_base_url(&self, endpoint: &str) -> String {
        format!("{}/rest/{endpoint}", self.origin())
    }

    /// `base_url` of an endpoint's GraphQL API: `http://{addr}/graphql/{endpoint}`
    /// (`https://…` when started with TLS).
    pub fn graphql_url(&self, endpoint: &str) -> String {
        format!("{}/graphql/{endpoint}", self.origin())
    }

    /// `base_url` of an endpoint's catalog API: `http://{addr}/catalog/{endpoint}`.
    pub fn catalog_base_url(&self, endpoint: &str) -> String {
        format!("{}/catalog/{endpoint}", self.origin())
    }

    /// Create catalog products for `skus` at `endpoint` (quantity 0, no prices), as a
    /// shop whose products exist before any sync: the catalog API cannot create them.
    pub fn seed_catalog(&self, endpoint: &str, skus: &[String]) {
        let inner = &self.inner;
        inner.with_ep(endpoint, |ep| {
            for sku in skus {
                if !ep.products.contains_key(sku) {
                    let n = inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                    insert_product(ep, sku, format!("p-{n}"), n);
                }
            }
        });
    }

    fn origin(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Counters and every endpoint's products (`sku`, `id`, `qty`, `tiers`, `writes`) as
    /// JSON; the same document `GET /_sim/state` serves.
    pub fn state(&self) -> Value {
        self.inner.state_json()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ApiSimStats {
        self.inner.stats()
    }

    /// What an endpoint shows, as catalog items sorted by SKU (products never written
    /// are included with quantity 0 and no tiers).
    pub fn items(&self, endpoint: &str) -> Vec<Item> {
        let mut items: Vec<Item> = self.inner.with_ep(endpoint, |ep| {
            ep.products
                .values()
                .map(|p| Item {
                    sku: p.sku.clone(),
                    qty: p.qty,
                    tiers: p.tiers.clone(),
                })
                .collect()
        });
        items.sort_by(|a, b| a.sku.cmp(&b.sku));
        items
    }

    /// Set what `endpoint` shows for `sku` (an existing product) as a person editing the
    /// shop by hand would: no write is counted. Returns false if the product is unknown.
    pub fn edit_item(&self, endpoint: &str, sku: &str, qty: i64) -> bool {
        self.inner
            .with_ep(endpoint, |ep| match ep.products.get_mut(sku) {
                Some(p) => {
                    p.qty = qty;
                    true
                }
                None => false,
            })
    }

    /// A customer buys `qty` of `sku` at `endpoint` (no write is counted): the stock
    /// left, or why not (unknown product, fewer in stock).
    pub fn order(&self, endpoint: &str, sku: &str, qty: i64) -> Result<i64, String> {
        self.inner.order(endpoint, sku, qty)
    }

    /// Every token a login issued (to check that none leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.issued.lock().expect("tokens").clone()
    }

    /// How many writes were applied to `sku` at `endpoint`.
    pub fn writes_for(&self, endpoint: &str, sku: &str) -> u64 {
        self.inner
            .with_ep(endpoint, |ep| ep.products.get(sku).map_or(0, |p| p.writes))
    }

    /// The next `n` writes to `endpoint` are applied, then their connection is closed
    /// without a response.
    pub fn lose_next_writes(&self, endpoint: &str, n: u32) {
        self.inner.with_ep(endpoint, |ep| ep.lose_writes = n);
    }

    /// Every write of these SKUs at `endpoint` is refused (422 with a reason, or GraphQL
    /// `userErrors`), as a platform refuses a SKU it will not sell.
    pub fn refuse_skus(&self, endpoint: &str, skus: &[&str]) {
        self.inner.with_ep(endpoint, |ep| {
            ep.refuse_skus = skus.iter().map(|s| (*s).to_owned()).collect();
        });
    }

    /// Each request to `endpoint` (logins excepted) fails with probability `p`: half of
    /// them with a 503 before anything happens, half processed and then left without an
    /// answer (the connection closes: a write is applied but unconfirmed). Dice from a
    /// fixed seed.
    pub fn fail_requests(&self, endpoint: &str, p: f64) {
        self.inner
            .with_ep(endpoint, |ep| ep.fail_rate = p.clamp(0.0, 1.0));
    }

    /// Every token issued so far stops being accepted.
    pub fn expire_tokens(&self) {
        self.inner.tokens.lock().expect("tokens").clear();
    }

    /// The next `n` GraphQL requests to `endpoint` are answered 200 with a `THROTTLED`
    /// error (nothing applied).
    pub fn throttle_next(&self, endpoint: &str, n: u32) {
        self.inner.with_ep(endpoint, |ep| ep.throttle = n);
    }

    /// While `on`, logins succeed but no token is accepted.
    pub fn refuse_tokens(&self, on: bool) {
        self.inner.refuse_tokens.store(on, Ordering::SeqCst);
    }

    /// Give every product of `endpoint` a new id (cached ids go stale).
    pub fn renumber(&self, endpoint: &str) {
        let inner = &self.inner;
        inner.with_ep(endpoint, |ep| {
            ep.ids.clear();
            for p in ep.products.values_mut() {
                let n = inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
                p.id = if p.id.starts_with("gid:") {
                    format!("gid://sim/Product/{n}")
                } else {
                    format!("p-{n}")
                };
                p.variant = format!("v-{n}");
                p.inventory_item = format!("ii-{n}");
                for k in [&p.id, &p.variant, &p.inventory_item] {
                    ep.ids.insert(k.clone(), p.sku.clone());
                }
            }
        });
    }

    /// Stop the server (in-flight requests get at most 5 s).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
    }
}

impl Drop for ApiSimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Bind `addr` (port 0 for an ephemeral port) and serve in a background task.
pub async fn start(config: ApiSimConfig, addr: SocketAddr) -> std::io::Result<ApiSimHandle> {
    start_with(config, addr, None).await
}

/// Like [`start`], serving HTTPS when `tls` is set.
pub async fn start_with(
    config: ApiSimConfig,
    addr: SocketAddr,
    tls: Option<&crate::sim_tls::ServerTls>,
) -> std::io::Result<ApiSimHandle> {
    let acceptor = tls.map(|t| t.acceptor()).transpose()?;
    let inner = Arc::new(Inner {
        rng: Mutex::new(rand::SeedableRng::seed_from_u64(0x05ee_db01)),
        config,
        endpoints: Mutex::new(HashMap::new()),
        tokens: Mutex::new(HashMap::new()),
        issued: Mutex::new(Vec::new()),
        refuse_tokens: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        counters: Counters::default(),
    });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let app = router(inner.clone());
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let server = tokio::spawn(crate::sim_tls::serve(listener, acceptor, app, stop_rx));
    tracing::info!(addr = %bound, scheme, "API simulator listening");
    Ok(ApiSimHandle {
        addr: bound,
        scheme,
        inner,
        stop: Some(stop_tx),
        server: Some(server),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(minor_to_amount(1234), "12.34");
        assert_eq!(minor_to_amount(5), "0.05");
        assert_eq!(amount_to_minor("12.34"), Some(1234));
        assert_eq!(amount_to_minor("0.05"), Some(5));
        assert_eq!(amount_to_minor("12.3"), None);
        assert_eq!(amount_to_minor("12"), None);
    }
}
