//! Running recipe steps in one browser session.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulwark_workflows::catalog::Item;
use thirtyfour::prelude::*;

use super::pool::Session;
use super::recipe::{Ctx, Field, Ids, ItemCtx, Observed, Step, render};

/// Why a step failed (before it is turned into an `AdapterError`).
#[derive(Debug)]
pub(crate) enum Fail {
    /// The login page showed up: the session expired.
    NeedLogin,
    /// The portal showed a validation message.
    Rejected { at: String, message: String },
    /// A step's selector matched nothing within the step timeout.
    NotFound { at: String, selector: String },
    /// A `wait_for` / `expect_text` did not see what it waited for in time.
    Timeout { at: String, what: String },
    /// The browser or the WebDriver connection failed.
    Driver { at: String, message: String },
    /// The recipe cannot work (template error, missing secret, ...).
    Config { at: String, message: String },
    /// Not done: effect fencing refused the step (this worker's lease is lost or ending).
    Fenced { at: String, message: String },
    /// The recipe's `not_found_marker` showed up while working on an item.
    NotFoundPage { at: String, marker: String },
    /// A lookup's capture found nothing: the portal does not know the item.
    UnknownItem { at: String, message: String },
}

/// One item the portal does not know, found while running a phase.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub(crate) sku: String,
    /// Where and why (no secrets; the adapter prefixes endpoint and recipe).
    pub(crate) message: String,
}

/// Per-item state of one adapter call, kept across re-runs of a phase after a re-login.
#[derive(Debug, Default)]
pub(crate) struct ItemState {
    /// Known portal ids by SKU (cached or looked up in this call).
    pub(crate) ids: HashMap<String, Ids>,
    /// SKUs whose ids came from the cache (they may have gone stale).
    pub(crate) cached: HashSet<String>,
    /// SKUs whose cache was already read.
    pub(crate) read: HashSet<String>,
    /// Ids looked up in this call, not yet written to the cache.
    pub(crate) store: Vec<(String, Ids)>,
    /// SKUs whose cached ids went stale, not yet removed from the cache.
    pub(crate) forget: Vec<String>,
    /// Items the portal does not know.
    pub(crate) refused: Vec<Refused>,
    /// Lookups run in this call.
    pub(crate) lookups: u32,
}

/// What a runner needs to know about the endpoint.
pub(crate) struct Env<'a> {
    pub(crate) login_marker: &'a str,
    pub(crate) step_timeout: Duration,
    pub(crate) sku_prefix: &'a str,
    pub(crate) secrets: &'a dyn super::Secrets,
    /// The generated manifest file, when uploading to a manifest portal.
    pub(crate) manifest: Option<&'a Path>,
    /// The recipe's per-item lookup steps (empty: no lookups).
    pub(crate) lookup: &'a [Step],
    /// The recipe's `not_found_marker`.
    pub(crate) not_found_marker: Option<&'a str>,
}

const POLL: Duration = Duration::from_millis(50);

static SECRET_CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
    crate::transport::build_client(&Default::default(), None)
        .expect("the default transport reads no files and always builds")
});

/// Type a secret into `el` with a WebDriver "Element Send Keys" request made here rather
/// than through thirtyfour, whose debug log prints every request body.
async fn send_secret(el: &WebElement, text: &str, timeout: Duration) -> Result<(), String> {
    let h = el.handle();
    let url = format!(
        "{}/session/{}/element/{}/value",
        h.server_url().as_str().trim_end_matches('/'),
        h.session_id(),
        el.element_id()
    );
    let resp = SECRET_CLIENT
        .post(url)
        .json(&serde_json::json!({ "text": text }))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| format!("sending a secret value failed: {}", e.without_url()))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        // The body is not quoted: it is the driver's, but keep secrets' paths minimal.
        Err(format!(
            "the WebDriver server refused a secret value (HTTP {})",
            resp.status()
        ))
    }
}

/// Run a WebDriver command with the step timeout (a hung navigation is transient).
async fn timed<T>(
    at: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = WebDriverResult<T>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| driver_fail(at, e)),
        Err(_) => Err(Fail::Timeout {
            at: at.to_owned(),
            what: format!("the browser did not finish within {} ms", limit.as_millis()),
        }),
    }
}

