//! `bulwark.toml`: the database, sync limits, the retry/circuit policy, per-endpoint and
//! per-host limits, alerts (webhook), schedules, the legacy source of scheduled snapshots,
//! adapter resources (HTTP platform profiles) and the endpoints. Unknown keys, bad values,
//! bad cron expressions, impossible limits and broken endpoints fail at load, naming the
//! file, line and key.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use bulwark_adapters::http::{self, CacheError, IdCache, PgIdCache, Profiles, SqliteIdCache};
use bulwark_adapters::webdriver;
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig};
use bulwark_workflows::endpoint_sync::SyncPolicy;
use bulwark_workflows::staging::OnRemoved;
use bulwark_workflows::sync::{HostLimits, Limits, SyncOptions};
use serde::Deserialize;

use crate::snapshot_cmd::SourceSection;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Bulwark's database (path or URL); `--db` / `BULWARK_DB` override it.
    pub(crate) database: Option<String>,
    #[serde(default)]
    pub(crate) sync: SyncSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    pub(crate) alerts: AlertsSection,
    #[serde(default)]
    pub(crate) schedule: ScheduleSection,
    #[serde(default)]
    pub(crate) worker: WorkerSection,
    #[serde(default)]
    pub(crate) retention: RetentionSection,
    /// The legacy source read by scheduled snapshots.
    pub(crate) source: Option<SourceSection>,
    pub(crate) http: Option<HttpSection>,
    /// Endpoints listed inline.
    #[serde(default, rename = "endpoint")]
    endpoints: Vec<EndpointEntry>,
    /// More endpoints from another TOML file with `[[endpoint]]` tables (7,200 of them
    /// read better apart).
    endpoints_file: Option<PathBuf>,
    #[serde(skip)]
    dir: PathBuf,
}

/// `[sync]`: batch size, global concurrency, retry and circuit policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SyncSection {
    batch_size: u32,
    max_in_flight: usize,
    max_failures: u32,
    max_attempts: u32,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
    cooldown_ms: u64,
    max_cooldown_ms: u64,
    attempt_timeout_ms: u64,
    /// Percent of a batch's items an endpoint may refuse before that counts as a failed
    /// validation (below it, refused items are quarantined and the rest goes on).
    max_refused_percent: u32,
    /// What to send for SKUs gone from the source: `leave` (default) or `zero_stock`.
    on_removed: OnRemoved,
    /// Hold every endpoint rather than push stock from a snapshot whose read started
    /// longer ago than this (seconds; none by default).
    max_snapshot_age_secs: Option<u64>,
}

impl Default for SyncSection {
    fn default() -> Self {
        let o = SyncOptions::default();
        Self {
            batch_size: o.batch_size,
            max_in_flight: o.max_in_flight,
            max_failures: o.policy.max_failures,
            max_attempts: o.policy.max_attempts,
            backoff_base_ms: o.policy.backoff_base_ms,
            backoff_max_ms: o.policy.backoff_max_ms,
            cooldown_ms: o.policy.cooldown_ms,
            max_cooldown_ms: o.policy.max_cooldown_ms,
            attempt_timeout_ms: o.policy.attempt_timeout_ms,
            max_refused_percent: o.policy.max_refused_percent,
            on_removed: o.on_removed,
            max_snapshot_age_secs: None,
        }
    }
}

impl SyncSection {
    fn policy(&self) -> SyncPolicy {
        SyncPolicy {
            max_failures: self.max_failures,
            max_attempts: self.max_attempts,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_ms: self.backoff_max_ms,
            cooldown_ms: self.cooldown_ms,
            max_cooldown_ms: self.max_cooldown_ms,
            attempt_timeout_ms: self.attempt_timeout_ms,
            max_refused_percent: self.max_refused_percent,
        }
    }
}

/// An endpoint's `policy = { … }`: any `[sync]` policy key, overriding it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyOverrides {
    max_failures: Option<u32>,
    max_attempts: Option<u32>,
    backoff_base_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    cooldown_ms: Option<u64>,
    max_cooldown_ms: Option<u64>,
    attempt_timeout_ms: Option<u64>,
    max_refused_percent: Option<u32>,
}

impl PolicyOverrides {
    fn apply(&self, mut p: SyncPolicy) -> SyncPolicy {
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { p.$f = v; } )* };
        }
        over!(
            max_failures,
            max_attempts,
            backoff_base_ms,
            backoff_max_ms,
            cooldown_ms,
            max_cooldown_ms,
            attempt_timeout_ms,
            max_refused_percent
        );
        p
    }
}

