//! Bulwark's portal adapters.
//!
//! This crate holds the concrete implementations of the
//! [`PortalAdapter`](bulwark_workflows::adapter::PortalAdapter) contract and the tooling
//! used to exercise them:
//!
//! * [`rest`] — [`RestAdapter`](rest::RestAdapter), the REST/JSON integration (registered
//!   as `"rest"`). All REST adapters built by one registry share a single pooled HTTP
//!   client.
//! * [`http`] — [`HttpAdapter`](http::HttpAdapter), the declarative HTTP adapter: REST and
//!   GraphQL platforms described by TOML profiles (see `docs/http-adapter.md`). It needs
//!   profiles and an id cache, so it is not in [`default_registry`]: register
//!   [`http::factory`] as `"http"`.
//! * [`sim_api`] — [`ApiSimulator`](sim_api::ApiSimulator), a simulator of two platform
//!   API styles (per-item REST with login and lookups; GraphQL with errors in 200s).
//! * [`sim_tls`] — HTTPS (and mutual TLS) for the simulators.
//! * [`simulator`] — [`PortalSimulator`](simulator::PortalSimulator), an axum server on
//!   loopback that serves many virtual endpoints on one port, with fault profiles and an
//!   optional durable (SQLite) record of deliveries and applied batches used to assert
//!   exactly-once delivery.
//! * [`transport`] — TLS (rustls), trust, client certificates and proxies of every HTTP
//!   client, pooled by settings, and the description of a failed request.
//! * [`webhook`] — [`WebhookSink`](webhook::WebhookSink), alerts POSTed as JSON.
//! * [`memory`] — [`MemoryPortal`](memory::MemoryPortal), a fast in-process adapter for
//!   engine benchmarks. It is not registered by name; build it programmatically and
//!   register it yourself if needed.
//!
//! [`default_registry`] returns an [`AdapterRegistry`] with every built-in, config-usable
//! adapter.

pub mod http;
pub mod legacy;
pub mod memory;
pub mod rest;
pub mod sim_api;
pub mod sim_tls;
pub mod sim_webui;
pub mod simulator;
pub mod sql_source;
pub mod text;
pub mod transport;
pub mod webdriver;
pub mod webhook;

use bulwark_workflows::adapter::AdapterRegistry;

/// A registry with the built-in adapters that can be named in configuration:
///
/// * `"rest"` — [`rest::RestAdapter`]; every adapter it builds shares one HTTP client
///   (see [`rest::RestAdapter::factory`]).
/// * `"webdriver"` — [`webdriver::WebDriverAdapter`], recipe-driven headless Chromium; every
///   adapter it builds shares one lazily started [`webdriver::WebDriverPool`] configured
///   from the environment ([`webdriver::PoolConfig::from_env`]) and reads secrets from
///   environment variables. Use [`webdriver::factory`] for another pool or secret source.
///
/// [`memory::MemoryPortal`] is intentionally not registered: it is used programmatically.
pub fn default_registry() -> AdapterRegistry {
    let mut registry = AdapterRegistry::new();
    registry.register("rest", rest::RestAdapter::factory());
    registry.register(
        "webdriver",
        webdriver::factory(
            webdriver::WebDriverPool::new(webdriver::PoolConfig::from_env()),
            std::sync::Arc::new(webdriver::EnvSecrets),
        ),
    );
    registry
}
