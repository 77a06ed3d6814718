//! The portal adapter contract: what every endpoint integration implements.
//!
//! Adapters are trait objects (`Arc<dyn PortalAdapter>`) so programs that embed Bulwark can
//! register their own next to the built-in ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::catalog::Batch;

/// What an endpoint returned when it accepted a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The endpoint's own reference for the accepted upload (or the idempotency key).
    pub id: String,
}

/// The outcome of reading a batch back from an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verification {
    /// Every item shows the batch's values.
    Verified,
    /// Some items differ; `details` names the first differences.
    Mismatch {
        /// Human-readable description of the differences (no secrets).
        details: String,
    },
}

/// What reading a batch's items back found, item by item: what reconcile repairs from.
/// A SKU is in exactly one of `matching`, `differing` and `unread`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadBack {
    /// SKUs the endpoint shows with the batch's values.
    pub matching: Vec<String>,
    /// SKUs it shows with other values, or does not show at all.
    pub differing: Vec<Difference>,
    /// SKUs that could not be read (read again another time, never assumed either way).
    pub unread: Vec<String>,
    /// Why the first of `unread` could not be read.
    pub unread_error: Option<AdapterError>,
}

/// One SKU an endpoint shows differently from what it should.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    /// The SKU (as sent).
    pub sku: String,
    /// What differs, e.g. `qty expected 5 shown 3` or `not shown` (no secrets).
    pub detail: String,
}

/// How many differing SKUs a mismatch names at most.
pub const MAX_DIFFERENCES_SHOWN: usize = 5;

impl Verification {
    /// The verdict on `items` items read back, of which `differing` differ: `Verified`
    /// when none does, else a mismatch naming the first [`MAX_DIFFERENCES_SHOWN`].
    pub fn of(items: usize, differing: &[Difference]) -> Verification {
        if differing.is_empty() {
            return Verification::Verified;
        }
        let shown: Vec<String> = differing
            .iter()
            .take(MAX_DIFFERENCES_SHOWN)
            .map(|d| format!("{}: {}", d.sku, d.detail))
            .collect();
        let more = match differing.len().saturating_sub(shown.len()) {
            0 => String::new(),
            n => format!("; and {n} more"),
        };
        Verification::Mismatch {
            details: format!(
                "{} of {items} items differ: {}{more}",
                differing.len(),
                shown.join("; ")
            ),
        }
    }
}

impl ReadBack {
    /// Sort `items` into matching, differing (`differs` says how, `None`: it matches) and
    /// unread (`unread` says why, checked first).
    pub fn of<'a>(
        items: &[crate::catalog::Item],
        unread: impl Fn(&str) -> Option<&'a AdapterError>,
        mut differs: impl FnMut(&crate::catalog::Item) -> Option<String>,
    ) -> ReadBack {
        let mut out = ReadBack::default();
        for item in items {
            if let Some(e) = unread(&item.sku) {
                if out.unread_error.is_none() {
                    out.unread_error = Some(e.clone());
                }
                out.unread.push(item.sku.clone());
            } else if let Some(detail) = differs(item) {
                out.differing.push(Difference {
                    sku: item.sku.clone(),
                    detail,
                });
            } else {
                out.matching.push(item.sku.clone());
            }
        }
        out
    }
}

/// A classified adapter failure. The class decides what the state machine does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdapterError {
    /// Timeout, connection reset, 5xx: retry with backoff.
    #[error("transient: {0}")]
    Transient(String),
    /// 429 or equivalent: retry no sooner than `retry_after_ms`.
    #[error("rate limited (retry after {retry_after_ms} ms): {message}")]
    RateLimited {
        /// Delay the endpoint asked for, in milliseconds.
        retry_after_ms: u64,
        /// What the endpoint said.
        message: String,
    },
    /// Transient (a 503 or another 5xx), and the endpoint said when to come back
    /// (`Retry-After`): retry no sooner than `retry_after_ms`.
    #[error("unavailable (retry after {retry_after_ms} ms): {message}")]
    Unavailable {
        /// Delay the endpoint asked for, in milliseconds.
        retry_after_ms: u64,
        /// What the endpoint said.
        message: String,
    },
    /// The endpoint refused the data (a failed validation; counts toward the circuit).
    #[error("rejected: {0}")]
    Rejected(String),
    /// Credentials refused.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// Some items of the call were settled, others not: an adapter that handles items one
    /// by one (or a bulk API that answers per item) reports what it got done, so that a
    /// retry repeats only the rest and one refused item does not fail its batch.
    #[error("{0}")]
    Partial(Box<Partial>),
    /// The endpoint's configuration is unusable.
    #[error("configuration error: {0}")]
    Config(String),
    /// Not sent: this worker's lease on the workflow is lost or about to run out (effect
    /// fencing, [`bulwark_engine::fence`]). The runtime drops the call's result without
    /// journaling it; the worker that holds the workflow now goes on from the journal.
    #[error("not sent: {0}")]
    Fenced(String),
}