/// `[limits]`: per-endpoint and per-host concurrency and rates.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    per_endpoint: usize,
    per_host: Option<usize>,
    host_rate_per_sec: Option<u32>,
    host: HashMap<String, HostSection>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            per_endpoint: Limits::default().per_endpoint,
            per_host: None,
            host_rate_per_sec: None,
            host: HashMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostSection {
    max_in_flight: Option<usize>,
    rate_per_sec: Option<u32>,
}

/// `[alerts]`: the optional webhook every alert is POSTed to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct AlertsSection {
    /// Webhook URL.
    pub(crate) webhook_url: Option<String>,
    /// Environment variable holding the webhook URL (URLs often carry a token).
    pub(crate) webhook_url_env: Option<String>,
    /// Per-request timeout.
    pub(crate) webhook_timeout_ms: u64,
    /// Attempts per alert before it is given up.
    pub(crate) webhook_max_attempts: u32,
    /// First retry delay (doubling).
    pub(crate) webhook_retry_ms: u64,
    /// Extra CA certificates (PEM) trusted for the webhook.
    webhook_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a webhook receiver that wants mutual TLS.
    webhook_client_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    webhook_client_key_file: Option<PathBuf>,
    /// The webhook's proxy URL, or `none`.
    webhook_proxy: Option<String>,
}

impl Default for AlertsSection {
    fn default() -> Self {
        Self {
            webhook_url: None,
            webhook_url_env: None,
            webhook_timeout_ms: 5_000,
            webhook_max_attempts: 10,
            webhook_retry_ms: 1_000,
            webhook_ca_file: None,
            webhook_client_cert_file: None,
            webhook_client_key_file: None,
            webhook_proxy: None,
        }
    }
}

/// `[schedule]`: cron expressions (UTC; 5 fields, or 6 with seconds first) of the
/// worker's snapshots and sync runs, each independent of the other.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScheduleSection {
    /// When to take a snapshot of `[source]`.
    pub(crate) snapshot: Option<CronExpr>,
    /// When to start a sync run towards the newest sealed snapshot.
    pub(crate) sync: Option<CronExpr>,
    /// When to reconcile: read every endpoint back and send drifted items again (in the
    /// run it enqueues, which also syncs towards the newest sealed snapshot).
    pub(crate) reconcile: Option<CronExpr>,
    /// When to prune history older than `[retention]` keeps.
    pub(crate) prune: Option<CronExpr>,
}

/// `[retention]`: days of history `bulwark prune` and the worker's `prune` schedule keep;
/// 0 keeps that kind forever.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetentionSection {
    /// Journals of finished runs (the newest sync of every endpoint is always kept).
    journal_days: u32,
    /// Alerts.
    alert_days: u32,
    /// Staged snapshots that nothing needs any more.
    snapshot_days: u32,
}

impl Default for RetentionSection {
    fn default() -> Self {
        Self {
            journal_days: 30,
            alert_days: 30,
            snapshot_days: 30,
        }
    }
}

impl RetentionSection {
    /// The days to keep, `None` for forever.
    pub(crate) fn days(&self) -> bulwark_workflows::app::RetentionDays {
        let keep = |d: u32| (d > 0).then_some(d);
        bulwark_workflows::app::RetentionDays {
            journal_days: keep(self.journal_days),
            alert_days: keep(self.alert_days),
            snapshot_days: keep(self.snapshot_days),
        }
    }
}

/// `[worker]`: how `bulwark worker` holds and claims work (its flags override these).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkerSection {
    /// Lease length; heartbeats renew it every third of that.
    pub(crate) lease_ms: Option<i64>,
    /// No request is sent once less than this is left of an unconfirmed lease.
    pub(crate) effect_margin_ms: Option<i64>,
    /// Most endpoint syncs one worker drives at once.
    pub(crate) capacity: Option<usize>,
    /// Most endpoint syncs taken by one claim.
    pub(crate) claim_chunk: Option<usize>,
    /// How often an idle worker looks for work nobody notified it of (expired leases).
    pub(crate) poll_ms: Option<u64>,
}

impl WorkerSection {
    /// The first key whose value is unusable, and why.
    fn check(&self) -> Option<(&'static str, String)> {
        let lease = self.lease_ms.unwrap_or(crate::worker::DEFAULT_LEASE_MS);
        if lease < 300 {
            return Some(("lease_ms", format!("{lease} is too short (at least 300)")));
        }
        if let Some(m) = self.effect_margin_ms
            && !(0..lease).contains(&m)
        {
            return Some((
                "effect_margin_ms",
                format!("{m} must be at least 0 and below lease_ms ({lease})"),
            ));
        }
        if self.capacity == Some(0) {
            return Some(("capacity", "must be at least 1".into()));
        }
        if self.claim_chunk == Some(0) {
            return Some(("claim_chunk", "must be at least 1".into()));
        }
        if self.poll_ms == Some(0) {
            return Some(("poll_ms", "must be at least 1".into()));
        }
        None
    }
}

