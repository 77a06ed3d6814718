//! Sync runs: plan a run (diff each endpoint's confirmed snapshot against the target,
//! cut batches), execute it through the engine with adapters as effects, and finalize it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bulwark_engine::{
    Effects, Machine, NewWorkflow, RunId, RunOutcome, Runtime, Store, WorkflowCtx, now_ms,
};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use crate::adapter::{AdapterError, EndpointConfig, PortalAdapter, Verification};
use crate::catalog::{Batch, Item, payload_hash};
use crate::endpoint_sync::{BatchPlan, Command, EndpointSync, Event, State, SyncInput, SyncPolicy};
use crate::error::{Result, SyncError};
use crate::mapping::EndpointMapping;
use crate::staging::{Staging, diff};

/// Options of a sync run.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Items per batch.
    pub batch_size: u32,
    /// Retry and circuit policy.
    pub policy: SyncPolicy,
    /// Most adapter calls in flight at once (across all endpoints).
    pub max_in_flight: usize,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            policy: SyncPolicy::default(),
            max_in_flight: 64,
        }
    }
}

/// What planning produced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    /// The run created (None when every endpoint was already up to date).
    pub run: Option<RunId>,
    /// Target snapshot.
    pub snapshot: i64,
    /// Endpoints with something to send.
    pub workflows: usize,
    /// Endpoints already showing the target snapshot.
    pub up_to_date: usize,
    /// Batches planned.
    pub batches: u64,
    /// Items planned.
    pub items: u64,
}

/// (base, target, mapping cache key) of a cached diff.
type DiffKey = (Option<i64>, i64, Option<String>);

/// Diffs between snapshots, computed once and shared by every endpoint with the same base.
#[derive(Debug)]
pub struct DiffCache {
    staging: Staging,
    snapshots: Mutex<HashMap<i64, Arc<Vec<Item>>>>,
    diffs: Mutex<HashMap<DiffKey, Arc<Vec<Item>>>>,
}

impl DiffCache {
    /// A cache reading from `staging`.
    pub fn new(staging: Staging) -> Self {
        Self {
            staging,
            snapshots: Mutex::default(),
            diffs: Mutex::default(),
        }
    }

    async fn snapshot(&self, id: i64) -> Result<Arc<Vec<Item>>> {
        let mut snaps = self.snapshots.lock().await;
        if let Some(s) = snaps.get(&id) {
            return Ok(s.clone());
        }
        if !self.staging.is_sealed(id).await? {
            return Err(SyncError::Corrupt(format!("snapshot {id} is not sealed")));
        }
        let items = Arc::new(self.staging.items(id).await?);
        snaps.insert(id, items.clone());
        Ok(items)
    }

    /// The items to send to move an endpoint from `base` to `target`.
    pub async fn diff(&self, base: Option<i64>, target: i64) -> Result<Arc<Vec<Item>>> {
        self.diff_mapped(base, target, None).await
    }

    /// The mapped items to send to move an endpoint with `mapping` from `base` to
    /// `target`. Cached by (base, target, mapping): identical mappings share a diff.
    pub async fn diff_mapped(
        &self,
        base: Option<i64>,
        target: i64,
        mapping: Option<&EndpointMapping>,
    ) -> Result<Arc<Vec<Item>>> {
        let key = (base, target, mapping.map(EndpointMapping::cache_key));
        let mut diffs = self.diffs.lock().await;
        if let Some(d) = diffs.get(&key) {
            return Ok(d.clone());
        }
        let map = |items: Arc<Vec<Item>>| match mapping {
            Some(m) => Arc::new(m.apply(&items)),
            None => items,
        };
        let t = map(self.snapshot(target).await?);
        let d = match base {
            Some(b) => Arc::new(diff(Some(&map(self.snapshot(b).await?)), &t)),
            None => t,
        };
        diffs.insert(key, d.clone());
        Ok(d)
    }

    /// Items of batch `index` of `input`.
    pub async fn batch_items(&self, input: &SyncInput, index: u32) -> Result<Vec<Item>> {
        let all = self
            .diff_mapped(input.base, input.snapshot, input.mapping.as_ref())
            .await?;
        let bs = input.batch_size as usize;
        let start = index as usize * bs;
        let end = (start + bs).min(all.len());
        if start >= end {
            return Err(SyncError::Corrupt(format!(
                "endpoint {}: batch {index} is beyond the diff",
                input.endpoint
            )));
        }
        Ok(all[start..end].to_vec())
    }
}

