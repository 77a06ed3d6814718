//! Bulwark's domain workflows: the endpoint-sync and snapshot state machines, the catalog
//! model, snapshot diffing and batching, and the portal adapter contract.

pub mod adapter;
pub mod catalog;
// statig generates the public `State` enum from the handlers; its variants and fields are
// documented on the handler functions, which the lint cannot see.
#[allow(missing_docs)]
pub mod endpoint_sync;
pub mod error;
pub mod itemset;
pub mod mapping;
pub mod metrics;
pub mod preview;
pub mod reconcile;
pub mod staging;
pub mod sync;

pub use error::{Result, SyncError};
pub mod app;
pub mod snapshot;
pub mod snapshot_flow;