impl From<bulwark_engine::fence::Fenced> for AdapterError {
    fn from(e: bulwark_engine::fence::Fenced) -> Self {
        AdapterError::Fenced(e.to_string())
    }
}

/// Check effect fencing before sending a request: call it right before every request an
/// adapter sends (also each one inside a per-item loop, a lookup or a pagination), and
/// return its error as it is. Outside a workflow (a probe, `bulwark check`) it allows all.
pub fn fence_check() -> AdapterResult<()> {
    bulwark_engine::fence::check().map_err(AdapterError::from)
}

/// What an adapter settled in a call that did not settle every item.
///
/// From [`PortalAdapter::upload`]: `done` items were applied, `rejected` ones were refused
/// by the platform for what they carry (a value out of range, a SKU it does not know; the
/// sync quarantines them and goes on), and `rest`, if set, says why the remaining items
/// did not land (classified like any failure: transient ones are retried, only for them).
/// From [`PortalAdapter::verify`]: `done` items were read back and show the batch's
/// values, and `rest` says why the others could not be read (`rejected` is not used).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Partial {
    /// SKUs settled (applied, or read back matching).
    pub done: Vec<String>,
    /// SKUs the platform refused, with its message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<ItemRejection>,
    /// Why the items neither done nor rejected were not settled (`None`: there are none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rest: Option<AdapterError>,
    /// Items of `done` written with a lower quantity than the batch's (compare-and-set
    /// stock, [`crate::catalog::Cas`]: the shop sold some since Bulwark's last write), and
    /// the quantity written. An upload that lowered items answers `Partial` with every
    /// item in `done` and no `rest` (a success), so that the runtime journals them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adjusted: Vec<Adjusted>,
}

/// An item written with another quantity than its batch's (see [`Partial::adjusted`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjusted {
    /// The SKU.
    pub sku: String,
    /// The quantity written (and shown by the endpoint right after).
    pub qty: i64,
}

/// One item a platform refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRejection {
    /// The SKU.
    pub sku: String,
    /// What the platform said (no secrets).
    pub message: String,
    /// Not refused by the platform, but left as it has it by the endpoint's policy
    /// (compare-and-set stock with `on_conflict = "skip_and_alert"`: the shop sold some
    /// since). Quarantined like a refusal, but it never counts toward a refusal of the
    /// whole batch.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} item(s) settled", self.done.len())?;
        if let Some(first) = self.rejected.first() {
            write!(
                f,
                ", {} refused (first: {}: {})",
                self.rejected.len(),
                first.sku,
                first.message
            )?;
        }
        if let Some(rest) = &self.rest {
            write!(f, "; the others: {rest}")?;
        }
        Ok(())
    }
}

impl AdapterError {
    /// A [`AdapterError::Partial`] (or `rest` alone when nothing was settled or refused).
    pub fn partial(
        done: Vec<String>,
        rejected: Vec<ItemRejection>,
        rest: Option<AdapterError>,
    ) -> AdapterError {
        match rest {
            Some(rest) if done.is_empty() && rejected.is_empty() => rest,
            rest => AdapterError::Partial(Box::new(Partial {
                done,
                rejected,
                rest,
                adjusted: Vec::new(),
            })),
        }
    }

    /// Is this failure worth retrying (the call may succeed later unchanged)?
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            AdapterError::Transient(_)
                | AdapterError::RateLimited { .. }
                | AdapterError::Unavailable { .. }
                | AdapterError::Fenced(_)
        )
    }
}

/// Result alias for adapter calls.
pub type AdapterResult<T> = Result<T, AdapterError>;

