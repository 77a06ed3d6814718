//! A web-UI portal simulator for the [`webdriver`](crate::webdriver) adapter's tests and demo.
//!
//! One axum server on loopback serves any number of virtual portals under `/p/{portal}/`.
//! Each portal is a small server-rendered admin UI, driven by a real browser:
//!
//! * `GET  /p/{portal}/login` — a login form (`#login-form`, `#username`, `#password`,
//!   hidden CSRF token, `#login-submit`); `POST` checks the CSRF token and the credentials,
//!   sets the `bw_sid` session cookie and redirects to the dashboard (`#welcome`), or shows
//!   `#login-error`.
//! * `GET  /p/{portal}/upload` — a manifest upload form (`#upload-form`, file input
//!   `#manifest-file`, `#note`, `#upload-submit`). `POST` validates the CSV (header
//!   `sku,qty,price`; quantity a non-negative integer; price a non-negative decimal with
//!   at most two decimals) and either applies every row and shows `#upload-result`, or
//!   applies nothing and lists each bad row in `#upload-errors`.
//! * `GET  /p/{portal}/history` — the upload history, table `#history` (id, file name,
//!   note, rows, status `applied`/`rejected`).
//! * `GET  /p/{portal}/products` — the product listing, table `#products` (SKU, Quantity,
//!   Price, Note). Its rows are rendered by a script after the portal's `slow_ms` delay,
//!   like a single-page admin app, so a client must wait for them.
//! * `GET  /p/{portal}/products/{sku}/edit` — a per-product edit page whose stock fields
//!   (`#qty`, `#price`) sit in a hidden tab opened by `#tab-stock`; `#note` sits on the
//!   general tab; `#save` posts the form, which shows `.flash-success` or `.flash-error`.
//!   An unknown product answers 404 with `#not-found`. With [`WebPortal::numeric_ids`]
//!   the page is `/p/{portal}/products/{n}/edit`, `n` a number the portal gave the SKU
//!   (see [`WebSimHandle::renumber`]: old numbers then answer the not-found page).
//! * `GET  /p/{portal}/products/search?q=TEXT` — a search form (`#search-form`, `#q`,
//!   `#search-submit`) and the products whose SKU contains the text, table `#results`:
//!   one `tr.result[data-sku]` per product with the SKU (`td.sku`), the quantity and an
//!   edit link `a.edit` (`href="/p/{portal}/products/17/edit"`); `#no-results` when none.
//!
//! Fault profiles per portal ([`WebPortal`]): `slow_ms` (every page answers late and the
//! listing renders late), `logout_after` (a session is expired after that many
//! authenticated requests: the request is *not* processed and the browser is sent to the
//! login page), and bad rows are always rejected.
//!
//! The server records every upload (applied or rejected) for tests to assert on.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use rand::Rng;

/// A recipe for this simulator's manifest flow (login, upload form, product listing,
/// upload history). Secrets: `BULWARK_SIM_USER`, `BULWARK_SIM_PASS`.
pub const MANIFEST_RECIPE: &str = r##"name = "sim-manifest"
kind = "manifest"

login_marker = "#login-form"

[[login]]
action = "goto"
url = "{{base_url}}/login"
[[login]]
action = "fill"
selector = "#username"
secret = "BULWARK_SIM_USER"
[[login]]
action = "fill"
selector = "#password"
secret = "BULWARK_SIM_PASS"
[[login]]
action = "click"
selector = "#login-submit"
[[login]]
action = "expect_text"
selector = "#welcome"
text = "Signed in"
error_selector = "#login-error"

[[upload]]
action = "goto"
url = "{{base_url}}/upload"
[[upload]]
action = "upload_file"
selector = "#manifest-file"
[[upload]]
action = "fill"
selector = "#note"
value = "bulwark batch {{batch.index}} of snapshot {{batch.snapshot}}"
[[upload]]
action = "click"
selector = "#upload-submit"
[[upload]]
action = "expect_text"
selector = "#upload-result"
text = "accepted"
error_selector = "#upload-errors li"

[[verify]]
action = "goto"
url = "{{base_url}}/products"
[[verify]]
action = "wait_for"
selector = "#products tbody[data-loaded]"
[[verify]]
action = "read_table"
selector = "#products"
sku_column = "SKU"
qty_column = "Quantity"
price_column = "Price"

[[probe]]
action = "goto"
url = "{{base_url}}/history"
[[probe]]
action = "wait_for"
selector = "#history"

[probe_match]
rows = "#history tbody tr"
contains = ["{{batch.key}}", "applied"]
"##;

