//! Reconcile: repair drift. Read back what each endpoint shows (in batches, through its
//! adapter's [`PortalAdapter::read_back`](crate::adapter::PortalAdapter::read_back)),
//! compare it with the snapshot the endpoint last confirmed, and plan a sync run that sends
//! the drifted items again (at the target snapshot's values) along with whatever the diff
//! sends anyway. Reading has no effect; the repair is an ordinary sync: same journal, same
//! idempotency keys, same exactly-once protocol (the drifted SKUs are part of each
//! endpoint sync's journaled input, [`SyncInput::repair`](crate::endpoint_sync::SyncInput)).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use uuid::Uuid;

use crate::adapter::{AdapterError, Difference, EndpointConfig, READ_BACK_UNSUPPORTED};
use crate::catalog::{Batch, Item, KEY_NAMESPACE};
use crate::endpoint_sync::SyncPolicy;
use crate::error::Result;
use crate::mapping::EndpointMapping;
use crate::staging::{OnRemoved, ReconcileRow, Staging};
use crate::sync::{DiffCache, SyncEffects, SyncOptions};

/// How many differences an endpoint's record names.
pub const DIFFERENCES_RECORDED: usize = 5;

/// What reconcile found at one endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EndpointDrift {
    /// Endpoint id.
    pub endpoint: String,
    /// The snapshot it had confirmed, which what it shows was compared with.
    pub snapshot: Option<i64>,
    /// Items read back (matching or not).
    pub read: u64,
    /// Items it shows with other values than it confirmed, or not at all.
    pub drifted: Vec<Difference>,
    /// Items that could not be read (neither repaired nor assumed right).
    pub unread: u64,
    /// Why it was not read, or not completely (`None`: every item was tried).
    pub skipped: Option<String>,
}

