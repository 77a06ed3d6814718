//! `bulwark.toml`: the database, sync limits, the retry/circuit policy, adapter resources
//! (HTTP platform profiles) and the endpoints. Unknown keys, bad values and broken
//! endpoints fail at load, naming the file, line and key.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bulwark_adapters::http::{self, IdCache, PgIdCache, Profiles, SqliteIdCache};
use bulwark_workflows::adapter::{AdapterRegistry, EndpointConfig};
use bulwark_workflows::endpoint_sync::SyncPolicy;
use bulwark_workflows::sync::SyncOptions;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Bulwark's database (path or URL); `--db` / `BULWARK_DB` override it.
    pub(crate) database: Option<String>,
    #[serde(default)]
    pub(crate) sync: SyncSection,
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

/// `[sync]`: batch size, concurrency, retry and circuit policy.
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
        }
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
    settings: std::collections::HashMap<String, String>,
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

fn parse<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| position(path, &text, s.start))
            .unwrap_or_else(|| path.display().to_string());
        anyhow::anyhow!("{at}: {}", e.message())
    })
}

impl Config {
    /// Load and validate `path`.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let mut config: Config = parse(path)?;
        config.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let s = &config.sync;
        let file = path.display();
        if s.batch_size == 0 {
            bail!("{file}: [sync] batch_size must be at least 1");
        }
        if s.max_in_flight == 0 {
            bail!("{file}: [sync] max_in_flight must be at least 1");
        }
        if s.max_failures == 0 || s.max_attempts == 0 {
            bail!("{file}: [sync] max_failures and max_attempts must be at least 1");
        }
        if s.backoff_base_ms > s.backoff_max_ms {
            bail!(
                "{file}: [sync] backoff_base_ms ({}) exceeds backoff_max_ms ({})",
                s.backoff_base_ms,
                s.backoff_max_ms
            );
        }
        if let Some(extra) = &config.endpoints_file {
            let extra_path = config.dir.join(extra);
            let more: EndpointsFile = parse(&extra_path)?;
            config.endpoints.extend(more.endpoints);
        }
        let mut seen = HashSet::new();
        for e in &config.endpoints {
            if e.id.trim().is_empty() {
                bail!("{file}: an [[endpoint]] has an empty id");
            }
            if !seen.insert(e.id.clone()) {
                bail!("{file}: endpoint id {:?} appears twice", e.id);
            }
        }
        Ok(config)
    }

    /// The endpoints, as adapters see them.
    pub(crate) fn endpoints(&self) -> Vec<EndpointConfig> {
        self.endpoints
            .iter()
            .map(|e| EndpointConfig {
                id: e.id.clone(),
                adapter: e.adapter.clone(),
                settings: e.settings.clone(),
            })
            .collect()
    }

    /// Sync options from `[sync]`.
    pub(crate) fn sync_options(&self) -> SyncOptions {
        let s = &self.sync;
        SyncOptions {
            batch_size: s.batch_size,
            max_in_flight: s.max_in_flight,
            policy: SyncPolicy {
                max_failures: s.max_failures,
                max_attempts: s.max_attempts,
                backoff_base_ms: s.backoff_base_ms,
                backoff_max_ms: s.backoff_max_ms,
                cooldown_ms: s.cooldown_ms,
            },
        }
    }

    /// The adapter registry this config needs (built-ins, plus `http` when profiles are
    /// configured), checked by building every endpoint's adapter once: a bad endpoint
    /// fails here, naming it, not in the middle of a sync.
    pub(crate) async fn registry(&self, db: &str) -> Result<AdapterRegistry> {
        let mut registry = bulwark_adapters::default_registry();
        if let Some(h) = &self.http {
            let path = self.dir.join(&h.profiles);
            let profiles =
                Profiles::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let cache: Arc<dyn IdCache> = if crate::is_postgres(db) {
                match bulwark_engine::Backend::open(db).await? {
                    bulwark_engine::Backend::Postgres(pg) => {
                        Arc::new(PgIdCache::new(pg.pool().clone()))
                    }
                    bulwark_engine::Backend::Sqlite(_) => {
                        unreachable!("a postgres URL opens PostgreSQL")
                    }
                }
            } else {
                Arc::new(
                    SqliteIdCache::connect(db.strip_prefix("sqlite://").unwrap_or(db))
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                )
            };
            registry.register(http::ADAPTER_NAME, http::factory(Arc::new(profiles), cache));
        }
        for e in self.endpoints() {
            registry
                .build(&e)
                .map_err(|err| anyhow::anyhow!("endpoint {:?}: {err}", e.id))?;
        }
        Ok(registry)
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
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "bulwark.toml",
            "[sync]\nbatch_size = 10\nbatch_sise = 3\n",
        );
        let err = Config::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("bulwark.toml:3:1") && err.contains("batch_sise"),
            "{err}"
        );
    }

    #[test]
    fn impossible_limits_and_duplicate_endpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "a.toml", "[sync]\nmax_in_flight = 0\n");
        assert!(
            Config::load(&p)
                .unwrap_err()
                .to_string()
                .contains("max_in_flight")
        );
        let p = write(
            dir.path(),
            "b.toml",
            "[[endpoint]]\nid = \"x\"\nadapter = \"rest\"\n[[endpoint]]\nid = \"x\"\nadapter = \"rest\"\n",
        );
        assert!(
            Config::load(&p)
                .unwrap_err()
                .to_string()
                .contains("appears twice")
        );
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
}