/// A cron expression, checked when the file is read (so an error names its line).
#[derive(Debug, Clone)]
pub(crate) struct CronExpr(pub(crate) String);

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        bulwark_engine::schedule::parse_cron(&s).map_err(serde::de::Error::custom)?;
        Ok(Self(s))
    }
}

/// `[http]`: the platform profiles file of the declarative HTTP adapter.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpSection {
    profiles: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    id: String,
    adapter: String,
    #[serde(default)]
    settings: HashMap<String, String>,
    policy: Option<PolicyOverrides>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointsFile {
    #[serde(default, rename = "endpoint")]
    endpoints: Vec<EndpointEntry>,
}

/// "file:line:column" of a byte offset.
fn position(path: &Path, text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    format!("{}:{line}:{col}", path.display())
}

/// A parsed file with its text, to point errors found after parsing at their key.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            text,
        })
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        toml::from_str(&self.text).map_err(|e| {
            let at = e
                .span()
                .map(|s| position(&self.path, &self.text, s.start))
                .unwrap_or_else(|| self.path.display().to_string());
            anyhow!("{at}: {}", e.message())
        })
    }

    /// "file:line:col: key: message", at the key `path` (e.g. `["sync", "batch_size"]`)
    /// if the file has it, else at its table, else at the file.
    fn error(&self, key: &[&str], message: impl std::fmt::Display) -> anyhow::Error {
        let doc = toml::de::DeTable::parse(&self.text).ok();
        let mut at = None;
        let mut table = doc.as_ref().map(|d| d.get_ref());
        for k in key {
            let Some((span, value)) = table.and_then(|t| {
                t.iter()
                    .find(|(name, _)| name.get_ref().as_ref() == *k)
                    .map(|(name, v)| (name.span(), v.get_ref()))
            }) else {
                break;
            };
            at = Some(span.start);
            table = value.as_table();
        }
        let place = at
            .map(|o| position(&self.path, &self.text, o))
            .unwrap_or_else(|| self.path.display().to_string());
        anyhow!("{place}: {}: {message}", key.join("."))
    }
}

