//! The recipe-driven browser adapter (`"webdriver"`): headless Chromium over WebDriver
//! (thirtyfour + chromedriver) for portals that only have a web UI.
//!
//! An endpoint's [`EndpointConfig::settings`]:
//!
//! | key               | required | meaning                                                     |
//! |-------------------|----------|-------------------------------------------------------------|
//! | `recipe`          | yes      | path of the portal's recipe (TOML, see [`Recipe`])          |
//! | `base_url`        | yes      | the portal's base URL, `{{base_url}}` in templates          |
//! | `sku_prefix`      | no       | prepended to the SKU to form `{{item.portal_sku}}`          |
//! | `step_timeout_ms` | no       | per-step timeout (default 10000)                            |
//! | `deadline_ms`     | no       | deadline of one adapter call (default 300000)               |
//! | `artifacts_dir`   | no       | where failure screenshots and HTML go (default `bulwark-data/artifacts`) |
//! | `portal`          | no       | pool key: sessions are reused across endpoints with the same key while logged in (default: `base_url` + recipe name) |
//!
//! Error classes: a validation message shown by the portal (`expect_text`'s
//! `error_selector`) → [`AdapterError::Rejected`] (during login → [`AdapterError::Auth`]);
//! a `wait_for`/`expect_text` timeout, a deadline, or a browser/WebDriver failure →
//! [`AdapterError::Transient`] (the session is recycled); an element step (`fill`, `click`,
//! `upload_file`, `read_*`) whose selector matches nothing within the step timeout, a
//! template error or a missing secret → [`AdapterError::Config`] (the recipe does not fit
//! the page; waiting for slow content is what `wait_for` is for). Every failure but a
//! session expiry saves a screenshot and the page HTML and names both in the error.
//! A session that finds itself on the login page (the recipe's `login_marker`) logs in
//! again and re-runs the phase; a re-run upload first probes for the key.
//!
//! Portals that address records by their own ids: the recipe's `lookup` steps find an
//! item's ids (`capture`) once, and an [`IdCache`] keeps them under
//! (`webdriver:<recipe name>`, endpoint, SKU); later calls read the cache and load no
//! lookup page. A SKU the lookup cannot find is refused alone
//! ([`AdapterError::Partial`] with the item rejected: the sync quarantines it and the rest
//! lands); a page showing the recipe's `not_found_marker` with cached ids forgets them and
//! looks the item up again, once.
//!
//! See `docs/webdriver.md` for the recipe language and a full example.

mod pool;
mod reaper;
mod recipe;
mod session;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bulwark_workflows::adapter::{
    AdapterError, AdapterFactory, AdapterResult, EndpointConfig, ItemRejection, PortalAdapter,
    ReadBack, Receipt, Verification,
};
use bulwark_workflows::catalog::Batch;
use uuid::Uuid;

pub use pool::{PoolConfig, PoolStats, WebDriverPool};
pub use recipe::{
    Column, Field, ManifestSpec, PortalKind, ProbeMatch, Recipe, Step, parse_price, price_text,
};

use crate::http::{IdCache, MemoryIdCache};
use recipe::{BatchCtx, Ctx, Ids, Observed};
use session::{Env, Fail, ItemState, Runner, capture, redact};

/// Default per-step timeout.
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 10_000;
/// Default deadline of one adapter call (one upload, verify or probe of one endpoint).
pub const DEFAULT_DEADLINE_MS: u64 = 300_000;
/// Default artifacts directory.
pub const DEFAULT_ARTIFACTS_DIR: &str = "bulwark-data/artifacts";
/// Re-logins tolerated within one adapter call.
const MAX_RELOGINS: usize = 3;