/// One endpoint integration. Implementations must be safe to call concurrently for
/// different endpoints; the runtime never runs two calls for the same endpoint at once.
#[async_trait]
pub trait PortalAdapter: Send + Sync {
    /// Send a batch (absolute values) tagged with its idempotency key. `Ok` means every
    /// item was applied; an adapter that can tell items apart answers
    /// [`AdapterError::Partial`] when only some were (see [`Partial`]). A retry then carries
    /// only the items not yet settled ([`Batch::remainder`]).
    async fn upload(&self, batch: &Batch) -> AdapterResult<Receipt>;
    /// Read the batch's items back and compare them with the batch. When only some items
    /// could be read, answer [`AdapterError::Partial`] with those that match (unless one
    /// differs: that is a [`Verification::Mismatch`]).
    async fn verify(&self, batch: &Batch, receipt: &Receipt) -> AdapterResult<Verification>;
    /// Has an upload with this key already landed? Used before any re-send.
    async fn probe(&self, endpoint: &str, key: Uuid) -> AdapterResult<Option<Receipt>>;
    /// Does the platform deduplicate a repeated upload by its idempotency key? When it
    /// does not, the worker confirms its lease with the database (one query) right
    /// before each upload, so that an upload journaled by a worker that has since lost
    /// the workflow is not sent (see `bulwark_engine::runtime::WorkflowCtx::confirm_lease`).
    fn deduplicates(&self) -> bool {
        true
    }
    /// Can this adapter write stock compare-and-set ([`crate::catalog::Batch::cas`]):
    /// send a quantity only if the endpoint still shows the one compared with, and say
    /// what it wrote when it lowered one ([`Partial::adjusted`])? An endpoint whose
    /// `stock_policy` is `compare_and_set` is refused unless its adapter can.
    fn compares_stock(&self) -> bool {
        false
    }
    /// Read the batch's items back and say, item by item, which show the batch's values
    /// and which do not (reconcile: `bulwark reconcile`). No write, no idempotency key
    /// involved. An adapter that cannot tell items apart keeps the default, which answers
    /// a configuration error: its endpoints are not reconciled.
    async fn read_back(&self, batch: &Batch) -> AdapterResult<ReadBack> {
        let _ = batch;
        Err(AdapterError::Config(READ_BACK_UNSUPPORTED.into()))
    }
}

/// What the default [`PortalAdapter::read_back`] answers.
pub const READ_BACK_UNSUPPORTED: &str = "this adapter cannot read items back one by one";

/// Settings an adapter factory receives for one endpoint (from config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfig {
    /// Endpoint id (unique).
    pub id: String,
    /// Adapter name in the registry, e.g. `"rest"`.
    pub adapter: String,
    /// Free-form adapter settings (URL, timeouts, ...). Secrets are referenced by
    /// environment variable name, never stored here.
    #[serde(default)]
    pub settings: HashMap<String, String>,
    /// This endpoint's retry and circuit policy, if it differs from the run's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::endpoint_sync::SyncPolicy>,
}

impl EndpointConfig {
    /// A short, stable digest of everything that decides how this endpoint is reached
    /// (adapter, settings, policy; not its id): two workers with the same fingerprint for
    /// an endpoint send the same requests. Settings name secrets by variable, so no secret
    /// goes into it.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut settings: Vec<(&String, &String)> = self.settings.iter().collect();
        settings.sort();
        let canonical = serde_json::json!({
            "adapter": self.adapter,
            "settings": settings,
            "policy": self.policy,
        });
        let digest = sha2::Sha256::digest(canonical.to_string().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Builds an adapter for an endpoint.
pub type AdapterFactory =
    Arc<dyn Fn(&EndpointConfig) -> AdapterResult<Arc<dyn PortalAdapter>> + Send + Sync>;

/// Maps adapter names (as used in config) to factories.
#[derive(Clone, Default)]
pub struct AdapterRegistry {
    factories: HashMap<String, AdapterFactory>,
}

impl AdapterRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register (or replace) the factory for `name`.
    pub fn register(&mut self, name: impl Into<String>, factory: AdapterFactory) -> &mut Self {
        self.factories.insert(name.into(), factory);
        self
    }

    /// Names of all registered adapters, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.factories.keys().cloned().collect();
        v.sort();
        v
    }

    /// Build the adapter an endpoint's config names.
    pub fn build(&self, endpoint: &EndpointConfig) -> AdapterResult<Arc<dyn PortalAdapter>> {
        let factory = self.factories.get(&endpoint.adapter).ok_or_else(|| {
            AdapterError::Config(format!(
                "endpoint {:?}: unknown adapter {:?} (known: {})",
                endpoint.id,
                endpoint.adapter,
                self.names().join(", ")
            ))
        })?;
        let adapter = factory(endpoint)?;
        let compares =
            crate::sync::endpoint_compares_stock(endpoint).map_err(AdapterError::Config)?;
        if compares && !adapter.compares_stock() {
            return Err(AdapterError::Config(format!(
                "endpoint {:?}: `stock_policy = \"compare_and_set\"` needs an adapter that writes stock compare-and-set; adapter {:?} does not (for the http adapter: a profile with a `conflict` table and `item.confirmed_qty` in its stock write)",
                endpoint.id, endpoint.adapter
            )));
        }
        Ok(adapter)
    }
}

impl std::fmt::Debug for AdapterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterRegistry")
            .field("adapters", &self.names())
            .finish()
    }
}

/// Convenience: a retry delay as a [`Duration`].
pub fn retry_after(err: &AdapterError) -> Option<Duration> {
    match err {
        AdapterError::RateLimited { retry_after_ms, .. }
        | AdapterError::Unavailable { retry_after_ms, .. } => {
            Some(Duration::from_millis(*retry_after_ms))
        }
        AdapterError::Partial(p) => p.rest.as_ref().and_then(retry_after),
        _ => None,
    }
}