/// Create a sync run towards `snapshot` for every endpoint that does not already show it.
pub async fn plan_run(
    store: &dyn Store,
    staging: &Staging,
    diffs: &DiffCache,
    endpoints: &[EndpointConfig],
    snapshot: i64,
    options: &SyncOptions,
) -> Result<Plan> {
    if options.batch_size == 0 {
        return Err(SyncError::Config("batch_size must be at least 1".into()));
    }
    if options.policy.max_failures == 0 || options.policy.max_attempts == 0 {
        return Err(SyncError::Config(
            "policy: max_failures and max_attempts must be at least 1".into(),
        ));
    }
    if !staging.is_sealed(snapshot).await? {
        return Err(SyncError::Config(format!(
            "snapshot {snapshot} is not sealed; sync runs read sealed snapshots only"
        )));
    }
    let confirmed = staging.confirmed_with_mapping().await?;
    let mut plan = Plan {
        snapshot,
        ..Default::default()
    };
    let mut new = Vec::new();
    for ep in endpoints {
        let mapping = EndpointMapping::from_settings(&ep.settings)?;
        // What the endpoint confirmed is a diff base only under the mapping it was sent
        // with; a changed mapping means a full send.
        let key = mapping.as_ref().map(EndpointMapping::cache_key);
        let base = confirmed
            .get(&ep.id)
            .filter(|(_, k)| *k == key)
            .map(|(s, _)| *s);
        let items = diffs.diff_mapped(base, snapshot, mapping.as_ref()).await?;
        if base == Some(snapshot) || items.is_empty() {
            plan.up_to_date += 1;
            continue;
        }
        let batches: Vec<BatchPlan> = items
            .chunks(options.batch_size as usize)
            .map(|c| BatchPlan {
                hash: payload_hash(c),
                items: c.len() as u32,
            })
            .collect();
        plan.batches += batches.len() as u64;
        plan.items += items.len() as u64;
        let input = SyncInput {
            endpoint: ep.id.clone(),
            snapshot,
            base,
            batch_size: options.batch_size,
            batches,
            policy: options.policy.clone(),
            mapping,
        };
        let state = EndpointSync::initial(&input);
        new.push(NewWorkflow {
            kind: EndpointSync::KIND.into(),
            subject: ep.id.clone(),
            input_json: serde_json::to_string(&input).expect("input serialises"),
            state_json: serde_json::to_string(&state).expect("state serialises"),
            status: EndpointSync::status(&state).into(),
        });
    }
    plan.workflows = new.len();
    if new.is_empty() {
        return Ok(plan);
    }
    let params = serde_json::json!({ "snapshot": snapshot, "batch_size": options.batch_size, "endpoints": endpoints.len() });
    let (run, _) = store.start_run("sync", &params.to_string(), &new).await?;
    plan.run = Some(run);
    Ok(plan)
}

/// Counters of adapter calls.
#[derive(Debug, Default)]
pub struct EffectStats {
    /// Upload calls.
    pub uploads: AtomicU64,
    /// Verify calls.
    pub verifies: AtomicU64,
    /// Probe calls.
    pub probes: AtomicU64,
    /// Probes that found the batch already landed (a re-send avoided).
    pub probe_hits: AtomicU64,
}

/// Executes endpoint-sync commands with portal adapters.
pub struct SyncEffects {
    adapters: HashMap<String, Arc<dyn PortalAdapter>>,
    open_circuits: HashMap<String, i64>,
    diffs: Arc<DiffCache>,
    in_flight: Semaphore,
    /// Call counters.
    pub stats: EffectStats,
}

impl SyncEffects {
    /// Effects over the given adapters (by endpoint id).
    pub fn new(
        adapters: HashMap<String, Arc<dyn PortalAdapter>>,
        open_circuits: HashMap<String, i64>,
        diffs: Arc<DiffCache>,
        max_in_flight: usize,
    ) -> Self {
        Self {
            adapters,
            open_circuits,
            diffs,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            stats: EffectStats::default(),
        }
    }

    async fn batch(
        &self,
        input: &SyncInput,
        index: u32,
        key: uuid::Uuid,
    ) -> std::result::Result<Batch, String> {
        let items = self
            .diffs
            .batch_items(input, index)
            .await
            .map_err(|e| e.to_string())?;
        // Snapshots are immutable; a payload that no longer matches its plan means the
        // staging data was tampered with. Never send it.
        if payload_hash(&items) != input.batches[index as usize].hash {
            return Err(format!(
                "endpoint {}: batch {index} payload differs from its plan",
                input.endpoint
            ));
        }
        Ok(Batch {
            endpoint: input.endpoint.clone(),
            snapshot: input.snapshot,
            index,
            key,
            items,
        })
    }
}