/// Where fill steps' secrets come from. Values never reach errors, logs or saved pages.
pub trait Secrets: Send + Sync + std::fmt::Debug {
    /// The value of secret `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// Secrets from environment variables (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSecrets;

impl Secrets for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Secrets from a map (tests, embedding programs with their own vault).
#[derive(Clone, Default)]
pub struct MapSecrets(pub HashMap<String, String>);

impl std::fmt::Debug for MapSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapSecrets")
            .field("names", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets for MapSecrets {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// A registry factory for `"webdriver"`: every adapter it builds shares `pool` and reads
/// secrets from `secrets`. Recipes are loaded (and checked) once per path. Ids found by
/// recipes' lookups are kept in memory, for the factory's lifetime (see
/// [`factory_with_cache`] to keep them in Bulwark's database).
pub fn factory(pool: WebDriverPool, secrets: Arc<dyn Secrets>) -> AdapterFactory {
    factory_with_cache(pool, secrets, Arc::new(MemoryIdCache::new()))
}

/// Like [`factory`], with lookup ids kept in `ids` (e.g. the
/// [`SqliteIdCache`](crate::http::SqliteIdCache) or [`PgIdCache`](crate::http::PgIdCache)
/// the `http` adapter uses: a restart then looks nothing up again).
pub fn factory_with_cache(
    pool: WebDriverPool,
    secrets: Arc<dyn Secrets>,
    ids: Arc<dyn IdCache>,
) -> AdapterFactory {
    let cache: Arc<Mutex<HashMap<PathBuf, Arc<Recipe>>>> = Arc::default();
    Arc::new(move |config: &EndpointConfig| {
        let path = PathBuf::from(config.settings.get("recipe").ok_or_else(|| {
            AdapterError::Config(format!(
                "endpoint {}: setting `recipe` is required",
                config.id
            ))
        })?);
        let recipe = {
            let mut c = cache.lock().expect("recipe cache");
            match c.get(&path) {
                Some(r) => r.clone(),
                None => {
                    let r = Arc::new(Recipe::load(&path).map_err(|e| match e {
                        AdapterError::Config(m) => {
                            AdapterError::Config(format!("endpoint {}: {m}", config.id))
                        }
                        other => other,
                    })?);
                    c.insert(path, r.clone());
                    r
                }
            }
        };
        let adapter = WebDriverAdapter::new(config, recipe, pool.clone(), secrets.clone())?
            .with_id_cache(ids.clone());
        Ok(Arc::new(adapter) as Arc<dyn PortalAdapter>)
    })
}

/// A [`PortalAdapter`] driving a portal's web UI with a [`Recipe`] (see the
/// [module docs](self)).
pub struct WebDriverAdapter {
    endpoint: String,
    base_url: String,
    portal: String,
    sku_prefix: String,
    step_timeout: Duration,
    deadline: Duration,
    artifacts: PathBuf,
    recipe: Arc<Recipe>,
    pool: WebDriverPool,
    secrets: Arc<dyn Secrets>,
    /// Batches this adapter uploaded, by key: lets a per-item probe re-read values.
    recent: Mutex<HashMap<Uuid, Batch>>,
    /// Where the recipe's lookups keep the ids they found.
    ids: Arc<dyn IdCache>,
}

impl std::fmt::Debug for WebDriverAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebDriverAdapter")
            .field("endpoint", &self.endpoint)
            .field("base_url", &self.base_url)
            .field("recipe", &self.recipe.name)
            .finish()
    }
}

/// What survives a re-login within one call: where a per-item loop stopped and what
/// verify had read so far.
#[derive(Default)]
struct PhaseState {
    resume: Option<(usize, usize)>,
    observed: Observed,
    items: ItemState,
}

enum Op<'a> {
    Upload(&'a Batch),
    Verify(&'a Batch),
    ReadBack(&'a Batch),
    Probe(Uuid),
}

enum Out {
    Receipt(Receipt),
    Verification(Verification),
    ReadBack(ReadBack),
    Probe(Option<Receipt>),
}

fn ms_setting(config: &EndpointConfig, key: &str, default: u64) -> AdapterResult<Duration> {
    match config.settings.get(key) {
        None => Ok(Duration::from_millis(default)),
        Some(s) => match s.trim().parse::<u64>() {
            Ok(v) if v > 0 => Ok(Duration::from_millis(v)),
            _ => Err(AdapterError::Config(format!(
                "endpoint {}: `{key}` must be a positive integer, got {s:?}",
                config.id
            ))),
        },
    }
}

impl WebDriverAdapter {
    /// Build an adapter for `config` with an already loaded recipe.
    pub fn new(
        config: &EndpointConfig,
        recipe: Arc<Recipe>,
        pool: WebDriverPool,
        secrets: Arc<dyn Secrets>,
    ) -> AdapterResult<Self> {
        recipe.validate()?;
        let s = &config.settings;
        let base_url = s
            .get("base_url")
            .ok_or_else(|| {
                AdapterError::Config(format!(
                    "endpoint {}: setting `base_url` is required",
                    config.id
                ))
            })?
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            endpoint: config.id.clone(),
            portal: s
                .get("portal")
                .cloned()
                .unwrap_or_else(|| format!("{base_url}|{}", recipe.name)),
            base_url,
            sku_prefix: s.get("sku_prefix").cloned().unwrap_or_default(),
            step_timeout: ms_setting(config, "step_timeout_ms", DEFAULT_STEP_TIMEOUT_MS)?,
            deadline: ms_setting(config, "deadline_ms", DEFAULT_DEADLINE_MS)?,
            artifacts: PathBuf::from(
                s.get("artifacts_dir")
                    .map(String::as_str)
                    .unwrap_or(DEFAULT_ARTIFACTS_DIR),
            ),
            recipe,
            pool,
            secrets,
            recent: Mutex::default(),
            ids: Arc::new(MemoryIdCache::new()),
        })
    }

    /// Keep the ids the recipe's lookups find in `ids` (default: in memory, per adapter).
    pub fn with_id_cache(mut self, ids: Arc<dyn IdCache>) -> Self {
        self.ids = ids;
        self
    }

    /// The cache's profile key: ids of different recipes (and of the `http` adapter's
    /// profiles) never mix.
    fn cache_profile(&self) -> String {
        format!("webdriver:{}", self.recipe.name)
    }

    /// Read the cached ids of `batch`'s items not read yet in this call.
    async fn load_ids(&self, batch: &Batch, items: &mut ItemState) -> AdapterResult<()> {
        if self.recipe.lookup.is_empty() {
            return Ok(());
        }
        let skus: Vec<String> = batch
            .items
            .iter()
            .map(|i| i.sku.clone())
            .filter(|s| !items.read.contains(s) && !items.ids.contains_key(s))
            .collect();
        if skus.is_empty() {
            return Ok(());
        }
        let found = self
            .ids
            .get_many(&self.cache_profile(), &self.endpoint, &skus)
            .await
            .map_err(|e| AdapterError::Transient(format!("endpoint {}: {e}", self.endpoint)))?;
        for (sku, stored) in found {
            if let Some(ids) = self.decode_ids(&stored) {
                items.cached.insert(sku.clone());
                items.ids.insert(sku, ids);
            }
        }
        items.read.extend(skus);
        Ok(())
    }

    /// Write what the call's lookups learned to the cache. A failure only costs lookups
    /// next time, so it is logged, not returned.
    async fn save_ids(&self, items: &mut ItemState) {
        let profile = self.cache_profile();
        for sku in std::mem::take(&mut items.forget) {
            if let Err(e) = self.ids.invalidate(&profile, &self.endpoint, &sku).await {
                tracing::warn!(endpoint = %self.endpoint, sku, error = %e, "cannot forget a stale portal id");
            }
        }
        let store: Vec<(String, String)> = std::mem::take(&mut items.store)
            .into_iter()
            .map(|(sku, ids)| (sku, self.encode_ids(&ids)))
            .collect();
        if !store.is_empty()
            && let Err(e) = self.ids.put_many(&profile, &self.endpoint, &store).await
        {
            tracing::warn!(endpoint = %self.endpoint, error = %e, "cannot cache portal ids");
        }
    }

    /// Cached form of an item's ids: the bare value when the lookup captures only `id`,
    /// else a JSON object.
    fn encode_ids(&self, ids: &Ids) -> String {
        if self.recipe.lookup_ids() == ["id"] {
            return ids.get("id").cloned().unwrap_or_default();
        }
        serde_json::to_string(ids).unwrap_or_default()
    }

    fn decode_ids(&self, stored: &str) -> Option<Ids> {
        let names = self.recipe.lookup_ids();
        if names == ["id"] {
            return Some(Ids::from([("id".to_owned(), stored.to_owned())]));
        }
        let ids: Ids = serde_json::from_str(stored).ok()?;
        // A recipe that now captures more ids looks the SKU up again.
        names.iter().all(|n| ids.contains_key(*n)).then_some(ids)
    }

    /// The items a call refused, as an adapter error carrying every other item as done.
    fn refusals(&self, batch: &Batch, items: &ItemState) -> Option<AdapterError> {
        if items.refused.is_empty() {
            return None;
        }
        let secrets = self.secret_values();
        let head = format!("endpoint {} (recipe {:?})", self.endpoint, self.recipe.name);
        let rejected: Vec<ItemRejection> = items
            .refused
            .iter()
            .map(|r| ItemRejection {
                sku: r.sku.clone(),
                message: redact(&format!("{head}: {}", r.message), &secrets),
                kept: false,
            })
            .collect();
        let done = batch
            .items
            .iter()
            .filter(|i| !items.refused.iter().any(|r| r.sku == i.sku))
            .map(|i| i.sku.clone())
            .collect();
        Some(AdapterError::partial(done, rejected, None))
    }

    /// Values of every secret the recipe references (for redaction).
    fn secret_values(&self) -> Vec<String> {
        let mut names = Vec::new();
        fn walk<'a>(steps: &'a [Step], out: &mut Vec<&'a str>) {
            for s in steps {
                match s {
                    Step::Fill {
                        secret: Some(n), ..
                    } => out.push(n),
                    Step::ForEachItem { steps } => walk(steps, out),
                    _ => {}
                }
            }
        }
        let r = &self.recipe;
        for steps in [&r.login, &r.upload, &r.verify, &r.probe, &r.lookup] {
            walk(steps, &mut names);
        }
        names
            .into_iter()
            .filter_map(|n| self.secrets.get(n))
            .collect()
    }