impl Config {
    /// Load and validate `path`.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let src = Source::read(path)?;
        let mut config: Config = src.parse()?;
        config.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // A relative SQLite path means "next to this file", as every other path in it
        // does: not wherever the command happens to be started.
        if let Some(db) = &config.database {
            let trimmed = db.trim();
            if trimmed.is_empty() {
                return Err(src.error(&["database"], "is empty"));
            }
            if !(trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://")) {
                let (prefix, file) = match trimmed.strip_prefix("sqlite://") {
                    Some(rest) => ("sqlite://", rest),
                    None => ("", trimmed),
                };
                if Path::new(file).is_relative() {
                    config.database = Some(format!("{prefix}{}", config.dir.join(file).display()));
                }
            }
        }
        let s = &config.sync;
        if s.batch_size == 0 {
            return Err(src.error(&["sync", "batch_size"], "must be at least 1"));
        }
        if s.max_in_flight == 0 {
            return Err(src.error(&["sync", "max_in_flight"], "must be at least 1"));
        }
        if let Err(e) = s.policy().validate() {
            let key = e.split_whitespace().next().unwrap_or("").to_string();
            return Err(src.error(&["sync", &key], e));
        }
        if let Some((key, e)) = config.worker.check() {
            return Err(src.error(&["worker", key], e));
        }
        let l = &config.limits;
        for (key, bad) in [
            ("per_endpoint", l.per_endpoint == 0),
            ("per_host", l.per_host == Some(0)),
            ("host_rate_per_sec", l.host_rate_per_sec == Some(0)),
        ] {
            if bad {
                return Err(src.error(&["limits", key], "must be at least 1"));
            }
        }
        for (host, h) in &l.host {
            for (key, bad) in [
                ("max_in_flight", h.max_in_flight == Some(0)),
                ("rate_per_sec", h.rate_per_sec == Some(0)),
            ] {
                if bad {
                    return Err(src.error(&["limits", "host", host, key], "must be at least 1"));
                }
            }
        }
        let a = &config.alerts;
        if a.webhook_url.is_some() && a.webhook_url_env.is_some() {
            return Err(src.error(
                &["alerts", "webhook_url_env"],
                "give webhook_url or webhook_url_env, not both",
            ));
        }
        for (key, bad) in [
            ("webhook_timeout_ms", a.webhook_timeout_ms == 0),
            ("webhook_max_attempts", a.webhook_max_attempts == 0),
            ("webhook_retry_ms", a.webhook_retry_ms == 0),
        ] {
            if bad {
                return Err(src.error(&["alerts", key], "must be at least 1"));
            }
        }
        if let Some(u) = &a.webhook_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(src.error(
                &["alerts", "webhook_url"],
                "must be an http:// or https:// URL",
            ));
        }
        if config.schedule.snapshot.is_some() && config.source.is_none() {
            return Err(src.error(
                &["schedule", "snapshot"],
                "a snapshot schedule needs a [source] to read",
            ));
        }
        if let Some(source) = &config.source
            && let Err((key, e)) = source.validate()
        {
            return Err(src.error(&["source", key], e));
        }
        let policy = config.sync.policy();
        let check_endpoints = |entries: &[EndpointEntry], src: &Source| -> Result<()> {
            for (i, e) in entries.iter().enumerate() {
                if let Some(Err(err)) = e.settings.get("on_removed").map(|v| v.parse::<OnRemoved>())
                {
                    return Err(anyhow!(
                        "{}: endpoint {:?} (entry {}): settings: {err}",
                        src.path.display(),
                        e.id,
                        i + 1
                    ));
                }
                if let Some(p) = &e.policy
                    && let Err(err) = p.apply(policy.clone()).validate()
                {
                    return Err(anyhow!(
                        "{}: endpoint {:?} (entry {}): policy: {err}",
                        src.path.display(),
                        e.id,
                        i + 1
                    ));
                }
            }
            Ok(())
        };
        check_endpoints(&config.endpoints, &src)?;
        if let Some(extra) = &config.endpoints_file {
            let extra_src = Source::read(&config.dir.join(extra))?;
            let more: EndpointsFile = extra_src.parse()?;
            check_endpoints(&more.endpoints, &extra_src)?;
            config.endpoints.extend(more.endpoints);
        }
        let mut seen = HashSet::new();
        for e in &config.endpoints {
            if e.id.trim().is_empty() {
                return Err(anyhow!(
                    "{}: an [[endpoint]] has an empty id",
                    path.display()
                ));
            }
            if !seen.insert(e.id.clone()) {
                return Err(anyhow!(
                    "{}: endpoint id {:?} appears twice",
                    path.display(),
                    e.id
                ));
            }
        }
        Ok(config)
    }

    /// The directory the file is in (relative paths in it are relative to it).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The endpoints, as adapters see them (with their own policy, if they override it).
    pub(crate) fn endpoints(&self) -> Vec<EndpointConfig> {
        let policy = self.sync.policy();
        self.endpoints
            .iter()
            .map(|e| EndpointConfig {
                id: e.id.clone(),
                adapter: e.adapter.clone(),
                settings: self.resolve_paths(&e.settings),
                policy: e.policy.as_ref().map(|p| p.apply(policy.clone())),
            })
            .collect()
    }

    /// Settings with their file paths (`ca_file`, `client_cert_file`, `client_key_file`)
    /// made relative to this file's directory.
    fn resolve_paths(&self, settings: &HashMap<String, String>) -> HashMap<String, String> {
        let mut out = settings.clone();
        for key in bulwark_adapters::transport::PATH_KEYS {
            if let Some(p) = out.get_mut(*key)
                && !p.trim().is_empty()
            {
                *p = self.dir.join(p.trim()).display().to_string();
            }
        }
        out
    }

    /// Sync options from `[sync]` and `[limits]`.
    pub(crate) fn sync_options(&self) -> SyncOptions {
        let s = &self.sync;
        let l = &self.limits;
        SyncOptions {
            batch_size: s.batch_size,
            max_in_flight: s.max_in_flight,
            policy: s.policy(),
            on_removed: s.on_removed,
            max_snapshot_age_ms: s.max_snapshot_age_secs.map(|s| s.saturating_mul(1000)),
            limits: Limits {
                per_endpoint: l.per_endpoint,
                per_host: l.per_host,
                host_rate_per_sec: l.host_rate_per_sec,
                hosts: l
                    .host
                    .iter()
                    .map(|(k, h)| {
                        (
                            k.to_ascii_lowercase(),
                            HostLimits {
                                max_in_flight: h.max_in_flight,
                                rate_per_sec: h.rate_per_sec,
                            },
                        )
                    })
                    .collect(),
            },
        }
    }

    /// The webhook URL, if one is configured (read from its variable if so configured).
    pub(crate) fn webhook_url(&self) -> Result<Option<String>> {
        match (&self.alerts.webhook_url, &self.alerts.webhook_url_env) {
            (Some(u), _) => Ok(Some(u.clone())),
            (None, Some(var)) => std::env::var(var)
                .map(Some)
                .map_err(|_| anyhow!("[alerts] webhook_url_env: variable {var} is not set")),
            (None, None) => Ok(None),
        }
    }

    /// How the webhook is reached (`[alerts] webhook_ca_file`, …; paths relative to this
    /// file).
    pub(crate) fn webhook_transport(
        &self,
    ) -> Result<bulwark_adapters::transport::TransportSettings> {
        let a = &self.alerts;
        let mut settings = HashMap::new();
        for (key, path) in [
            ("ca_file", &a.webhook_ca_file),
            ("client_cert_file", &a.webhook_client_cert_file),
            ("client_key_file", &a.webhook_client_key_file),
        ] {
            if let Some(p) = path {
                settings.insert(key.to_string(), self.dir.join(p).display().to_string());
            }
        }
        if let Some(p) = &a.webhook_proxy {
            settings.insert("proxy".to_string(), p.clone());
        }
        bulwark_adapters::transport::TransportSettings::from_settings(&settings)
            .map_err(|e| anyhow!("[alerts] webhook_{}", e.trim_start_matches('`')))
    }

    /// The adapter registry this config needs (built-ins, plus `http` when profiles are
    /// configured), checked by building every endpoint's adapter once: a bad endpoint
    /// fails here, naming it, not in the middle of a sync.
    pub(crate) async fn registry(&self, db: &str) -> Result<AdapterRegistry> {
        let mut registry = bulwark_adapters::default_registry();
        let mut cache: Option<Arc<dyn IdCache>> = None;
        if let Some(h) = &self.http {
            let path = self.dir.join(&h.profiles);
            let profiles = Profiles::load(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
            let c = open_id_cache(db).await?;
            cache = Some(c.clone());
            registry.register(http::ADAPTER_NAME, http::factory(Arc::new(profiles), c));
        }
        if self.endpoints().iter().any(|e| e.adapter == WEBDRIVER) {
            // Recipes' lookups keep portal ids in the same table as the `http` adapter
            // (under `webdriver:<recipe>`). Opened on first use: `bulwark check` of a
            // browser-only configuration does not create the database.
            let ids = cache.unwrap_or_else(|| {
                Arc::new(DatabaseIdCache {
                    db: db.to_owned(),
                    open: tokio::sync::OnceCell::new(),
                })
            });
            registry.register(
                WEBDRIVER,
                webdriver::factory_with_cache(
                    webdriver::WebDriverPool::new(webdriver::PoolConfig::from_env()),
                    Arc::new(webdriver::EnvSecrets),
                    ids,
                ),
            );
        }
        for e in self.endpoints() {
            if e.adapter == http::ADAPTER_NAME && self.http.is_none() {
                return Err(anyhow!(
                    "endpoint {:?}: adapter \"http\" needs its platform profiles: add `[http] profiles = \"profiles.toml\"` (docs/http-adapter.md)",
                    e.id
                ));
            }
            if !registry.names().contains(&e.adapter) {
                let mut known = registry.names();
                if !known.iter().any(|n| n == http::ADAPTER_NAME) {
                    known.push(format!("{} (with [http] profiles)", http::ADAPTER_NAME));
                }
                return Err(anyhow!(
                    "endpoint {:?}: unknown adapter {:?} (known: {})",
                    e.id,
                    e.adapter,
                    known.join(", ")
                ));
            }
            registry
                .build(&e)
                .map_err(|err| anyhow!("endpoint {:?}: {err}", e.id))?;
        }
        Ok(registry)
    }
}