/// A recipe for this simulator's per-product edit pages (stock fields in a tab).
/// Secrets: `BULWARK_SIM_USER`, `BULWARK_SIM_PASS`.
pub const PER_ITEM_RECIPE: &str = r##"name = "sim-per-item"
kind = "per_item"

login_marker = "#login-form"

[[login]]
action = "goto"
url = "{{base_url}}/login"
[[login]]
action = "fill"
selector = "#username"
secret = "BULWARK_SIM_USER"
[[login]]
action = "fill"
selector = "#password"
secret = "BULWARK_SIM_PASS"
[[login]]
action = "click"
selector = "#login-submit"
[[login]]
action = "expect_text"
selector = "#welcome"
text = "Signed in"
error_selector = "#login-error"

[[upload]]
action = "for_each_item"
[[upload.steps]]
action = "goto"
url = "{{base_url}}/products/{{item.portal_sku}}/edit"
[[upload.steps]]
action = "fill"
selector = "#note"
value = "bulwark {{batch.key}}"
[[upload.steps]]
action = "click"
selector = "#tab-stock"
[[upload.steps]]
action = "fill"
selector = "#qty"
value = "{{item.qty}}"
[[upload.steps]]
action = "fill"
selector = "#price"
value = "{{item.price}}"
[[upload.steps]]
action = "click"
selector = "#save"
[[upload.steps]]
action = "expect_text"
selector = ".flash-success"
text = "Saved {{item.portal_sku}}"
error_selector = ".flash-error"

[[verify]]
action = "for_each_item"
[[verify.steps]]
action = "goto"
url = "{{base_url}}/products/{{item.portal_sku}}/edit"
[[verify.steps]]
action = "click"
selector = "#tab-stock"
[[verify.steps]]
action = "read_text"
selector = "#qty"
field = "qty"
[[verify.steps]]
action = "read_text"
selector = "#price"
field = "price"

[[probe]]
action = "goto"
url = "{{base_url}}/products"
[[probe]]
action = "wait_for"
selector = "#products tbody[data-loaded]"

[probe_match]
rows = "#products tbody tr"
contains = ["bulwark {{batch.key}}"]
"##;

/// A recipe for this simulator's portals with [`WebPortal::numeric_ids`]: each item's
/// edit-page number is looked up once on the search page (`[[lookup]]`, `capture`) and
/// cached; a renumbered item's old page shows `#not-found` (`not_found_marker`), so it
/// is looked up again. Secrets: `BULWARK_SIM_USER`, `BULWARK_SIM_PASS`.
pub const PER_ITEM_LOOKUP_RECIPE: &str = r##"name = "sim-per-item-lookup"
kind = "per_item"

login_marker = "#login-form"
not_found_marker = "#not-found"

[[login]]
action = "goto"
url = "{{base_url}}/login"
[[login]]
action = "fill"
selector = "#username"
secret = "BULWARK_SIM_USER"
[[login]]
action = "fill"
selector = "#password"
secret = "BULWARK_SIM_PASS"
[[login]]
action = "click"
selector = "#login-submit"
[[login]]
action = "expect_text"
selector = "#welcome"
text = "Signed in"
error_selector = "#login-error"

# Once per SKU whose number is not cached: search, take the number from the edit link.
[[lookup]]
action = "goto"
url = "{{base_url}}/products/search?q={{item.portal_sku | urlencode}}"
[[lookup]]
action = "wait_for"
selector = "#results"
[[lookup]]
action = "capture"
selector = "#results tr.result[data-sku=\"{{item.portal_sku}}\"] a.edit"
attribute = "href"
pattern = "/products/([0-9]+)/edit"
into = "id"
timeout_ms = 1000

[[upload]]
action = "for_each_item"
[[upload.steps]]
action = "goto"
url = "{{base_url}}/products/{{item.ids.id}}/edit"
[[upload.steps]]
action = "fill"
selector = "#note"
value = "bulwark {{batch.key}}"
[[upload.steps]]
action = "click"
selector = "#tab-stock"
[[upload.steps]]
action = "fill"
selector = "#qty"
value = "{{item.qty}}"
[[upload.steps]]
action = "fill"
selector = "#price"
value = "{{item.price}}"
[[upload.steps]]
action = "click"
selector = "#save"
[[upload.steps]]
action = "expect_text"
selector = ".flash-success"
text = "Saved {{item.portal_sku}}"
error_selector = ".flash-error"

[[verify]]
action = "for_each_item"
[[verify.steps]]
action = "goto"
url = "{{base_url}}/products/{{item.ids.id}}/edit"
[[verify.steps]]
action = "click"
selector = "#tab-stock"
[[verify.steps]]
action = "read_text"
selector = "#qty"
field = "qty"
[[verify.steps]]
action = "read_text"
selector = "#price"
field = "price"