#[async_trait]
impl Effects<EndpointSync> for SyncEffects {
    async fn execute(
        &self,
        ctx: &WorkflowCtx<EndpointSync>,
        _state: &State,
        command: Command,
    ) -> Option<Event> {
        let input = &ctx.input;
        // An endpoint with no adapter fails through the machine (Config error → Tripped).
        let adapter = self
            .adapters
            .get(&input.endpoint)
            .cloned()
            .unwrap_or_else(|| Arc::new(Missing(input.endpoint.clone())));
        match command {
            Command::Begin => {
                let at_ms = now_ms();
                let circuit_open = self
                    .open_circuits
                    .get(&input.endpoint)
                    .is_some_and(|until| *until > at_ms);
                Some(Event::Begin {
                    at_ms,
                    circuit_open,
                })
            }
            Command::Sleep { until } => {
                let wait = until - now_ms();
                if wait > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
                }
                Some(Event::TimerFired)
            }
            Command::Upload { batch, key } => {
                let b = match self.batch(input, batch, key).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(workflow = ctx.id, endpoint = %input.endpoint, error = %e, "cannot build batch");
                        return None;
                    }
                };
                let _permit = self.in_flight.acquire().await.ok()?;
                self.stats.uploads.fetch_add(1, Ordering::Relaxed);
                Some(match adapter.upload(&b).await {
                    Ok(receipt) => Event::Uploaded { receipt },
                    Err(error) => Event::UploadFailed {
                        at_ms: now_ms(),
                        error,
                    },
                })
            }
            Command::Probe { key, .. } => {
                let _permit = self.in_flight.acquire().await.ok()?;
                self.stats.probes.fetch_add(1, Ordering::Relaxed);
                Some(match adapter.probe(&input.endpoint, key).await {
                    Ok(found) => {
                        if found.is_some() {
                            self.stats.probe_hits.fetch_add(1, Ordering::Relaxed);
                        }
                        Event::Probed { found }
                    }
                    Err(error) => Event::UploadFailed {
                        at_ms: now_ms(),
                        error,
                    },
                })
            }
            Command::Verify {
                batch,
                key,
                receipt,
            } => {
                let b = match self.batch(input, batch, key).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(workflow = ctx.id, endpoint = %input.endpoint, error = %e, "cannot build batch");
                        return None;
                    }
                };
                let _permit = self.in_flight.acquire().await.ok()?;
                self.stats.verifies.fetch_add(1, Ordering::Relaxed);
                Some(match adapter.verify(&b, &receipt).await {
                    Ok(Verification::Verified) => Event::Verified,
                    Ok(Verification::Mismatch { details }) => Event::Mismatch { details },
                    Err(error) => Event::VerifyFailed {
                        at_ms: now_ms(),
                        error,
                    },
                })
            }
        }
    }
}

/// Adapter standing in for an endpoint with no configuration: every call is a config error.
struct Missing(String);

#[async_trait]
impl PortalAdapter for Missing {
    async fn upload(&self, _: &Batch) -> Result<crate::adapter::Receipt, AdapterError> {
        Err(AdapterError::Config(format!(
            "endpoint {:?} is not configured",
            self.0
        )))
    }
    async fn verify(
        &self,
        _: &Batch,
        _: &crate::adapter::Receipt,
    ) -> Result<Verification, AdapterError> {
        Err(AdapterError::Config(format!(
            "endpoint {:?} is not configured",
            self.0
        )))
    }
    async fn probe(
        &self,
        _: &str,
        _: uuid::Uuid,
    ) -> Result<Option<crate::adapter::Receipt>, AdapterError> {
        Err(AdapterError::Config(format!(
            "endpoint {:?} is not configured",
            self.0
        )))
    }
}

/// Drive every unfinished endpoint sync (of `run`, or all) to completion.
pub async fn execute(
    runtime: &Runtime<EndpointSync>,
    effects: Arc<SyncEffects>,
    run: Option<RunId>,
    observer: Option<bulwark_engine::runtime::Observer<EndpointSync>>,
) -> Result<RunOutcome> {
    Ok(runtime.run(run, effects, observer).await?)
}

/// If every workflow of `run` is terminal: record what each Done endpoint now shows and
/// mark the run finished. Idempotent; returns whether the run is finished.
pub async fn finalize(store: &dyn Store, staging: &Staging, run: RunId) -> Result<bool> {
    let rows = store.workflows(Some(run), Some(EndpointSync::KIND)).await?;
    if rows.iter().any(|w| !w.terminal) {
        return Ok(false);
    }
    let mut confirmed = Vec::new();
    for w in rows.iter().filter(|w| w.status == "Done") {
        let input: SyncInput = serde_json::from_str(&w.input_json).map_err(|e| {
            SyncError::Corrupt(format!("workflow {}: input does not decode: {e}", w.id))
        })?;
        let key = input.mapping.as_ref().map(EndpointMapping::cache_key);
        confirmed.push((input.endpoint, input.snapshot, key));
    }
    staging.confirm(run, &confirmed).await?;
    store.finish_run(run, "finished").await?;
    Ok(true)
}