    fn ctx(&self, batch: Option<BatchCtx>) -> Ctx {
        Ctx {
            base_url: self.base_url.clone(),
            endpoint: self.endpoint.clone(),
            batch,
            item: None,
        }
    }

    /// Turn a step failure into an adapter error, saving a screenshot and the page.
    async fn fail(&self, s: &pool::Session, phase: &str, fail: Fail) -> AdapterError {
        if let Fail::Fenced { at, message } = fail {
            // Nothing went wrong on the page: no screenshot, no warning per step.
            return AdapterError::Fenced(format!("endpoint {}: {at}: {message}", self.endpoint));
        }
        let secrets = self.secret_values();
        let label = format!("{}-{phase}", self.endpoint);
        let (png, html) = capture(s, &self.artifacts, &label, &secrets).await;
        let saved = format!(
            "; screenshot: {}; page: {}",
            png.as_deref()
                .map_or("(not saved)".into(), |p| p.display().to_string()),
            html.as_deref()
                .map_or("(not saved)".into(), |p| p.display().to_string())
        );
        let head = format!("endpoint {} (recipe {:?})", self.endpoint, self.recipe.name);
        let msg = |body: String| redact(&format!("{head}: {body}{saved}"), &secrets);
        let err = match fail {
            Fail::NeedLogin => AdapterError::Transient(msg("session expired".into())),
            Fail::Rejected { at, message } if phase == "login" => AdapterError::Auth(msg(format!(
                "{at}: the portal refused the login: {message}"
            ))),
            Fail::Rejected { at, message } => {
                AdapterError::Rejected(msg(format!("{at}: the portal says: {message}")))
            }
            Fail::NotFound { at, selector } => AdapterError::Config(msg(format!(
                "{at}: selector {selector:?} matched nothing within {} ms",
                self.step_timeout.as_millis()
            ))),
            Fail::Timeout { at, what } => AdapterError::Transient(msg(format!("{at}: {what}"))),
            Fail::Driver { at, message } => {
                AdapterError::Transient(msg(format!("{at}: browser error: {message}")))
            }
            Fail::Config { at, message } => AdapterError::Config(msg(format!("{at}: {message}"))),
            Fail::Fenced { at, message } => AdapterError::Fenced(format!("{at}: {message}")),
            // Handled per item inside loops; outside one the page itself is missing.
            Fail::NotFoundPage { at, marker } => AdapterError::Rejected(msg(format!(
                "{at}: the portal shows its not-found page ({marker:?})"
            ))),
            Fail::UnknownItem { at, message } => {
                AdapterError::Rejected(msg(format!("{at}: {message}")))
            }
        };
        tracing::warn!(endpoint = %self.endpoint, error = %err, "webdriver step failed");
        err
    }