[[probe]]
action = "goto"
url = "{{base_url}}/products"
[[probe]]
action = "wait_for"
selector = "#products tbody[data-loaded]"

[probe_match]
rows = "#products tbody tr"
contains = ["bulwark {{batch.key}}"]
"##;

/// One simulated portal's configuration.
#[derive(Debug, Clone)]
pub struct WebPortal {
    /// Portal id (the `{portal}` path segment).
    pub id: String,
    /// Accepted user name.
    pub username: String,
    /// Accepted password.
    pub password: String,
    /// Delay before every page answers, and before the listing renders its rows.
    pub slow_ms: u64,
    /// Expire a session after this many authenticated requests.
    pub logout_after: Option<u32>,
    /// Products that exist up front (SKU, quantity, price in cents). Manifest uploads
    /// create unknown SKUs; the per-product edit page only exists for known ones.
    pub products: Vec<(String, i64, i64)>,
    /// Address edit pages by a number the portal gives each product
    /// (`/products/{n}/edit`) instead of by SKU; clients find it on the search page.
    pub numeric_ids: bool,
}

impl WebPortal {
    /// A fast, well-behaved portal with the given credentials and no products.
    pub fn new(id: &str, username: &str, password: &str) -> Self {
        Self {
            id: id.into(),
            username: username.into(),
            password: password.into(),
            slow_ms: 0,
            logout_after: None,
            products: Vec::new(),
            numeric_ids: false,
        }
    }
}

/// A product as the portal shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    /// Units in stock.
    pub qty: i64,
    /// Price in cents.
    pub price_minor: i64,
    /// Free-text note (set on the edit page).
    pub note: String,
}

/// One upload attempt as recorded by the portal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// Portal-assigned id (`u-1`, ...).
    pub id: String,
    /// The uploaded file's name.
    pub file_name: String,
    /// The note field.
    pub note: String,
    /// Data rows in the file.
    pub rows: usize,
    /// Whether the rows were applied (`false`: rejected, nothing applied).
    pub applied: bool,
}

#[derive(Default)]
struct PortalState {
    products: HashMap<String, Product>,
    uploads: Vec<UploadRecord>,
    /// session id → (authenticated requests served, CSRF token).
    sessions: HashMap<String, (u32, String)>,
    login_csrf: HashSet<String>,
    logins: u32,
    expirations: u32,
    saves: u32,
    /// With numeric ids: SKU → its edit-page number.
    numbers: HashMap<String, u64>,
    next_number: u64,
    /// Search pages served with a query.
    searches: u32,
    /// Edit pages (and saves) answered "not found".
    not_found: u32,
}

/// First number a portal with numeric ids gives a product.
const FIRST_NUMBER: u64 = 101;

impl PortalState {
    /// Give `sku` a number if the portal uses numbers and it has none.
    fn number(&mut self, numeric: bool, sku: &str) {
        if numeric && !self.numbers.contains_key(sku) {
            self.next_number = self.next_number.max(FIRST_NUMBER);
            self.numbers.insert(sku.to_owned(), self.next_number);
            self.next_number += 1;
        }
    }

    /// The path segment of `sku`'s edit page.
    fn edit_key(&self, sku: &str) -> String {
        self.numbers
            .get(sku)
            .map_or_else(|| sku.to_owned(), u64::to_string)
    }

    /// The SKU an edit-page path segment names (a number with numeric ids, else the
    /// SKU), if the product exists.
    fn resolve(&self, numeric: bool, key: &str) -> Option<String> {
        if numeric {
            let n: u64 = key.parse().ok()?;
            self.numbers
                .iter()
                .find(|(_, v)| **v == n)
                .map(|(sku, _)| sku.clone())
        } else {
            self.products.contains_key(key).then(|| key.to_owned())
        }
    }
}

struct Inner {
    portals: HashMap<String, WebPortal>,
    state: Mutex<HashMap<String, PortalState>>,
}

type Shared = Arc<Inner>;

/// A running web-UI simulator; dropping it does not stop the server (use [`WebSimHandle::stop`]).
pub struct WebSimHandle {
    addr: SocketAddr,
    inner: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl WebSimHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL of one portal, e.g. `http://127.0.0.1:1234/p/acme`.
    pub fn base_url(&self, portal: &str) -> String {
        format!("http://{}/p/{portal}", self.addr)
    }

