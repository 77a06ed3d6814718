//! The declarative HTTP adapter: REST and GraphQL platforms by configuration.
//!
//! A **platform profile** (TOML, `[profiles.NAME]`) describes how a platform is spoken to:
//! authentication (static header, or a login whose token is cached, renewed before it
//! expires and refreshed once on 401), an optional **lookup** of the platform's own ids
//! for SKUs (cached in Bulwark's database by an [`IdCache`]), the **write** (per batch in
//! chunks, or per item; a method, URL, headers and a JSON body template, or a GraphQL
//! operation with variables; an optional idempotency-key header), **error rules** that
//! classify failures reported inside 200 responses, the **read-back** used by verify
//! (JSON paths for quantity and prices, minor units or decimals, currency), and an
//! optional **probe** by key. Templates are [minijinja]; JSON paths are RFC 9535
//! ([serde_json_path]). See `docs/http-adapter.md` for the reference and two worked
//! examples.
//!
//! Many endpoints share a profile. An endpoint picks one with `settings["profile"]` and
//! gives its own values in `settings`: `base_url`, optional `timeout_ms` and `currency`,
//! the profile's declared settings, and, for each declared secret `NAME`, `NAME_env`: the
//! name of the environment variable holding it. Secret values are resolved through a
//! [`Secrets`] lookup and never appear in errors (hence never in the journal), logs or
//! `Debug` output; request and response bodies logged on failure are redacted.
//!
//! Exactly once: with `write.idempotency_header` the platform de-duplicates re-sends;
//! with a `probe` the state machine asks before re-sending. Without either, a probe
//! answers "unknown" and the following upload first **reads back** the batch and writes
//! only the items that do not show their values yet (verify before re-send).

mod adapter;
mod cache;
mod profile;
mod secrets;

use std::sync::Arc;

pub use adapter::{
    DEFAULT_RETRY_AFTER_MS, DEFAULT_TIMEOUT_MS, HttpAdapter, MAX_EXCERPT_CHARS,
    MAX_MISMATCHES_SHOWN,
};
pub use cache::{CacheError, IdCache, MemoryIdCache, PgIdCache, SqliteIdCache};
pub use profile::{
    AuthConfig, AuthKind, ErrorClass, ErrorRule, GraphqlConfig, LookupConfig, Mode, PriceUnit,
    ProbeConfig, Profile, ProfileConfig, ProfileError, Profiles, ReadConfig, RequestConfig,
    WriteConfig,
};
pub use secrets::{EnvSecrets, MapSecrets, REDACTED, Redactor, Secrets};

use bulwark_workflows::adapter::{AdapterFactory, EndpointConfig, PortalAdapter};

/// The adapter name to register the factory under.
pub const ADAPTER_NAME: &str = "http";

/// A registry factory (register it as [`ADAPTER_NAME`]) building [`HttpAdapter`]s from
/// `profiles`, with secrets from the environment. Every adapter it builds shares one HTTP
/// client (connection pool) per distinct transport ([`crate::transport`]) and the id `cache`.
pub fn factory(profiles: Arc<Profiles>, cache: Arc<dyn IdCache>) -> AdapterFactory {
    factory_with(profiles, cache, Arc::new(EnvSecrets))
}

/// Like [`factory`], with secrets from `secrets` (e.g. a [`MapSecrets`] in tests).
pub fn factory_with(
    profiles: Arc<Profiles>,
    cache: Arc<dyn IdCache>,
    secrets: Arc<dyn Secrets>,
) -> AdapterFactory {
    let clients = crate::transport::ClientPool::new();
    Arc::new(move |config: &EndpointConfig| {
        let client = clients
            .endpoint_client(&config.id, &config.settings)
            .map_err(bulwark_workflows::adapter::AdapterError::Config)?;
        let adapter: Arc<dyn PortalAdapter> = Arc::new(HttpAdapter::new(
            config,
            &profiles,
            cache.clone(),
            secrets.as_ref(),
            client,
        )?);
        Ok(adapter)
    })
}