/// The adapter name of the browser adapter.
const WEBDRIVER: &str = "webdriver";

/// The id cache in Bulwark's database at `db`. Bulwark's own schema (migrations, which
/// include the cache's table) comes first: a fresh database must not start with a foreign
/// table in it.
async fn open_id_cache(db: &str) -> Result<Arc<dyn IdCache>> {
    Ok(match bulwark_engine::Backend::open(db).await? {
        bulwark_engine::Backend::Postgres(pg) => Arc::new(PgIdCache::new(pg.pool().clone())),
        bulwark_engine::Backend::Sqlite(lite) => Arc::new(
            SqliteIdCache::new(lite.pool().clone())
                .await
                .map_err(|e| anyhow!("{e}"))?,
        ),
    })
}

/// [`open_id_cache`] on first use.
struct DatabaseIdCache {
    db: String,
    open: tokio::sync::OnceCell<Arc<dyn IdCache>>,
}

impl DatabaseIdCache {
    async fn cache(&self) -> std::result::Result<&Arc<dyn IdCache>, CacheError> {
        self.open
            .get_or_try_init(|| async {
                open_id_cache(&self.db)
                    .await
                    .map_err(|e| CacheError(format!("{e:#}")))
            })
            .await
    }
}

#[async_trait::async_trait]
impl IdCache for DatabaseIdCache {
    async fn get_many(
        &self,
        profile: &str,
        endpoint: &str,
        skus: &[String],
    ) -> std::result::Result<HashMap<String, String>, CacheError> {
        self.cache().await?.get_many(profile, endpoint, skus).await
    }