    /// Every upload attempt the portal received, oldest first.
    pub fn uploads(&self, portal: &str) -> Vec<UploadRecord> {
        self.with(portal, |p| p.uploads.clone())
    }

    /// The portal's current products.
    pub fn products(&self, portal: &str) -> HashMap<String, Product> {
        self.with(portal, |p| p.products.clone())
    }

    /// Successful logins so far.
    pub fn logins(&self, portal: &str) -> u32 {
        self.with(portal, |p| p.logins)
    }

    /// Sessions the portal expired so far.
    pub fn expirations(&self, portal: &str) -> u32 {
        self.with(portal, |p| p.expirations)
    }

    /// Successful per-product saves so far.
    pub fn saves(&self, portal: &str) -> u32 {
        self.with(portal, |p| p.saves)
    }

    /// Search pages served with a query so far (lookups).
    pub fn searches(&self, portal: &str) -> u32 {
        self.with(portal, |p| p.searches)
    }

    /// Edit pages (and saves) answered "not found" so far.
    pub fn not_found(&self, portal: &str) -> u32 {
        self.with(portal, |p| p.not_found)
    }

    /// With numeric ids: every product's edit-page number, by SKU.
    pub fn numbers(&self, portal: &str) -> HashMap<String, u64> {
        self.with(portal, |p| p.numbers.clone())
    }

    /// Give each of `skus` a new number (a portal migration): its old edit page then
    /// answers "not found". Unknown SKUs are ignored.
    pub fn renumber(&self, portal: &str, skus: &[&str]) {
        let mut guard = self.inner.state.lock().expect("sim state");
        let ps = guard.get_mut(portal).expect("known portal");
        for sku in skus {
            if ps.numbers.contains_key(*sku) {
                ps.numbers.remove(*sku);
                ps.number(true, sku);
            }
        }
    }

    fn with<T>(&self, portal: &str, f: impl FnOnce(&PortalState) -> T) -> T {
        let guard = self.inner.state.lock().expect("sim state");
        f(guard.get(portal).expect("known portal"))
    }

    /// Stop serving.
    pub fn stop(self) {
        self.task.abort();
    }
}

