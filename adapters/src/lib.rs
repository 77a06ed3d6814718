//! Bulwark's portal adapters.
//!
//! This crate holds the concrete implementations of the
//! [`PortalAdapter`](bulwark_workflows::adapter::PortalAdapter) contract and the tooling
//! used to exercise them:
//!
//! * [`rest`] — [`RestAdapter`](rest::RestAdapter), the REST/JSON integration (registered
//!   as `"rest"`). All REST adapters built by one registry share a single pooled HTTP
//!   client.
//! * [`simulator`] — [`PortalSimulator`](simulator::PortalSimulator), an axum server on
//!   loopback that serves many virtual endpoints on one port, with fault profiles and an
//!   optional durable (SQLite) record of deliveries and applied batches used to assert
//!   exactly-once delivery.
//! * [`memory`] — [`MemoryPortal`](memory::MemoryPortal), a fast in-process adapter for
//!   engine benchmarks. It is not registered by name; build it programmatically and
//!   register it yourself if needed.
//!
//! [`default_registry`] returns an [`AdapterRegistry`] with every built-in, config-usable
//! adapter.

pub mod legacy;
pub mod memory;
pub mod rest;
pub mod simulator;

use bulwark_workflows::adapter::AdapterRegistry;

/// A registry with the built-in adapters that can be named in configuration:
///
/// * `"rest"` — [`rest::RestAdapter`]; every adapter it builds shares one HTTP client
///   (see [`rest::RestAdapter::factory`]).
///
/// [`memory::MemoryPortal`] is intentionally not registered: it is used programmatically.
pub fn default_registry() -> AdapterRegistry {
    let mut registry = AdapterRegistry::new();
    registry.register("rest", rest::RestAdapter::factory());
    registry
}