/// Executes steps in one session, collecting values read back.
pub(crate) struct Runner<'a> {
    pub(crate) s: &'a mut Session,
    pub(crate) env: Env<'a>,
    pub(crate) observed: Observed,
    /// Whether seeing the login marker means "session expired" (false while logging in).
    pub(crate) watch_login: bool,
    /// Where the phase is: (top-level step, item) of the current `for_each_item`
    /// iteration. A phase re-run after a re-login starts there.
    pub(crate) progress: Option<(usize, usize)>,
    /// Ids, lookups and refused items of the call.
    pub(crate) items: ItemState,
    /// Whether the `not_found_marker` is watched (while an item's steps run).
    watch_not_found: bool,
}

impl<'a> Runner<'a> {
    /// A runner for `s` in `env`, with nothing observed yet.
    pub(crate) fn new(s: &'a mut Session, env: Env<'a>) -> Self {
        Self {
            s,
            env,
            observed: Observed::new(),
            watch_login: true,
            progress: None,
            items: ItemState::default(),
            watch_not_found: false,
        }
    }
}

fn driver_fail(at: &str, e: WebDriverError) -> Fail {
    Fail::Driver {
        at: at.to_owned(),
        message: e.to_string(),
    }
}

impl Runner<'_> {
    /// Run the top-level `steps` of `phase` with `ctx`; `items` feed `for_each_item`.
    /// With [`Runner::progress`] set (a resumed phase), steps before that loop are skipped
    /// and the loop starts at that item.
    pub(crate) async fn run(
        &mut self,
        phase: &str,
        steps: &[Step],
        ctx: &Ctx,
        items: &[Item],
    ) -> Result<(), Fail> {
        let resume = self.progress.take();
        for (i, step) in steps.iter().enumerate() {
            let at = format!("{phase} step {} ({})", i + 1, step.action());
            let mut first_item = 0;
            if let Some((si, ii)) = resume {
                if i < si {
                    continue;
                }
                if i == si {
                    first_item = ii;
                }
            }
            if let Step::ForEachItem { steps: inner } = step {
                for (n, item) in items.iter().enumerate().skip(first_item) {
                    self.progress = Some((i, n));
                    self.item(&at, inner, ctx, item).await?;
                }
                self.progress = None;
                continue;
            }
            self.step(&at, step, ctx).await?;
        }
        Ok(())
    }

    /// One item of a `for_each_item` loop: its ids (looked up unless known), then its
    /// steps. An item the portal does not know is refused (recorded, not an error). A
    /// not-found page with cached ids forgets them and looks the item up again, once.
    async fn item(&mut self, at: &str, steps: &[Step], ctx: &Ctx, item: &Item) -> Result<(), Fail> {
        if self.items.refused.iter().any(|r| r.sku == item.sku) {
            return Ok(());
        }
        let label = format!("{at} [item {}]", item.sku);
        let base = ItemCtx::new(item, self.env.sku_prefix);
        loop {
            if !self.env.lookup.is_empty() && !self.items.ids.contains_key(&item.sku) {
                match self.lookup(&label, ctx, &base).await {
                    Ok(ids) => {
                        self.items.lookups += 1;
                        self.items.store.push((item.sku.clone(), ids.clone()));
                        self.items.ids.insert(item.sku.clone(), ids);
                    }
                    Err(Fail::UnknownItem { at, message }) => {
                        self.refuse(&item.sku, format!("{at}: {message}"));
                        return Ok(());
                    }
                    Err(f) => return Err(f),
                }
            }
            let mut ictx = Ctx {
                item: Some(ItemCtx {
                    ids: self.items.ids.get(&item.sku).cloned().unwrap_or_default(),
                    ..base.clone()
                }),
                ..ctx.clone()
            };
            self.watch_not_found = true;
            let res = self.item_steps(&label, steps, &mut ictx).await;
            self.watch_not_found = false;
            match res {
                Ok(()) => return Ok(()),
                Err(Fail::NotFoundPage { at, marker }) => {
                    if self.items.cached.remove(&item.sku) {
                        tracing::info!(step = %at, "cached portal ids went stale; looking the item up again");
                        self.items.ids.remove(&item.sku);
                        self.items.forget.push(item.sku.clone());
                        continue;
                    }
                    let why = if self.env.lookup.is_empty() {
                        String::new()
                    } else {
                        " with the ids just looked up".to_owned()
                    };
                    self.refuse(
                        &item.sku,
                        format!(
                            "{at}: the portal shows its not-found page ({marker:?}){why} for SKU {:?}",
                            item.sku
                        ),
                    );
                    return Ok(());
                }
                Err(f) => return Err(f),
            }
        }
    }

    fn refuse(&mut self, sku: &str, message: String) {
        tracing::info!(sku, reason = %message, "item refused: the portal does not know it");
        self.items.refused.push(Refused {
            sku: sku.to_owned(),
            message,
        });
    }

    async fn item_steps(
        &mut self,
        label: &str,
        steps: &[Step],
        ictx: &mut Ctx,
    ) -> Result<(), Fail> {
        for (j, st) in steps.iter().enumerate() {
            let at = format!("{label} step {} ({})", j + 1, st.action());
            if let Some((name, value)) = self.step(&at, st, ictx).await?
                && let Some(it) = ictx.item.as_mut()
            {
                it.ids.insert(name, value);
            }
        }
        Ok(())
    }

    /// Run the recipe's lookup steps for one item: the ids its captures found.
    async fn lookup(&mut self, label: &str, ctx: &Ctx, item: &ItemCtx) -> Result<Ids, Fail> {
        let mut lctx = Ctx {
            item: Some(item.clone()),
            ..ctx.clone()
        };
        let steps = self.env.lookup;
        for (k, st) in steps.iter().enumerate() {
            let at = format!("{label} lookup step {} ({})", k + 1, st.action());
            let got = match self.step(&at, st, &lctx).await {
                Err(Fail::NotFound { at, selector }) if matches!(st, Step::Capture { .. }) => {
                    return Err(Fail::UnknownItem {
                        message: format!(
                            "SKU {:?} is unknown at the portal: the lookup found no {selector:?}",
                            item.sku
                        ),
                        at,
                    });
                }
                r => r?,
            };
            if let Some((name, value)) = got
                && let Some(it) = lctx.item.as_mut()
            {
                it.ids.insert(name, value);
            }
        }
        Ok(lctx.item.map(|i| i.ids).unwrap_or_default())
    }

    fn render(&self, at: &str, template: &str, ctx: &Ctx) -> Result<String, Fail> {
        render(template, ctx).map_err(|message| Fail::Config {
            at: at.to_owned(),
            message,
        })
    }

    async fn login_shown(&self) -> bool {
        self.watch_login
            && self
                .s
                .driver
                .find_all(By::Css(self.env.login_marker))
                .await
                .is_ok_and(|v| !v.is_empty())
    }

    /// Whether the recipe's not-found marker is on the page (watched while an item's
    /// steps run).
    async fn not_found_shown(&self, at: &str) -> Result<(), Fail> {
        let Some(marker) = self.env.not_found_marker.filter(|_| self.watch_not_found) else {
            return Ok(());
        };
        if self
            .s
            .driver
            .find_all(By::Css(marker))
            .await
            .is_ok_and(|v| !v.is_empty())
        {
            return Err(Fail::NotFoundPage {
                at: at.to_owned(),
                marker: marker.to_owned(),
            });
        }
        Ok(())
    }

    /// The first element matching `selector`, waiting up to the step timeout.
    async fn find(&self, at: &str, selector: &str) -> Result<WebElement, Fail> {
        self.find_within(at, selector, self.env.step_timeout).await
    }

    /// The first element matching `selector`, waiting up to `limit`.
    async fn find_within(
        &self,
        at: &str,
        selector: &str,
        limit: Duration,
    ) -> Result<WebElement, Fail> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .s
                .driver
                .find_all(By::Css(selector))
                .await
                .map_err(|e| driver_fail(at, e))?;
            // Prefer a visible match (tabs keep hidden copies of fields around).
            let mut first = None;
            for el in found {
                if el.is_displayed().await.unwrap_or(false) {
                    return Ok(el);
                }
                first.get_or_insert(el);
            }
            if self.login_shown().await {
                return Err(Fail::NeedLogin);
            }
            if first.is_none() {
                self.not_found_shown(at).await?;
            }
            if Instant::now() >= deadline {
                return match first {
                    Some(el) => Ok(el),
                    None => Err(Fail::NotFound {
                        at: at.to_owned(),
                        selector: selector.to_owned(),
                    }),
                };
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn texts(&self, at: &str, selector: &str) -> Result<Vec<String>, Fail> {
        let els = self
            .s
            .driver
            .find_all(By::Css(selector))
            .await
            .map_err(|e| driver_fail(at, e))?;
        let mut out = Vec::with_capacity(els.len());
        for el in els {
            // An element replaced while we read it is simply skipped this round.
            if let Ok(t) = el.text().await {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Run one step; a `capture` answers the variable it read.
    async fn step(
        &mut self,
        at: &str,
        step: &Step,
        ctx: &Ctx,
    ) -> Result<Option<(String, String)>, Fail> {
        tracing::debug!(step = at, selector = step.selector(), "webdriver step");
        // Effect fencing: every step (a read too: it may follow a write's click) is
        // checked before the browser is told to do it.
        bulwark_workflows::adapter::fence_check().map_err(|e| Fail::Fenced {
            at: at.to_owned(),
            message: e.to_string(),
        })?;
        match step {
            Step::Goto { url } => {
                let url = self.render(at, url, ctx)?;
                timed(at, self.env.step_timeout, self.s.driver.goto(url.as_str())).await?;
                if self.login_shown().await {
                    return Err(Fail::NeedLogin);
                }
                self.not_found_shown(at).await?;
            }
            Step::Fill {
                selector,
                value,
                secret,
            } => {
                let (text, is_secret) = match (value, secret) {
                    (Some(v), _) => (self.render(at, v, ctx)?, false),
                    (None, Some(name)) => {
                        self.s.secret_fields.push(selector.clone());
                        let v = self.env.secrets.get(name).ok_or_else(|| Fail::Config {
                            at: at.to_owned(),
                            message: format!("secret {name:?} is not set"),
                        })?;
                        (v, true)
                    }
                    (None, None) => unreachable!("validated: fill has a value or a secret"),
                };
                let el = self.find(at, selector).await?;
                el.clear().await.map_err(|e| driver_fail(at, e))?;
                if is_secret {
                    send_secret(&el, &text, self.env.step_timeout)
                        .await
                        .map_err(|message| Fail::Driver {
                            at: at.to_owned(),
                            message,
                        })?;
                } else {
                    el.send_keys(text.as_str())
                        .await
                        .map_err(|e| driver_fail(at, e))?;
                }
            }
            Step::Click { selector } => {
                let el = self.find(at, selector).await?;
                timed(at, self.env.step_timeout, el.click()).await?;
            }
            Step::UploadFile { selector } => {
                let Some(path) = self.env.manifest else {
                    return Err(Fail::Config {
                        at: at.to_owned(),
                        message: "upload_file needs a manifest portal (kind = \"manifest\") in the upload phase".into(),
                    });
                };
                let el = self.find(at, selector).await?;
                el.send_keys(path.to_string_lossy().as_ref())
                    .await
                    .map_err(|e| driver_fail(at, e))?;
            }
            Step::WaitFor {
                selector,
                text,
                timeout_ms,
            } => {
                let want = text.as_ref().map(|t| self.render(at, t, ctx)).transpose()?;
                let limit = timeout_ms.map_or(self.env.step_timeout, Duration::from_millis);
                let deadline = Instant::now() + limit;
                loop {
                    let texts = self.texts(at, selector).await?;
                    let ok = match &want {
                        None => !texts.is_empty(),
                        Some(w) => texts.iter().any(|t| t.contains(w.as_str())),
                    };
                    if ok {
                        break;
                    }
                    if self.login_shown().await {
                        return Err(Fail::NeedLogin);
                    }
                    if Instant::now() >= deadline {
                        let what = match &want {
                            None => format!("selector {selector:?} to appear"),
                            Some(w) => format!("text {w:?} in {selector:?}"),
                        };
                        return Err(Fail::Timeout {
                            at: at.to_owned(),
                            what: format!("waited {} ms for {what}", limit.as_millis()),
                        });
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            Step::ExpectText {
                selector,
                text,
                error_selector,
                timeout_ms,
            } => {
                let want = self.render(at, text, ctx)?;
                let limit = timeout_ms.map_or(self.env.step_timeout, Duration::from_millis);
                let deadline = Instant::now() + limit;
                loop {
                    if let Some(es) = error_selector {
                        let errs = self.texts(at, es).await?;
                        let errs: Vec<String> = errs
                            .into_iter()
                            .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
                            .filter(|t| !t.is_empty())
                            .collect();
                        if !errs.is_empty() {
                            return Err(Fail::Rejected {
                                at: at.to_owned(),
                                message: errs.join(" | "),
                            });
                        }
                    }
                    let texts = self.texts(at, selector).await?;
                    if texts.iter().any(|t| t.contains(want.as_str())) {
                        break;
                    }
                    if self.login_shown().await {
                        return Err(Fail::NeedLogin);
                    }
                    if Instant::now() >= deadline {
                        return Err(Fail::Timeout {
                            at: at.to_owned(),
                            what: format!(
                                "waited {} ms for text {want:?} in {selector:?}",
                                limit.as_millis()
                            ),
                        });
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            Step::ReadText { selector, field } => {
                let Some(item) = &ctx.item else {
                    return Err(Fail::Config {
                        at: at.to_owned(),
                        message: "read_text outside for_each_item".into(),
                    });
                };
                let el = self.find(at, selector).await?;
                let tag = el.tag_name().await.map_err(|e| driver_fail(at, e))?;
                let value = if matches!(
                    tag.to_ascii_lowercase().as_str(),
                    "input" | "textarea" | "select"
                ) {
                    el.prop("value")
                        .await
                        .map_err(|e| driver_fail(at, e))?
                        .unwrap_or_default()
                } else {
                    el.text().await.map_err(|e| driver_fail(at, e))?
                };
                let entry = self.observed.entry(item.portal_sku.clone()).or_default();
                match field {
                    Field::Qty => entry.0 = Some(value.trim().to_owned()),
                    Field::Price => entry.1 = Some(value.trim().to_owned()),
                }
            }
            Step::ReadTable {
                selector,
                sku_column,
                qty_column,
                price_column,
            } => {
                let table = self.find(at, selector).await?;
                let arg = table.to_json().map_err(|e| driver_fail(at, e))?;
                let ret = self
                    .s
                    .driver
                    .execute(
                        "const t = arguments[0];\
                         const head = Array.from(t.querySelectorAll('thead th, thead td')).map(e => e.textContent.trim());\
                         const rows = Array.from(t.querySelectorAll('tbody tr')).map(r => Array.from(r.cells).map(c => c.textContent.trim()));\
                         return [head, rows];",
                        vec![arg],
                    )
                    .await
                    .map_err(|e| driver_fail(at, e))?;
                let (head, rows): (Vec<String>, Vec<Vec<String>>) =
                    ret.convert().map_err(|e| driver_fail(at, e))?;
                let col = |name: &str| {
                    head.iter()
                        .position(|h| h.eq_ignore_ascii_case(name))
                        .ok_or_else(|| Fail::Config {
                            at: at.to_owned(),
                            message: format!(
                                "table {selector:?} has no column {name:?} (columns: {head:?})"
                            ),
                        })
                };
                let (si, qi, pi) = (col(sku_column)?, col(qty_column)?, col(price_column)?);
                for r in rows {
                    if let Some(sku) = r.get(si) {
                        self.observed
                            .insert(sku.clone(), (r.get(qi).cloned(), r.get(pi).cloned()));
                    }
                }
            }
            Step::ForEachItem { .. } => {
                return Err(Fail::Config {
                    at: at.to_owned(),
                    message: "loops do not nest".into(),
                });
            }
            Step::Capture {
                selector,
                attribute,
                pattern,
                into,
                timeout_ms,
            } => {
                let Some(item) = &ctx.item else {
                    return Err(Fail::Config {
                        at: at.to_owned(),
                        message: "capture outside lookup and for_each_item".into(),
                    });
                };
                let selector = self.render(at, selector, ctx)?;
                let limit = timeout_ms.map_or(self.env.step_timeout, Duration::from_millis);
                let el = self.find_within(at, &selector, limit).await?;
                let config = |message: String| Fail::Config {
                    at: at.to_owned(),
                    message,
                };
                let raw = match attribute {
                    Some(a) => el
                        .attr(a.as_str())
                        .await
                        .map_err(|e| driver_fail(at, e))?
                        .ok_or_else(|| {
                            config(format!(
                                "capture {into:?} for SKU {:?}: {selector:?} has no attribute {a:?}",
                                item.sku
                            ))
                        })?,
                    None => el.text().await.map_err(|e| driver_fail(at, e))?,
                };
                let value = match pattern {
                    None => raw.trim().to_owned(),
                    Some(p) => {
                        let re = regex::Regex::new(p)
                            .map_err(|e| config(format!("pattern {p:?}: {e}")))?;
                        re.captures(&raw)
                            .and_then(|c| c.get(1))
                            .map(|m| m.as_str().to_owned())
                            .ok_or_else(|| {
                                config(format!(
                                    "capture {into:?} for SKU {:?}: pattern {p:?} does not match {raw:?} (read from {})",
                                    item.sku,
                                    attribute
                                        .as_deref()
                                        .map_or("the text".to_owned(), |a| format!("attribute {a:?}"))
                                ))
                            })?
                    }
                };
                if value.is_empty() {
                    return Err(config(format!(
                        "capture {into:?} for SKU {:?}: {selector:?} gave an empty value",
                        item.sku
                    )));
                }
                return Ok(Some((into.clone(), value)));
            }
        }
        Ok(None)
    }

    /// Elements matching `selector` whose text contains every string of `needles`.
    pub(crate) async fn any_contains(
        &self,
        at: &str,
        selector: &str,
        needles: &[String],
    ) -> Result<bool, Fail> {
        let texts = self.texts(at, selector).await?;
        Ok(texts
            .iter()
            .any(|t| needles.iter().all(|n| t.contains(n.as_str()))))
    }
}

static ARTIFACT_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replace every secret value in `text`.
pub(crate) fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "[REDACTED]");
    }
    out
}

/// Save a screenshot and the page HTML of `session` into `dir`; secret fields are blanked
/// first and secret values are redacted from the HTML. Returns the two paths saved.
pub(crate) async fn capture(
    session: &Session,
    dir: &Path,
    label: &str,
    secrets: &[String],
) -> (Option<PathBuf>, Option<PathBuf>) {
    if std::fs::create_dir_all(dir).is_err() {
        return (None, None);
    }
    let safe: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let stamp = chrono_like_stamp();
    let n = ARTIFACT_SEQ.fetch_add(1, Ordering::Relaxed);
    let base = dir.join(format!("{safe}-{stamp}-{n}"));
    if !session.secret_fields.is_empty() {
        let sels = serde_json::Value::from(session.secret_fields.clone());
        let _ = session
            .driver
            .execute(
                "for (const s of arguments[0]) { for (const e of document.querySelectorAll(s)) { try { e.value = ''; } catch (_) {} } }",
                vec![sels],
            )
            .await;
    }
    let png = base.with_extension("png");
    let png = match session.driver.screenshot_as_png().await {
        Ok(bytes) if std::fs::write(&png, &bytes).is_ok() => Some(png),
        _ => None,
    };
    let html = base.with_extension("html");
    let html = match session.driver.source().await {
        Ok(src) if std::fs::write(&html, redact(&src, secrets)).is_ok() => Some(html),
        _ => None,
    };
    (png, html)
}

fn chrono_like_stamp() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}{:03}", d.as_secs(), d.subsec_millis())
}