/// Start the simulator on `addr` (use port 0 for a free port) with `portals`.
pub async fn start(portals: Vec<WebPortal>, addr: SocketAddr) -> std::io::Result<WebSimHandle> {
    let mut state = HashMap::new();
    let mut map = HashMap::new();
    for p in portals {
        let mut ps = PortalState::default();
        for (sku, qty, price) in &p.products {
            ps.number(p.numeric_ids, sku);
            ps.products.insert(
                sku.clone(),
                Product {
                    qty: *qty,
                    price_minor: *price,
                    note: String::new(),
                },
            );
        }
        state.insert(p.id.clone(), ps);
        map.insert(p.id.clone(), p);
    }
    let inner = Arc::new(Inner {
        portals: map,
        state: Mutex::new(state),
    });
    let app = router(inner.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(WebSimHandle { addr, inner, task })
}

fn router(inner: Shared) -> Router {
    Router::new()
        .route("/p/{portal}/login", get(login_page).post(login_post))
        .route("/p/{portal}/logout", get(logout))
        .route("/p/{portal}/", get(dashboard))
        .route("/p/{portal}/upload", get(upload_page).post(upload_post))
        .route("/p/{portal}/history", get(history))
        .route("/p/{portal}/products", get(products))
        .route("/p/{portal}/products/search", get(search))
        .route(
            "/p/{portal}/products/{sku}/edit",
            get(edit_page).post(edit_post),
        )
        .with_state(inner)
}

fn token() -> String {
    let mut rng = rand::rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:0;padding-top:60px}}\
         .bar{{position:fixed;top:0;left:0;right:0;height:48px;background:#234;color:#fff;padding:8px}}\
         .bar a{{color:#fff;margin-right:12px}} .flash-error,.error{{color:#b00}} .flash-success{{color:#080}}\
         table{{border-collapse:collapse}} td,th{{border:1px solid #999;padding:2px 6px}}</style>\
         </head><body><div class=\"bar\">Simulated portal — {t}</div><main>{body}</main></body></html>",
        t = esc(title)
    ))
}

fn price_text(minor: i64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

fn parse_price(s: &str) -> Option<i64> {
    let s = s.trim();
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 2 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let frac: i64 = format!("{frac:0<2}").parse().ok()?;
    whole.checked_mul(100)?.checked_add(frac)
}

fn parse_qty(s: &str) -> Option<i64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn cookie_sid(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == "bw_sid")
        .map(|(_, v)| v.to_owned())
}

enum Auth {
    Ok { csrf: String },
    Redirect(Response),
}

/// Slow down, then check the session; counts the request and expires the session when
/// the portal's `logout_after` is reached (the request is then not served).
async fn authed(inner: &Shared, portal: &str, headers: &HeaderMap) -> Result<Auth, StatusCode> {
    let cfg = inner.portals.get(portal).ok_or(StatusCode::NOT_FOUND)?;
    if cfg.slow_ms > 0 {
        tokio::time::sleep(Duration::from_millis(cfg.slow_ms)).await;
    }
    let login = |expired: bool| {
        let q = if expired { "?expired=1" } else { "" };
        Auth::Redirect(Redirect::to(&format!("/p/{portal}/login{q}")).into_response())
    };
    let Some(sid) = cookie_sid(headers) else {
        return Ok(login(false));
    };
    let mut guard = inner.state.lock().expect("sim state");
    let ps = guard.get_mut(portal).ok_or(StatusCode::NOT_FOUND)?;
    let Some((count, csrf)) = ps.sessions.get_mut(&sid) else {
        return Ok(login(false));
    };
    *count += 1;
    if cfg.logout_after.is_some_and(|n| *count > n) {
        ps.sessions.remove(&sid);
        ps.expirations += 1;
        return Ok(login(true));
    }
    Ok(Auth::Ok { csrf: csrf.clone() })
}

macro_rules! auth_or_return {
    ($inner:expr, $portal:expr, $headers:expr) => {
        match authed(&$inner, &$portal, &$headers).await {
            Err(code) => return code.into_response(),
            Ok(Auth::Redirect(r)) => return r,
            Ok(Auth::Ok { csrf }) => csrf,
        }
    };
}

fn login_form(portal: &str, csrf: &str, message: &str) -> Html<String> {
    page(
        "Sign in",
        &format!(
            "<h1>Sign in</h1>{message}<form id=\"login-form\" method=\"post\" action=\"/p/{p}/login\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>User <input id=\"username\" name=\"username\"></label>\
             <label>Password <input id=\"password\" name=\"password\" type=\"password\"></label>\
             <button id=\"login-submit\" type=\"submit\">Sign in</button></form>",
            p = esc(portal)
        ),
    )
}

async fn login_page(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    query: axum::extract::RawQuery,
) -> Response {
    let csrf = token();
    {
        let mut guard = inner.state.lock().expect("sim state");
        let Some(ps) = guard.get_mut(&portal) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        ps.login_csrf.insert(csrf.clone());
    }
    let msg = if query.0.is_some_and(|q| q.contains("expired")) {
        "<p class=\"notice\" id=\"expired\">Your session has expired. Please sign in again.</p>"
    } else {
        ""
    };
    login_form(&portal, &csrf, msg).into_response()
}

async fn login_post(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(cfg) = inner.portals.get(&portal) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    let new_csrf = token();
    let mut guard = inner.state.lock().expect("sim state");
    let ps = guard.get_mut(&portal).expect("known portal");
    let csrf_ok = ps.login_csrf.remove(get("csrf"));
    ps.login_csrf.insert(new_csrf.clone());
    if !csrf_ok {
        return (
            StatusCode::FORBIDDEN,
            login_form(
                &portal,
                &new_csrf,
                "<p class=\"error\" id=\"login-error\">Invalid form token. Please try again.</p>",
            ),
        )
            .into_response();
    }
    if get("username") != cfg.username || get("password") != cfg.password {
        return login_form(
            &portal,
            &new_csrf,
            "<p class=\"error\" id=\"login-error\">Invalid username or password.</p>",
        )
        .into_response();
    }
    let sid = token();
    ps.sessions.insert(sid.clone(), (0, token()));
    ps.logins += 1;
    (
        [(
            header::SET_COOKIE,
            format!("bw_sid={sid}; Path=/p/{portal}; HttpOnly; SameSite=Lax"),
        )],
        Redirect::to(&format!("/p/{portal}/")),
    )
        .into_response()
}

async fn logout(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(sid) = cookie_sid(&headers) {
        let mut guard = inner.state.lock().expect("sim state");
        if let Some(ps) = guard.get_mut(&portal) {
            ps.sessions.remove(&sid);
        }
    }
    Redirect::to(&format!("/p/{portal}/login")).into_response()
}

async fn dashboard(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
) -> Response {
    let _ = auth_or_return!(inner, portal, headers);
    let user = &inner.portals[&portal].username;
    page(
        "Dashboard",
        &format!(
            "<p id=\"welcome\">Signed in as {u}</p><nav><a href=\"upload\">Upload</a> \
             <a href=\"history\">History</a> <a href=\"products\">Products</a> \
             <a href=\"logout\">Sign out</a></nav>",
            u = esc(user)
        ),
    )
    .into_response()
}

async fn upload_page(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
) -> Response {
    let csrf = auth_or_return!(inner, portal, headers);
    page("Upload", &upload_form(&portal, &csrf, "")).into_response()
}

fn upload_form(portal: &str, csrf: &str, message: &str) -> String {
    format!(
        "<h1>Upload inventory manifest</h1>{message}\
         <form id=\"upload-form\" method=\"post\" enctype=\"multipart/form-data\" action=\"/p/{p}/upload\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label>Manifest (CSV) <input id=\"manifest-file\" name=\"manifest\" type=\"file\" accept=\".csv\"></label>\
         <label>Note <input id=\"note\" name=\"note\"></label>\
         <button id=\"upload-submit\" type=\"submit\">Upload</button></form>",
        p = esc(portal)
    )
}

async fn upload_post(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> Response {
    let csrf = auth_or_return!(inner, portal, headers);
    let (mut form_csrf, mut note, mut file_name, mut content) =
        (String::new(), String::new(), String::new(), String::new());
    while let Ok(Some(field)) = multipart.next_field().await {
        let name = field.name().unwrap_or("").to_owned();
        if name == "manifest" {
            file_name = field.file_name().unwrap_or("").to_owned();
        }
        let text = field.text().await.unwrap_or_default();
        match name.as_str() {
            "csrf" => form_csrf = text,
            "note" => note = text,
            "manifest" => content = text,
            _ => {}
        }
    }
    if form_csrf != csrf {
        return (StatusCode::FORBIDDEN, "bad CSRF token").into_response();
    }
    let mut errors = Vec::new();
    let mut rows = Vec::new();
    let mut lines = content.lines().filter(|l| !l.trim().is_empty());
    let header_ok = lines
        .next()
        .map(|h| h.trim().to_ascii_lowercase().replace(' ', "") == "sku,qty,price")
        .unwrap_or(false);
    if file_name.is_empty() {
        errors.push("No file was selected.".to_owned());
    } else if !header_ok {
        errors.push("The header row must be: sku,qty,price".to_owned());
    } else {
        for (i, line) in lines.enumerate() {
            let row = i + 2;
            let cols: Vec<&str> = line.split(',').collect();
            if cols.len() != 3 {
                errors.push(format!(
                    "Row {row}: expected 3 columns, found {}",
                    cols.len()
                ));
                continue;
            }
            let sku = cols[0].trim();
            if sku.is_empty() {
                errors.push(format!("Row {row}: SKU is empty"));
                continue;
            }
            let Some(qty) = parse_qty(cols[1]) else {
                errors.push(format!(
                    "Row {row} ({sku}): quantity must be a non-negative integer, got \"{}\"",
                    cols[1].trim()
                ));
                continue;
            };
            let Some(price) = parse_price(cols[2]) else {
                errors.push(format!(
                    "Row {row} ({sku}): price must be a non-negative amount, got \"{}\"",
                    cols[2].trim()
                ));
                continue;
            };
            rows.push((sku.to_owned(), qty, price));
        }
    }
    let mut guard = inner.state.lock().expect("sim state");
    let ps = guard.get_mut(&portal).expect("known portal");
    let id = format!("u-{}", ps.uploads.len() + 1);
    let applied = errors.is_empty();
    ps.uploads.push(UploadRecord {
        id: id.clone(),
        file_name: file_name.clone(),
        note: note.clone(),
        rows: rows.len() + errors.len(),
        applied,
    });
    if applied {
        let numeric = inner.portals[&portal].numeric_ids;
        for (sku, qty, price) in &rows {
            ps.number(numeric, sku);
            let p = ps.products.entry(sku.clone()).or_insert(Product {
                qty: 0,
                price_minor: 0,
                note: String::new(),
            });
            p.qty = *qty;
            p.price_minor = *price;
        }
        let msg = format!(
            "<p class=\"flash-success\" id=\"upload-result\">Upload {id} accepted: {} rows applied from {}.</p>",
            rows.len(),
            esc(&file_name)
        );
        page("Upload", &upload_form(&portal, &csrf, &msg)).into_response()
    } else {
        let mut list = String::from(
            "<div class=\"flash-error\" id=\"upload-errors\"><p>Upload rejected; nothing was applied.</p><ul>",
        );
        for e in &errors {
            let _ = write!(list, "<li class=\"row-error\">{}</li>", esc(e));
        }
        list.push_str("</ul></div>");
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            page("Upload", &upload_form(&portal, &csrf, &list)),
        )
            .into_response()
    }
}

async fn history(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
) -> Response {
    let _ = auth_or_return!(inner, portal, headers);
    let guard = inner.state.lock().expect("sim state");
    let ps = &guard[&portal];
    let mut rows = String::new();
    for u in ps.uploads.iter().rev() {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&u.id),
            esc(&u.file_name),
            esc(&u.note),
            u.rows,
            if u.applied { "applied" } else { "rejected" }
        );
    }
    page(
        "Upload history",
        &format!(
            "<h1>Upload history</h1><table id=\"history\"><thead><tr><th>Id</th><th>File</th>\
             <th>Note</th><th>Rows</th><th>Status</th></tr></thead><tbody>{rows}</tbody></table>"
        ),
    )
    .into_response()
}

async fn products(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
) -> Response {
    let _ = auth_or_return!(inner, portal, headers);
    let delay = inner.portals[&portal].slow_ms;
    let guard = inner.state.lock().expect("sim state");
    let mut list: Vec<_> = guard[&portal].products.iter().collect();
    list.sort_by(|a, b| a.0.cmp(b.0));
    let data: Vec<[String; 4]> = list
        .into_iter()
        .map(|(sku, p)| {
            [
                sku.clone(),
                p.qty.to_string(),
                price_text(p.price_minor),
                p.note.clone(),
            ]
        })
        .collect();
    // Embedded as JSON inside a <script>: escape `<` so no data can close the tag.
    let json = serde_json::to_string(&data)
        .expect("strings serialise")
        .replace('<', "\\u003c");
    page(
        "Products",
        &format!(
            "<h1>Products</h1><p id=\"loading\">Loading…</p><table id=\"products\"><thead><tr>\
             <th>SKU</th><th>Quantity</th><th>Price</th><th>Note</th></tr></thead><tbody></tbody></table>\
             <script>setTimeout(function(){{var rows={json};var tb=document.querySelector('#products tbody');\
             rows.forEach(function(r){{var tr=document.createElement('tr');tr.className='product';\
             r.forEach(function(c){{var td=document.createElement('td');td.textContent=c;tr.appendChild(td);}});\
             tb.appendChild(tr);}});document.getElementById('loading').remove();\
             tb.setAttribute('data-loaded','1');}},{delay});</script>"
        ),
    )
    .into_response()
}

/// The edit page of `sku`, posted back to `/products/{key}/edit`.
fn edit_form(portal: &str, key: &str, sku: &str, p: &Product, csrf: &str, message: &str) -> String {
    format!(
        "<h1>Edit {s}</h1>{message}<div class=\"tabs\"><button type=\"button\" id=\"tab-general\" \
         onclick=\"document.getElementById('general-panel').style.display='block';document.getElementById('stock-panel').style.display='none'\">General</button>\
         <button type=\"button\" id=\"tab-stock\" \
         onclick=\"document.getElementById('general-panel').style.display='none';document.getElementById('stock-panel').style.display='block'\">Stock &amp; price</button></div>\
         <form id=\"edit-form\" method=\"post\" action=\"/p/{po}/products/{k}/edit\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <div id=\"general-panel\"><label>Note <input id=\"note\" name=\"note\" value=\"{note}\"></label></div>\
         <div id=\"stock-panel\" style=\"display:none\"><label>Quantity <input id=\"qty\" name=\"qty\" value=\"{qty}\"></label>\
         <label>Price <input id=\"price\" name=\"price\" value=\"{price}\"></label></div>\
         <button id=\"save\" type=\"submit\">Save</button></form>",
        s = esc(sku),
        k = esc(key),
        po = esc(portal),
        note = esc(&p.note),
        qty = p.qty,
        price = price_text(p.price_minor),
    )
}

fn not_found_page() -> Response {
    (
        StatusCode::NOT_FOUND,
        page(
            "Not found",
            "<p class=\"flash-error\" id=\"not-found\">No such product.</p>",
        ),
    )
        .into_response()
}

async fn edit_page(
    State(inner): State<Shared>,
    Path((portal, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let csrf = auth_or_return!(inner, portal, headers);
    let numeric = inner.portals[&portal].numeric_ids;
    let mut guard = inner.state.lock().expect("sim state");
    let ps = guard.get_mut(&portal).expect("known portal");
    let found = ps
        .resolve(numeric, &key)
        .and_then(|sku| ps.products.get(&sku).map(|p| (sku, p.clone())));
    match found {
        None => {
            ps.not_found += 1;
            not_found_page()
        }
        Some((sku, p)) => {
            page("Edit", &edit_form(&portal, &key, &sku, &p, &csrf, "")).into_response()
        }
    }
}

async fn edit_post(
    State(inner): State<Shared>,
    Path((portal, key)): Path<(String, String)>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let csrf = auth_or_return!(inner, portal, headers);
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if get("csrf") != csrf {
        return (StatusCode::FORBIDDEN, "bad CSRF token").into_response();
    }
    let numeric = inner.portals[&portal].numeric_ids;
    let mut guard = inner.state.lock().expect("sim state");
    let ps = guard.get_mut(&portal).expect("known portal");
    let Some((sku, current)) = ps
        .resolve(numeric, &key)
        .and_then(|sku| ps.products.get(&sku).map(|p| (sku, p.clone())))
    else {
        ps.not_found += 1;
        return not_found_page();
    };
    let (qty, price) = (parse_qty(get("qty")), parse_price(get("price")));
    let error = match (qty, price) {
        (None, _) => Some("Quantity must be a non-negative integer."),
        (_, None) => Some("Price must be a non-negative amount."),
        _ => None,
    };
    if let Some(e) = error {
        let msg = format!("<p class=\"flash-error\">{e}</p>");
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            page(
                "Edit",
                &edit_form(&portal, &key, &sku, &current, &csrf, &msg),
            ),
        )
            .into_response();
    }
    let p = ps.products.get_mut(&sku).expect("checked");
    p.qty = qty.expect("checked");
    p.price_minor = price.expect("checked");
    p.note = get("note").to_owned();
    ps.saves += 1;
    let p = p.clone();
    let msg = format!("<p class=\"flash-success\">Saved {}.</p>", esc(&sku));
    page("Edit", &edit_form(&portal, &key, &sku, &p, &csrf, &msg)).into_response()
}

/// Most rows a search answers.
const MAX_RESULTS: usize = 20;

async fn search(
    State(inner): State<Shared>,
    Path(portal): Path<String>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let _ = auth_or_return!(inner, portal, headers);
    let q = query
        .get("q")
        .map(|q| q.trim().to_owned())
        .unwrap_or_default();
    let mut guard = inner.state.lock().expect("sim state");
    let ps = guard.get_mut(&portal).expect("known portal");
    let mut rows = String::new();
    if !q.is_empty() {
        ps.searches += 1;
        let needle = q.to_lowercase();
        let mut hits: Vec<(&String, &Product)> = ps
            .products
            .iter()
            .filter(|(sku, _)| sku.to_lowercase().contains(&needle))
            .collect();
        hits.sort_by(|a, b| a.0.cmp(b.0));
        for (sku, p) in hits.into_iter().take(MAX_RESULTS) {
            let _ = write!(
                rows,
                "<tr class=\"result\" data-sku=\"{s}\"><td class=\"sku\">{s}</td><td>{qty}</td>\
                 <td><a class=\"edit\" href=\"/p/{po}/products/{k}/edit\">Edit</a></td></tr>",
                s = esc(sku),
                qty = p.qty,
                po = esc(&portal),
                k = esc(&ps.edit_key(sku)),
            );
        }
    }
    let empty = if rows.is_empty() && !q.is_empty() {
        "<p id=\"no-results\">No products match.</p>"
    } else {
        ""
    };
    page(
        "Search",
        &format!(
            "<h1>Find a product</h1><form id=\"search-form\" method=\"get\" action=\"/p/{po}/products/search\">\
             <input id=\"q\" name=\"q\" value=\"{q}\"><button id=\"search-submit\" type=\"submit\">Search</button></form>\
             <table id=\"results\"><thead><tr><th>SKU</th><th>Quantity</th><th></th></tr></thead>\
             <tbody>{rows}</tbody></table>{empty}",
            po = esc(&portal),
            q = esc(&q),
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_recipes_are_valid() {
        for text in [MANIFEST_RECIPE, PER_ITEM_RECIPE, PER_ITEM_LOOKUP_RECIPE] {
            crate::webdriver::Recipe::from_toml(text).unwrap();
        }
    }

    #[test]
    fn prices_parse_and_print() {
        assert_eq!(parse_price("12.3"), Some(1230));
        assert_eq!(parse_price("0.05"), Some(5));
        assert_eq!(parse_price("7"), Some(700));
        assert_eq!(parse_price("-1.00"), None);
        assert_eq!(parse_price("1.234"), None);
        assert_eq!(price_text(1205), "12.05");
        assert_eq!(parse_qty("-3"), None);
        assert_eq!(parse_qty("42"), Some(42));
    }
}