    fn runner<'a>(&'a self, s: &'a mut pool::Session, manifest: Option<&'a Path>) -> Runner<'a> {
        Runner::new(
            s,
            Env {
                login_marker: &self.recipe.login_marker,
                step_timeout: self.step_timeout,
                sku_prefix: &self.sku_prefix,
                secrets: self.secrets.as_ref(),
                manifest,
                lookup: &self.recipe.lookup,
                not_found_marker: self.recipe.not_found_marker.as_deref(),
            },
        )
    }

    async fn login(&self, s: &mut pool::Session) -> AdapterResult<()> {
        s.logged_in.retain(|p| *p != self.portal);
        s.secret_fields.clear();
        let ctx = self.ctx(None);
        let mut r = self.runner(s, None);
        r.watch_login = false;
        let res = r.run("login", &self.recipe.login, &ctx, &[]).await;
        match res {
            Ok(()) => {
                s.logged_in.push(self.portal.clone());
                tracing::debug!(endpoint = %self.endpoint, "logged in");
                Ok(())
            }
            Err(f) => Err(self.fail(s, "login", f).await),
        }
    }

    /// Run one operation, logging in first when needed and again after an expiry.
    async fn drive(&self, s: &mut pool::Session, op: &Op<'_>) -> AdapterResult<Out> {
        let mut expired = 0;
        let mut st = PhaseState::default();
        let res = self.drive_phases(s, op, &mut expired, &mut st).await;
        self.save_ids(&mut st.items).await;
        if st.items.lookups > 0 {
            tracing::debug!(endpoint = %self.endpoint, lookups = st.items.lookups, "portal ids looked up");
        }
        if let (Ok(Out::Receipt(_)), Op::Upload(b)) = (&res, op)
            && let Some(e) = self.refusals(b, &st.items)
        {
            return Err(e);
        }
        res
    }

    async fn drive_phases(
        &self,
        s: &mut pool::Session,
        op: &Op<'_>,
        expired: &mut usize,
        st: &mut PhaseState,
    ) -> AdapterResult<Out> {
        match op {
            Op::Upload(b) | Op::Verify(b) | Op::ReadBack(b) => {
                self.load_ids(b, &mut st.items).await?;
            }
            Op::Probe(key) => {
                if let Some(b) = self.recent_batch(*key) {
                    self.load_ids(&b, &mut st.items).await?;
                }
            }
        }
        loop {
            if !s.logged_in.contains(&self.portal) {
                self.login(s).await?;
            }
            let (phase, res) = match op {
                Op::Upload(b) => {
                    // After an expiry mid-upload the file may have landed: look first.
                    if *expired > 0
                        && self.recipe.kind == PortalKind::Manifest
                        && self.recipe.probe_match.is_some()
                    {
                        match self.probe_steps(s, b.key).await {
                            Ok(Some(r)) => return Ok(Out::Receipt(r)),
                            Ok(None) => {}
                            Err(Fail::NeedLogin) => {
                                *expired += 1;
                                s.logged_in.retain(|p| *p != self.portal);
                                if *expired > MAX_RELOGINS {
                                    return Err(self.too_many_expiries());
                                }
                                continue;
                            }
                            Err(f) => return Err(self.fail(s, "probe", f).await),
                        }
                    }
                    (
                        "upload",
                        self.upload_steps(s, b, st).await.map(Out::Receipt),
                    )
                }
                Op::Verify(b) => (
                    "verify",
                    self.verify_steps(s, b, st).await.map(Out::Verification),
                ),
                Op::ReadBack(b) => (
                    "read back",
                    self.observe_steps(s, b, st)
                        .await
                        .map(|seen| Out::ReadBack(self.read_items(b, &seen))),
                ),
                Op::Probe(key) => ("probe", self.probe(s, *key, st).await.map(Out::Probe)),
            };
            match res {
                Ok(out) => return Ok(out),
                Err(Fail::NeedLogin) => {
                    *expired += 1;
                    s.logged_in.retain(|p| *p != self.portal);
                    tracing::info!(endpoint = %self.endpoint, phase, "session expired; logging in again");
                    if *expired > MAX_RELOGINS {
                        return Err(self.too_many_expiries());
                    }
                }
                Err(f) => return Err(self.fail(s, phase, f).await),
            }
        }
    }

    fn too_many_expiries(&self) -> AdapterError {
        AdapterError::Transient(format!(
            "endpoint {}: the portal ended the session {MAX_RELOGINS} times in one call",
            self.endpoint
        ))
    }

    async fn upload_steps(
        &self,
        s: &mut pool::Session,
        batch: &Batch,
        st: &mut PhaseState,
    ) -> Result<Receipt, Fail> {
        let ctx = self.ctx(Some(BatchCtx::new(batch)));
        let config = |message: String| Fail::Config {
            at: "manifest".into(),
            message,
        };
        let dir;
        let (manifest, receipt) = match self.recipe.kind {
            PortalKind::Manifest => {
                let (name, csv) =
                    recipe::manifest(&self.recipe.manifest, &ctx, batch, &self.sku_prefix)
                        .map_err(config)?;
                dir = tempfile::Builder::new()
                    .prefix("bulwark-manifest-")
                    .tempdir()
                    .map_err(|e| config(e.to_string()))?;
                let path = dir.path().join(&name);
                std::fs::write(&path, csv).map_err(|e| config(e.to_string()))?;
                (Some(path), name)
            }
            PortalKind::PerItem => (None, batch.key.to_string()),
        };
        {
            let mut recent = self.recent.lock().expect("recent batches");
            if recent.len() > 64 {
                recent.clear();
            }
            recent.insert(batch.key, batch.clone());
        }
        let mut r = self.runner(s, manifest.as_deref());
        r.progress = st.resume.take();
        r.items = std::mem::take(&mut st.items);
        let res = r
            .run("upload", &self.recipe.upload, &ctx, &batch.items)
            .await;
        st.resume = r.progress;
        st.items = std::mem::take(&mut r.items);
        res?;
        Ok(Receipt { id: receipt })
    }

    async fn verify_steps(
        &self,
        s: &mut pool::Session,
        batch: &Batch,
        st: &mut PhaseState,
    ) -> Result<Verification, Fail> {
        let seen = self.observe_steps(s, batch, st).await?;
        Ok(self.compare(batch, &seen))
    }

    /// Run the verify recipe over the batch: what the portal shows, by portal SKU.
    async fn observe_steps(
        &self,
        s: &mut pool::Session,
        batch: &Batch,
        st: &mut PhaseState,
    ) -> Result<Observed, Fail> {
        let ctx = self.ctx(Some(BatchCtx::new(batch)));
        let mut r = self.runner(s, None);
        r.progress = st.resume.take();
        r.observed = std::mem::take(&mut st.observed);
        r.items = std::mem::take(&mut st.items);
        let res = r
            .run("verify", &self.recipe.verify, &ctx, &batch.items)
            .await;
        st.resume = r.progress;
        st.observed = std::mem::take(&mut r.observed);
        st.items = std::mem::take(&mut r.items);
        res?;
        Ok(std::mem::take(&mut st.observed))
    }

    fn compare(&self, batch: &Batch, observed: &Observed) -> Verification {
        Verification::of(
            batch.items.len(),
            &self.read_items(batch, observed).differing,
        )
    }

    /// Item by item, does the portal show what the batch says?
    fn read_items(&self, batch: &Batch, observed: &Observed) -> ReadBack {
        ReadBack::of(
            &batch.items,
            |_| None,
            |item| {
                let want = recipe::ItemCtx::new(item, &self.sku_prefix);
                match observed.get(&want.portal_sku) {
                    None => Some(format!("{} not shown", want.portal_sku)),
                    Some((qty, price)) => {
                        let q = qty.as_deref().and_then(|q| q.trim().parse::<i64>().ok());
                        let p = price.as_deref().and_then(parse_price);
                        if q != Some(want.qty) {
                            Some(format!(
                                "qty {:?} != {}",
                                qty.as_deref().unwrap_or("?"),
                                want.qty
                            ))
                        } else if p != Some(want.price_minor) {
                            Some(format!(
                                "price {:?} != {}",
                                price.as_deref().unwrap_or("?"),
                                want.price
                            ))
                        } else {
                            None
                        }
                    }
                }
            },
        )
    }

    async fn probe_steps(&self, s: &mut pool::Session, key: Uuid) -> Result<Option<Receipt>, Fail> {
        let Some(m) = &self.recipe.probe_match else {
            return Ok(None);
        };
        let ctx = self.ctx(Some(BatchCtx::from_key(key)));
        let mut r = self.runner(s, None);
        r.run("probe", &self.recipe.probe, &ctx, &[]).await?;
        let needles = m
            .contains
            .iter()
            .map(|t| {
                recipe::render(t, &ctx).map_err(|message| Fail::Config {
                    at: "probe_match".into(),
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if r.any_contains("probe_match", &m.rows, &needles).await? {
            let id = match self.recipe.kind {
                PortalKind::Manifest => {
                    let mut c = ctx.clone();
                    c.item = None;
                    recipe::render(&self.recipe.manifest.file_name, &c)
                        .unwrap_or_else(|_| key.to_string())
                }
                PortalKind::PerItem => key.to_string(),
            };
            return Ok(Some(Receipt { id }));
        }
        Ok(None)
    }

    async fn probe(
        &self,
        s: &mut pool::Session,
        key: Uuid,
        st: &mut PhaseState,
    ) -> Result<Option<Receipt>, Fail> {
        if self.recipe.kind == PortalKind::PerItem {
            if let Some(batch) = self.recent_batch(key) {
                // Absolute values: the batch landed iff the portal shows all of them.
                return Ok(match self.verify_steps(s, &batch, st).await? {
                    Verification::Verified => Some(Receipt {
                        id: key.to_string(),
                    }),
                    Verification::Mismatch { .. } => None,
                });
            }
        }
        self.probe_steps(s, key).await
    }

    /// A per-item batch this adapter uploaded, by key (probe re-reads its values).
    fn recent_batch(&self, key: Uuid) -> Option<Batch> {
        if self.recipe.kind != PortalKind::PerItem {
            return None;
        }
        self.recent
            .lock()
            .expect("recent batches")
            .get(&key)
            .cloned()
    }

    async fn call(&self, op: Op<'_>) -> AdapterResult<Out> {
        let mut lease = self.pool.acquire(&self.portal).await?;
        let session = lease.session.as_mut().expect("a fresh lease has a session");
        let res = tokio::time::timeout(self.deadline, self.drive(session, &op)).await;
        match res {
            Err(_) => {
                let err = match lease.session.as_ref() {
                    Some(s) => {
                        self.fail(
                            s,
                            "deadline",
                            Fail::Timeout {
                                at: "call".into(),
                                what: format!(
                                    "deadline of {} ms exceeded",
                                    self.deadline.as_millis()
                                ),
                            },
                        )
                        .await
                    }
                    None => AdapterError::Transient("deadline exceeded".into()),
                };
                self.pool.release(lease, false).await;
                Err(err)
            }
            Ok(r) => {
                let healthy = matches!(
                    r,
                    Ok(_)
                        | Err(AdapterError::Rejected(_))
                        | Err(AdapterError::Config(_))
                        | Err(AdapterError::Partial(_))
                );
                self.pool.release(lease, healthy).await;
                r
            }
        }
    }
}

#[async_trait]
impl PortalAdapter for WebDriverAdapter {
    fn deduplicates(&self) -> bool {
        // A form submitted twice is applied twice.
        false
    }

    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt> {
        match self.call(Op::Upload(batch)).await? {
            Out::Receipt(r) => Ok(r),
            _ => unreachable!("upload returns a receipt"),
        }
    }

    async fn verify(&self, batch: &Batch, _receipt: &Receipt) -> AdapterResult<Verification> {
        match self.call(Op::Verify(batch)).await? {
            Out::Verification(v) => Ok(v),
            _ => unreachable!("verify returns a verification"),
        }
    }

    async fn read_back(&self, batch: &Batch) -> AdapterResult<ReadBack> {
        match self.call(Op::ReadBack(batch)).await? {
            Out::ReadBack(r) => Ok(r),
            _ => unreachable!("read back returns a read-back"),
        }
    }

    async fn probe(&self, _endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>> {
        match self.call(Op::Probe(key)).await? {
            Out::Probe(p) => Ok(p),
            _ => unreachable!("probe returns an option"),
        }
    }
}