impl EndpointDrift {
    fn skipped(endpoint: &str, snapshot: Option<i64>, why: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            snapshot,
            skipped: Some(why.into()),
            ..Self::default()
        }
    }

    /// The record of this finding, repaired by `run`.
    pub fn row(&self, at: i64, run: Option<i64>) -> ReconcileRow {
        ReconcileRow {
            endpoint: self.endpoint.clone(),
            at,
            snapshot: self.snapshot,
            read: self.read,
            drifted: self.drifted.len() as u64,
            unread: self.unread,
            run,
            skipped: self.skipped.clone(),
            detail: self
                .drifted
                .iter()
                .take(DIFFERENCES_RECORDED)
                .map(|d| format!("{}: {}", d.sku, d.detail))
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// The key a read-back batch carries (adapters may use it in requests; nothing is written
/// with it).
fn read_key(endpoint: &str, snapshot: i64, index: u32) -> Uuid {
    let name = format!("reconcile\u{1f}{endpoint}\u{1f}{snapshot}\u{1f}{index}");
    Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes())
}

/// Read back every endpoint of `endpoints` that has confirmed a sync and is neither busy
/// (`busy`: subjects of unfinished syncs) nor paused (`paused`: held subjects, which are
/// not even read), and report its drift.
pub async fn find_drift(
    staging: &Staging,
    diffs: &DiffCache,
    effects: &SyncEffects,
    endpoints: &[EndpointConfig],
    options: &SyncOptions,
    busy: &HashSet<String>,
    paused: &HashSet<String>,
) -> Result<Vec<EndpointDrift>> {
    let confirmed = staging.confirmed_with_mapping().await?;
    let mut quarantined: HashMap<String, HashSet<String>> = HashMap::new();
    for q in staging.quarantine().await? {
        quarantined.entry(q.endpoint).or_default().insert(q.sku);
    }
    // What each endpoint should show, decided before any read (cheap, and a bad
    // setting fails before anything is read).
    let mut work = Vec::new();
    let mut out = Vec::new();
    for ep in endpoints {
        let on_removed = crate::sync::endpoint_on_removed(ep, options)?;
        let mapping = EndpointMapping::from_settings(&ep.settings)?;
        let policy = ep.policy.clone().unwrap_or_else(|| options.policy.clone());
        let Some((snapshot, key)) = confirmed.get(&ep.id).cloned() else {
            out.push(EndpointDrift::skipped(
                &ep.id,
                None,
                "it never confirmed a sync (its first sync sends everything)",
            ));
            continue;
        };
        if paused.contains(&ep.id) {
            out.push(EndpointDrift::skipped(
                &ep.id,
                Some(snapshot),
                "an operator paused it (`bulwark resume` lifts that)",
            ));
            continue;
        }
        if busy.contains(&ep.id) {
            out.push(EndpointDrift::skipped(
                &ep.id,
                Some(snapshot),
                "a sync of it is still running",
            ));
            continue;
        }
        if key != mapping.as_ref().map(EndpointMapping::cache_key) {
            out.push(EndpointDrift::skipped(
                &ep.id,
                Some(snapshot),
                "its mapping changed since it confirmed (its next sync sends everything)",
            ));
            continue;
        }
        work.push((ep, snapshot, mapping, on_removed, policy));
    }
    let batch_size = options.batch_size.max(1) as usize;
    let mut reads = Vec::with_capacity(work.len());
    for (ep, snapshot, mapping, on_removed, policy) in &work {
        reads.push(read_endpoint(
            diffs,
            effects,
            &ep.id,
            *snapshot,
            mapping.as_ref(),
            *on_removed,
            policy,
            batch_size,
            quarantined.get(&ep.id),
            crate::sync::endpoint_compares_stock(ep).unwrap_or(false),
        ));
    }
    let mut stream = futures::stream::iter(reads).buffer_unordered(options.max_in_flight.max(1));
    while let Some(found) = stream.next().await {
        out.push(found?);
    }
    out.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
    Ok(out)
}

/// Read one endpoint back against its confirmed `snapshot`.
#[allow(clippy::too_many_arguments)]
async fn read_endpoint(
    diffs: &DiffCache,
    effects: &SyncEffects,
    endpoint: &str,
    snapshot: i64,
    mapping: Option<&EndpointMapping>,
    on_removed: OnRemoved,
    policy: &SyncPolicy,
    batch_size: usize,
    quarantined: Option<&HashSet<String>>,
    compare_stock: bool,
) -> Result<EndpointDrift> {
    if effects.circuit_open(endpoint).await {
        return Ok(EndpointDrift::skipped(
            endpoint,
            Some(snapshot),
            "its circuit is open",
        ));
    }
    let expected = match diffs.diff_mapped(None, snapshot, mapping, on_removed).await {
        Ok(items) => items,
        Err(e) => {
            return Ok(EndpointDrift::skipped(
                endpoint,
                Some(snapshot),
                format!("its confirmed snapshot {snapshot} cannot be read: {e}"),
            ));
        }
    };
    // Quarantined items are known not to show the snapshot's values; they are retried
    // with `bulwark retry`, not counted as drift.
    let expected: Vec<Item> = expected
        .iter()
        .filter(|i| quarantined.is_none_or(|q| !q.contains(&i.sku)))
        .cloned()
        .collect();
    let mut found = EndpointDrift {
        endpoint: endpoint.to_string(),
        snapshot: Some(snapshot),
        ..EndpointDrift::default()
    };
    for (index, chunk) in expected.chunks(batch_size).enumerate() {
        let index = index as u32;
        let mut pending: Vec<Item> = chunk.to_vec();
        let mut attempt = 1u32;
        let mut last: Option<AdapterError> = None;
        while !pending.is_empty() && attempt <= policy.max_attempts.max(1) {
            let batch = Batch {
                endpoint: endpoint.to_string(),
                snapshot,
                index,
                key: read_key(endpoint, snapshot, index),
                remainder: pending.len() < chunk.len(),
                // Compare-and-set stock: the shop sells between syncs, so showing less
                // than was confirmed is not drift (the adapter reads it so).
                cas: if compare_stock {
                    pending
                        .iter()
                        .map(|i| (i.sku.clone(), crate::catalog::Cas::confirmed(i.qty)))
                        .collect()
                } else {
                    Default::default()
                },
                items: pending.clone(),
            };
            match effects.read_back(policy, &batch).await {
                Ok(read) => {
                    found.read += (read.matching.len() + read.differing.len()) as u64;
                    found.drifted.extend(read.differing);
                    let unread: HashSet<String> = read.unread.into_iter().collect();
                    pending.retain(|i| unread.contains(&i.sku));
                    last = read.unread_error;
                    if last.as_ref().is_some_and(|e| !e.is_transient()) {
                        break;
                    }
                }
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => {
                    // Credentials, configuration, an adapter without read-back: reading
                    // the rest of this endpoint would fail the same way.
                    let why = match &e {
                        AdapterError::Config(m) if m == READ_BACK_UNSUPPORTED => {
                            "its adapter cannot read items back one by one".to_string()
                        }
                        e => format!("reading it back failed: {e}"),
                    };
                    let left = (expected.len() as u64).saturating_sub(found.read + found.unread);
                    found.unread += left;
                    found.skipped = Some(why);
                    return Ok(found);
                }
            }
            if !pending.is_empty() {
                attempt += 1;
                if attempt <= policy.max_attempts.max(1) {
                    let wait = policy.retry_delay_ms(attempt, batch.key, last.as_ref());
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
        if !pending.is_empty() {
            found.unread += pending.len() as u64;
            if found.skipped.is_none()
                && let Some(e) = last
            {
                found.skipped = Some(format!("{} item(s) could not be read: {e}", pending.len()));
            }
        }
    }
    Ok(found)
}