    async fn put_many(
        &self,
        profile: &str,
        endpoint: &str,
        ids: &[(String, String)],
    ) -> std::result::Result<(), CacheError> {
        self.cache().await?.put_many(profile, endpoint, ids).await
    }

    async fn invalidate(
        &self,
        profile: &str,
        endpoint: &str,
        sku: &str,
    ) -> std::result::Result<(), CacheError> {
        self.cache().await?.invalidate(profile, endpoint, sku).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load_err(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bulwark.toml", text);
        Config::load(&p).unwrap_err().to_string()
    }

    #[test]
    fn a_relative_database_path_is_next_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        for (given, want) in [
            (
                "data/b.db",
                dir.path().join("data/b.db").display().to_string(),
            ),
            (
                "sqlite://b.db",
                format!("sqlite://{}", dir.path().join("b.db").display()),
            ),
            ("/abs/b.db", "/abs/b.db".to_owned()),
            ("postgres://u@h/db", "postgres://u@h/db".to_owned()),
        ] {
            let p = write(
                dir.path(),
                "bulwark.toml",
                &format!("database = {given:?}\n"),
            );
            assert_eq!(
                Config::load(&p).unwrap().database.as_deref(),
                Some(want.as_str()),
                "{given}"
            );
        }
        assert!(load_err("database = \" \"\n").contains("database"));
    }

    #[tokio::test]
    async fn the_shipped_example_is_valid() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bulwark.toml");
        let c = Config::load(&example).unwrap();
        assert_eq!(c.endpoints().len(), 2);
        assert_eq!(c.sync_options().batch_size, 250);
        let dir = tempfile::tempdir().unwrap();
        c.registry(&dir.path().join("x.db").display().to_string())
            .await
            .unwrap();
    }

    #[test]
    fn unknown_keys_are_named_with_file_and_line() {
        let err = load_err("[sync]\nbatch_size = 10\nbatch_sise = 3\n");
        assert!(
            err.contains("bulwark.toml:3:1") && err.contains("batch_sise"),
            "{err}"
        );
        let err = load_err("[limits]\nper_endpont = 2\n");
        assert!(
            err.contains("bulwark.toml:2:1") && err.contains("per_endpont"),
            "{err}"
        );
    }

    #[test]
    fn bad_cron_expressions_are_named_with_line_and_key() {
        let err = load_err("[schedule]\nsync = \"*/15 * * * *\"\n[schedule.x]\n");
        assert!(err.contains("bulwark.toml:3"), "{err}");
        let err = load_err("# c\n[schedule]\nsync = \"every tuesday\"\n");
        assert!(
            err.contains("bulwark.toml:3:8") && err.contains("cron"),
            "{err}"
        );
        let err = load_err("[schedule]\nsnapshot = \"0 2 * * *\"\n");
        assert!(
            err.contains("bulwark.toml:2:1")
                && err.contains("schedule.snapshot")
                && err.contains("[source]"),
            "{err}"
        );
    }

    #[test]
    fn impossible_limits_are_named_with_line_and_key() {
        let err = load_err("[sync]\nmax_in_flight = 0\n");
        assert!(
            err.contains("bulwark.toml:2:1") && err.contains("sync.max_in_flight"),
            "{err}"
        );
        let err =
            load_err("[sync]\nbatch_size = 5\n\nbackoff_base_ms = 9000\nbackoff_max_ms = 10\n");
        assert!(
            err.contains("bulwark.toml:4:1") && err.contains("sync.backoff_base_ms"),
            "{err}"
        );
        let err = load_err("[limits]\nper_endpoint = 1\nper_host = 0\n");
        assert!(
            err.contains("bulwark.toml:3:1") && err.contains("limits.per_host"),
            "{err}"
        );
        let err = load_err("[limits.host.\"a.example\"]\nrate_per_sec = 0\n");
        assert!(
            err.contains("bulwark.toml:2:1") && err.contains("limits.host.a.example.rate_per_sec"),
            "{err}"
        );
        let err = load_err("[alerts]\nwebhook_url = \"ftp://x\"\n");
        assert!(
            err.contains("bulwark.toml:2:1") && err.contains("webhook_url"),
            "{err}"
        );
        let err = load_err(
            "[[endpoint]]\nid = \"e\"\nadapter = \"rest\"\npolicy = { max_attempts = 0 }\n",
        );
        assert!(
            err.contains("\"e\"") && err.contains("max_attempts"),
            "{err}"
        );
    }

    #[test]
    fn limits_policy_overrides_and_schedules_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bulwark.toml",
            r#"
[sync]
max_attempts = 4
[limits]
per_endpoint = 2
per_host = 8
host_rate_per_sec = 50
[limits.host."Portal.Example:8443"]
max_in_flight = 2
[schedule]
sync = "*/5 * * * * *"
reconcile = "0 3 * * 0"
[alerts]
webhook_url = "http://127.0.0.1:9/hook"
[[endpoint]]
id = "a"
adapter = "rest"
settings = { base_url = "http://127.0.0.1:9/ep/a" }
policy = { max_attempts = 9, cooldown_ms = 1000 }
[[endpoint]]
id = "b"
adapter = "rest"
settings = { base_url = "http://127.0.0.1:9/ep/b" }
"#,
        );
        let c = Config::load(&p).unwrap();
        let o = c.sync_options();
        assert_eq!(
            (
                o.limits.per_endpoint,
                o.limits.per_host,
                o.limits.host_rate_per_sec
            ),
            (2, Some(8), Some(50))
        );
        assert_eq!(o.limits.hosts["portal.example:8443"].max_in_flight, Some(2));
        let eps = c.endpoints();
        let a = eps[0].policy.as_ref().unwrap();
        assert_eq!(
            (a.max_attempts, a.cooldown_ms, a.max_failures),
            (9, 1000, 3)
        );
        assert!(eps[1].policy.is_none());
        assert_eq!(c.schedule.sync.as_ref().unwrap().0, "*/5 * * * * *");
        assert_eq!(c.schedule.reconcile.as_ref().unwrap().0, "0 3 * * 0");
        assert_eq!(
            c.webhook_url().unwrap().as_deref(),
            Some("http://127.0.0.1:9/hook")
        );
    }

    #[tokio::test]
    async fn transport_paths_are_relative_to_the_file_and_http_needs_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bulwark.toml",
            "[[endpoint]]\nid = \"a\"\nadapter = \"rest\"\nsettings = { base_url = \"https://shop.example\", ca_file = \"certs/ca.pem\" }\n",
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.endpoints()[0].settings["ca_file"],
            dir.path().join("certs/ca.pem").display().to_string()
        );
        let db = dir.path().join("t.db").display().to_string();
        let err = c.registry(&db).await.err().unwrap().to_string();
        assert!(
            err.contains("\"a\"") && err.contains("certs/ca.pem"),
            "{err}"
        );
        let p = write(
            dir.path(),
            "http.toml",
            "[[endpoint]]\nid = \"h\"\nadapter = \"http\"\n",
        );
        let err = Config::load(&p)
            .unwrap()
            .registry(&db)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("[http] profiles"), "{err}");
    }

    #[test]
    fn duplicate_endpoints_are_refused() {
        let err = load_err(
            "[[endpoint]]\nid = \"x\"\nadapter = \"rest\"\n[[endpoint]]\nid = \"x\"\nadapter = \"rest\"\n",
        );
        assert!(err.contains("appears twice"), "{err}");
    }

    #[tokio::test]
    async fn endpoints_load_from_a_second_file_and_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "eps.toml",
            "[[endpoint]]\nid = \"b\"\nadapter = \"rest\"\nsettings = { base_url = \"http://127.0.0.1:9/ep/b\" }\n",
        );
        let p = write(
            dir.path(),
            "bulwark.toml",
            "endpoints_file = \"eps.toml\"\n[sync]\nbatch_size = 7\n[[endpoint]]\nid = \"a\"\nadapter = \"rest\"\nsettings = { base_url = \"http://127.0.0.1:9/ep/a\" }\n",
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(
            c.endpoints()
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(c.sync_options().batch_size, 7);
        let db = dir.path().join("b.db").display().to_string();
        c.registry(&db).await.unwrap();
        // A REST endpoint without a base URL fails at load, naming the endpoint.
        let p = write(
            dir.path(),
            "bad.toml",
            "[[endpoint]]\nid = \"nourl\"\nadapter = \"rest\"\n",
        );
        let err = Config::load(&p)
            .unwrap()
            .registry(&db)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("nourl"), "{err}");
        let p = write(
            dir.path(),
            "bad2.toml",
            "[[endpoint]]\nid = \"q\"\nadapter = \"carrier-pigeon\"\n",
        );
        let err = Config::load(&p)
            .unwrap()
            .registry(&db)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("carrier-pigeon") && err.contains("\"q\""),
            "{err}"
        );
    }

    /// The field names serde's derive gives a struct (what `deny_unknown_fields` accepts).
    fn fields<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
        struct Probe<'a>(&'a mut Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for Probe<'_> {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                _: V,
            ) -> std::result::Result<V::Value, Self::Error> {
                Err(serde::de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: serde::de::Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> std::result::Result<V::Value, Self::Error> {
                self.0.extend_from_slice(fields);
                Err(serde::de::Error::custom("probed"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut out = Vec::new();
        let _ = T::deserialize(Probe(&mut out));
        assert!(
            !out.is_empty(),
            "{} is not a struct",
            std::any::type_name::<T>()
        );
        out
    }

    #[test]
    fn worker_keys_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "w.toml",
            "[worker]\nlease_ms = 9000\neffect_margin_ms = 2000\ncapacity = 50\nclaim_chunk = 20\npoll_ms = 500\n",
        );
        let c = Config::load(&p).unwrap();
        assert_eq!(
            (
                c.worker.lease_ms,
                c.worker.effect_margin_ms,
                c.worker.capacity,
                c.worker.claim_chunk,
                c.worker.poll_ms
            ),
            (Some(9000), Some(2000), Some(50), Some(20), Some(500))
        );
        for (text, key) in [
            (
                "[worker]\nlease_ms = 9000\neffect_margin_ms = 9000\n",
                "worker.effect_margin_ms",
            ),
            ("[worker]\nlease_ms = 10\n", "worker.lease_ms"),
            ("[worker]\ncapacity = 0\n", "worker.capacity"),
            ("[worker]\nclaim_chunk = 0\n", "worker.claim_chunk"),
            ("[worker]\nlease = 10\n", "lease"),
        ] {
            let p = write(dir.path(), "bad.toml", text);
            let err = Config::load(&p).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("bad.toml"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn the_reference_lists_every_key() {
        // Every key the configuration types accept, spelled as the reference spells it.
        let sections: Vec<(&str, Vec<&str>)> = vec![
            ("sync", fields::<SyncSection>()),
            ("limits", fields::<LimitsSection>()),
            ("limits.host.\"H\"", fields::<HostSection>()),
            ("alerts", fields::<AlertsSection>()),
            ("schedule", fields::<ScheduleSection>()),
            ("worker", fields::<WorkerSection>()),
            ("source", fields::<SourceSection>()),
            ("http", fields::<HttpSection>()),
            ("endpoint", fields::<EndpointEntry>()),
        ];
        let mut expected = std::collections::BTreeSet::new();
        for top in fields::<Config>() {
            if !sections.iter().any(|(s, _)| *s == top) {
                expected.insert(top.to_string());
            }
        }
        for (section, keys) in &sections {
            for key in keys {
                let full = format!("{section}.{key}");
                // `limits.host` is the table of per-host sections, listed by their keys.
                if !sections
                    .iter()
                    .any(|(s, _)| s.starts_with(&format!("{full}.")))
                {
                    expected.insert(full);
                }
            }
        }
        // An endpoint's policy takes the [sync] policy keys.
        let sync = fields::<SyncSection>();
        for key in fields::<PolicyOverrides>() {
            assert!(sync.contains(&key), "policy key {key} is not a [sync] key");
        }

        let reference = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md"),
        )
        .unwrap();
        let table = &reference[reference.find("## Every key").expect("the key table")..];
        let documented: std::collections::BTreeSet<String> = table
            .lines()
            .take_while(|l| !l.starts_with("Adapter settings"))
            .filter_map(|l| l.strip_prefix("| `"))
            .map(|l| l[..l.find('`').unwrap()].to_string())
            .collect();
        let missing: Vec<_> = expected.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&expected).collect();
        assert!(
            missing.is_empty() && stale.is_empty(),
            "docs/configuration.md: keys without a row: {missing:?}; rows of no key: {stale:?}"
        );

        // The reference's example file uses only real keys, with valid values.
        let start = reference.find("```toml\n").unwrap() + 8;
        let example = &reference[start..start + reference[start..].find("```").unwrap()];
        if let Err(e) = toml::from_str::<Config>(example) {
            panic!("docs/configuration.md example: {e}");
        }
    }
}
