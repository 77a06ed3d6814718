//! Sync runs: plan a run (diff each endpoint's confirmed snapshot against the target,
//! cut batches), execute it through the engine with adapters as effects, and finalize it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bulwark_engine::{
    Admission, AlertLevel, CircuitRow, Effects, Machine, NewAlert, NewWorkflow, RunId, RunOutcome,
    Runtime, Store, WorkflowCtx, now_ms,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore};

use crate::adapter::{AdapterError, EndpointConfig, PortalAdapter, Verification};
use crate::catalog::{Batch, Item, payload_hash};
use crate::endpoint_sync::{
    BatchPlan, Command, EndpointSync, Event, Refused, State, SyncInput, SyncPolicy,
};
use crate::error::{Result, SyncError};
use crate::itemset::ItemSet;
use crate::mapping::EndpointMapping;
use crate::staging::{OnRemoved, Settled, Staging, diff};

/// Options of a sync run.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Items per batch.
    pub batch_size: u32,
    /// Retry and circuit policy (endpoints may override it: [`EndpointConfig::policy`]).
    pub policy: SyncPolicy,
    /// Most adapter calls in flight at once (across all endpoints).
    pub max_in_flight: usize,
    /// Per-endpoint and per-host limits.
    pub limits: Limits,
    /// What to send for SKUs gone from the source (endpoints may override it with their
    /// `on_removed` setting).
    pub on_removed: OnRemoved,
    /// Refuse to plan from a snapshot whose read started longer ago than this: stock that
    /// old would overwrite what the shops sold since (see [`Plan::stale`]).
    pub max_snapshot_age_ms: Option<u64>,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            policy: SyncPolicy::default(),
            max_in_flight: 64,
            limits: Limits::default(),
            on_removed: OnRemoved::default(),
            max_snapshot_age_ms: None,
        }
    }
}

/// Concurrency and rate limits below the global cap. Many virtual endpoints often share
/// one host: a host's limits bound all of them together.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Adapter calls in flight per endpoint (1 keeps an endpoint's calls strictly ordered,
    /// also across runs).
    pub per_endpoint: usize,
    /// Adapter calls in flight per host (`None`: only the global cap).
    pub per_host: Option<usize>,
    /// Adapter calls started per second per host (`None`: unlimited).
    pub host_rate_per_sec: Option<u32>,
    /// Overrides for named hosts (`host` or `host:port`, as in the endpoint's URL).
    pub hosts: HashMap<String, HostLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_endpoint: 1,
            per_host: None,
            host_rate_per_sec: None,
            hosts: HashMap::new(),
        }
    }
}

/// Limits of one host.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostLimits {
    /// Calls in flight (`None`: the default `per_host`).
    pub max_in_flight: Option<usize>,
    /// Calls started per second (`None`: the default `host_rate_per_sec`).
    pub rate_per_sec: Option<u32>,
}

impl Limits {
    /// Check that the limits can work; names the first impossible value.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.per_endpoint == 0 {
            return Err("per_endpoint must be at least 1".into());
        }
        if self.per_host == Some(0) {
            return Err("per_host must be at least 1".into());
        }
        if self.host_rate_per_sec == Some(0) {
            return Err("host_rate_per_sec must be at least 1".into());
        }
        for (host, h) in &self.hosts {
            if h.max_in_flight == Some(0) || h.rate_per_sec == Some(0) {
                return Err(format!("host {host:?}: limits must be at least 1"));
            }
        }
        Ok(())
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
    /// Endpoints left out because a sync of theirs is still running (one at a time).
    pub busy: usize,
    /// Endpoints left out because an operator paused them (`bulwark pause`, see
    /// [`bulwark_engine::Store::hold`]): the first sync after the hold is lifted plans them
    /// from the newest snapshot.
    pub paused: usize,
    /// Batches planned.
    pub batches: u64,
    /// Items planned.
    pub items: u64,
    /// Drifted items planned to be sent again (a reconcile's repairs; part of `items`).
    pub repairs: u64,
    /// Set when the target snapshot was older than `max_snapshot_age_ms`: nothing was
    /// planned, every endpoint is held until a fresher snapshot is sealed.
    pub stale: Option<StaleSnapshot>,
}

/// A snapshot too old to push (see [`SyncOptions::max_snapshot_age_ms`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleSnapshot {
    /// How long ago its read started, in ms.
    pub age_ms: u64,
    /// The limit, in ms.
    pub max_ms: u64,
    /// Endpoints held.
    pub held: usize,
}

/// (base, target, mapping cache key, removal policy) of a cached diff.
type DiffKey = (Option<i64>, i64, Option<String>, OnRemoved);
/// A diff key and the extra SKUs sent along.
type PlannedKey = (DiffKey, Vec<String>);

/// Diffs between snapshots, computed once and shared by every endpoint with the same base.
#[derive(Debug)]
pub struct DiffCache {
    staging: Staging,
    snapshots: Mutex<HashMap<i64, Arc<Vec<Item>>>>,
    diffs: Mutex<HashMap<DiffKey, Arc<Vec<Item>>>>,
    /// Diffs with extra SKUs (quarantine retries, repairs), so each batch of such an
    /// endpoint slices one list instead of rebuilding it (bounded: cleared when full).
    planned: Mutex<HashMap<PlannedKey, Arc<Vec<Item>>>>,
}

/// Most diffs-with-extras kept at once.
const PLANNED_KEPT: usize = 64;

impl DiffCache {
    /// A cache reading from `staging`.
    pub fn new(staging: Staging) -> Self {
        Self {
            staging,
            snapshots: Mutex::default(),
            diffs: Mutex::default(),
            planned: Mutex::default(),
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
    pub async fn diff(
        &self,
        base: Option<i64>,
        target: i64,
        on_removed: OnRemoved,
    ) -> Result<Arc<Vec<Item>>> {
        self.diff_mapped(base, target, None, on_removed).await
    }

    /// The mapped items to send to move an endpoint with `mapping` from `base` to
    /// `target`. Cached by (base, target, mapping, policy): identical mappings share a diff.
    pub async fn diff_mapped(
        &self,
        base: Option<i64>,
        target: i64,
        mapping: Option<&EndpointMapping>,
        on_removed: OnRemoved,
    ) -> Result<Arc<Vec<Item>>> {
        let key = (
            base,
            target,
            mapping.map(EndpointMapping::cache_key),
            on_removed,
        );
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
            Some(b) => Arc::new(diff(Some(&map(self.snapshot(b).await?)), &t, on_removed)),
            None => t,
        };
        diffs.insert(key, d.clone());
        Ok(d)
    }

    /// Every item a sync moving an endpoint from `base` to `target` carries: the diff,
    /// plus the `extra` SKUs (quarantined ones retried, drifted ones repaired) at
    /// `target`'s values, sorted by SKU.
    pub async fn planned_items(
        &self,
        base: Option<i64>,
        target: i64,
        mapping: Option<&EndpointMapping>,
        on_removed: OnRemoved,
        extra: &[String],
    ) -> Result<Arc<Vec<Item>>> {
        let diff = self.diff_mapped(base, target, mapping, on_removed).await?;
        let extra: std::collections::HashSet<&str> = extra
            .iter()
            .map(String::as_str)
            .filter(|sku| diff.binary_search_by(|i| i.sku.as_str().cmp(sku)).is_err())
            .collect();
        if extra.is_empty() {
            return Ok(diff);
        }
        let mut wanted: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        wanted.sort();
        let key = (
            (
                base,
                target,
                mapping.map(EndpointMapping::cache_key),
                on_removed,
            ),
            wanted,
        );
        if let Some(hit) = self.planned.lock().await.get(&key) {
            return Ok(hit.clone());
        }
        let full = self.diff_mapped(None, target, mapping, on_removed).await?;
        let mut items: Vec<Item> = diff.to_vec();
        items.extend(
            full.iter()
                .filter(|i| extra.contains(i.sku.as_str()))
                .cloned(),
        );
        items.sort_by(|a, b| a.sku.cmp(&b.sku));
        let items = Arc::new(items);
        let mut planned = self.planned.lock().await;
        if planned.len() >= PLANNED_KEPT {
            planned.clear();
        }
        planned.insert(key, items.clone());
        Ok(items)
    }

    /// Items of batch `index` of `input`.
    pub async fn batch_items(&self, input: &SyncInput, index: u32) -> Result<Vec<Item>> {
        let all = self
            .planned_items(
                input.base,
                input.snapshot,
                input.mapping.as_ref(),
                input.on_removed,
                &input.extra_skus(),
            )
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

/// What `ep`'s syncs do with SKUs gone from the source: its `on_removed` setting, else the
/// run's.
pub(crate) fn endpoint_on_removed(ep: &EndpointConfig, options: &SyncOptions) -> Result<OnRemoved> {
    match ep.settings.get("on_removed") {
        Some(v) => v
            .parse()
            .map_err(|e| SyncError::Config(format!("endpoint {:?}: {e}", ep.id))),
        None => Ok(options.on_removed),
    }
}

/// Does `ep` write stock compare-and-set (its `stock_policy` setting: `absolute`, the
/// default, or `compare_and_set`)?
pub fn endpoint_compares_stock(ep: &EndpointConfig) -> std::result::Result<bool, String> {
    match ep.settings.get(STOCK_POLICY_KEY).map(|v| v.trim()) {
        None | Some("absolute") => Ok(false),
        Some("compare_and_set") => Ok(true),
        Some(other) => Err(format!(
            "endpoint {:?}: setting `{STOCK_POLICY_KEY}`: {other:?} is neither \"absolute\" nor \"compare_and_set\"",
            ep.id
        )),
    }
}

/// The endpoint setting naming its stock policy.
pub const STOCK_POLICY_KEY: &str = "stock_policy";

/// The SKUs in `a` or `b`, sorted, each once.
pub(crate) fn sorted_union(a: &[String], b: &[String]) -> Vec<String> {
    let mut v: Vec<String> = a.iter().chain(b).cloned().collect();
    v.sort();
    v.dedup();
    v
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
    plan_run_with(store, staging, diffs, endpoints, snapshot, options, None).await
}

/// [`plan_run`], and with `repair` (a reconcile's finding: endpoint → drifted SKUs, as
/// sent), each endpoint's sync also carries its drifted SKUs at the target's values, also
/// when the endpoint already shows the target.
pub async fn plan_run_with(
    store: &dyn Store,
    staging: &Staging,
    diffs: &DiffCache,
    endpoints: &[EndpointConfig],
    snapshot: i64,
    options: &SyncOptions,
    repair: Option<&HashMap<String, Vec<String>>>,
) -> Result<Plan> {
    let planned =
        plan_endpoints(store, staging, diffs, endpoints, snapshot, options, repair).await?;
    let mut plan = Plan {
        snapshot,
        stale: planned.stale,
        ..Default::default()
    };
    let mut new = Vec::new();
    for (_, p) in planned.endpoints {
        match p {
            EndpointPlan::Busy => plan.busy += 1,
            EndpointPlan::Paused => plan.paused += 1,
            EndpointPlan::UpToDate { .. } => plan.up_to_date += 1,
            EndpointPlan::Send { input, items } => {
                plan.batches += input.batches.len() as u64;
                plan.items += items.len() as u64;
                plan.repairs += input.repair.len() as u64;
                let state = EndpointSync::initial(&input);
                new.push(NewWorkflow {
                    kind: EndpointSync::KIND.into(),
                    subject: input.endpoint.clone(),
                    input_json: serde_json::to_string(&input).expect("input serialises"),
                    state_json: serde_json::to_string(&state).expect("state serialises"),
                    status: EndpointSync::status(&state).into(),
                    version: EndpointSync::VERSION,
                });
            }
        }
    }
    plan.workflows = new.len();
    if new.is_empty() {
        return Ok(plan);
    }
    let mut params = serde_json::json!({ "snapshot": snapshot, "batch_size": options.batch_size, "endpoints": endpoints.len() });
    if repair.is_some() {
        params["reconcile"] = serde_json::json!({ "repairs": plan.repairs });
    }
    let (run, _) = store.start_run("sync", &params.to_string(), &new).await?;
    plan.run = Some(run);
    Ok(plan)
}

/// What planning decided for one endpoint, before anything is stored.
#[derive(Debug)]
pub(crate) enum EndpointPlan {
    /// A sync of it is still running; left out.
    Busy,
    /// An operator paused it; left out.
    Paused,
    /// It already shows the target.
    UpToDate {
        /// The snapshot it confirmed (under its current mapping).
        base: Option<i64>,
    },
    /// Its sync: the journaled input and every item it carries.
    Send {
        /// The sync's input.
        input: SyncInput,
        /// Its items, sorted by SKU (`input.batches` cut them).
        items: Arc<Vec<Item>>,
    },
}

/// Every endpoint's [`EndpointPlan`] (in the order of `endpoints`), or none with `stale`
/// set when the target is too old to push.
#[derive(Debug)]
pub(crate) struct PlannedEndpoints<'a> {
    pub(crate) stale: Option<StaleSnapshot>,
    pub(crate) endpoints: Vec<(&'a EndpointConfig, EndpointPlan)>,
}

/// Decide, for each endpoint, what a sync towards `snapshot` sends (see
/// [`plan_run_with`]); reads staging and the store, writes nothing.
pub(crate) async fn plan_endpoints<'a>(
    store: &dyn Store,
    staging: &Staging,
    diffs: &DiffCache,
    endpoints: &'a [EndpointConfig],
    snapshot: i64,
    options: &SyncOptions,
    repair: Option<&HashMap<String, Vec<String>>>,
) -> Result<PlannedEndpoints<'a>> {
    if options.batch_size == 0 {
        return Err(SyncError::Config("batch_size must be at least 1".into()));
    }
    options
        .policy
        .validate()
        .map_err(|e| SyncError::Config(format!("policy: {e}")))?;
    options
        .limits
        .validate()
        .map_err(|e| SyncError::Config(format!("limits: {e}")))?;
    if !staging.is_sealed(snapshot).await? {
        return Err(SyncError::Config(format!(
            "snapshot {snapshot} is not sealed; sync runs read sealed snapshots only"
        )));
    }
    if let Some(max_ms) = options.max_snapshot_age_ms
        && let Some(row) = staging
            .snapshots()
            .await?
            .into_iter()
            .find(|s| s.id == snapshot)
    {
        let now = chrono::Utc::now().timestamp_millis();
        let age_ms = u64::try_from(now.saturating_sub(row.started_at)).unwrap_or(0);
        if age_ms > max_ms {
            tracing::warn!(
                snapshot,
                age_ms,
                max_ms,
                endpoints = endpoints.len(),
                "snapshot too old to push stock from; every endpoint held"
            );
            return Ok(PlannedEndpoints {
                stale: Some(StaleSnapshot {
                    age_ms,
                    max_ms,
                    held: endpoints.len(),
                }),
                endpoints: Vec::new(),
            });
        }
    }
    let confirmed = staging.confirmed_with_mapping().await?;
    let unsettled = staging.unsettled().await?;
    let mut quarantine: HashMap<String, Vec<(String, bool)>> = HashMap::new();
    for q in staging.quarantine().await? {
        quarantine
            .entry(q.endpoint)
            .or_default()
            .push((q.sku, q.retry_requested));
    }
    let stock_shown = staging.stock_shown().await?;
    let busy = store.open_subjects(EndpointSync::KIND).await?;
    let paused: HashSet<String> = store
        .holds()
        .await?
        .into_iter()
        .map(|h| h.subject)
        .collect();
    let mut out = Vec::with_capacity(endpoints.len());
    for ep in endpoints {
        // A paused endpoint gets no new work (a sync of its that was under way waits,
        // untouched): what it is sent after the hold is lifted is planned then, from the
        // newest snapshot, not from the one current when it was paused.
        if paused.contains(&ep.id) {
            out.push((ep, EndpointPlan::Paused));
            continue;
        }
        // One sync per endpoint at a time: its batches stay ordered, and a run enqueued
        // while the previous one still works does not send the same batches again.
        if busy.contains(&ep.id) {
            out.push((ep, EndpointPlan::Busy));
            continue;
        }
        let mapping = EndpointMapping::from_settings(&ep.settings)?;
        // What the endpoint confirmed is a diff base only under the mapping it was sent
        // with; a changed mapping means a full send.
        let key = mapping.as_ref().map(EndpointMapping::cache_key);
        let base = confirmed
            .get(&ep.id)
            .filter(|(_, k)| *k == key)
            .map(|(s, _)| *s);
        let on_removed = endpoint_on_removed(ep, options)?;
        // Quarantined SKUs this sync carries: those the diff changes, and those an
        // operator asked to retry.
        let diff = diffs
            .diff_mapped(base, snapshot, mapping.as_ref(), on_removed)
            .await?;
        let mut retry: Vec<String> = quarantine
            .get(&ep.id)
            .map(|rows| {
                rows.iter()
                    .filter(|(sku, requested)| {
                        *requested || diff.binary_search_by(|i| i.sku.as_str().cmp(sku)).is_ok()
                    })
                    .map(|(sku, _)| sku.clone())
                    .collect()
            })
            .unwrap_or_default();
        retry.sort();
        let mut drifted: Vec<String> = repair
            .and_then(|r| r.get(&ep.id))
            .cloned()
            .unwrap_or_default();
        drifted.sort();
        drifted.dedup();
        let extra = sorted_union(&retry, &drifted);
        let items = diffs
            .planned_items(base, snapshot, mapping.as_ref(), on_removed, &extra)
            .await?;
        // A requested or drifted SKU the target no longer has cannot be carried.
        let carried = |sku: &String| items.binary_search_by(|i| i.sku.as_str().cmp(sku)).is_ok();
        retry.retain(carried);
        drifted.retain(carried);
        if items.is_empty() || (base == Some(snapshot) && retry.is_empty() && drifted.is_empty()) {
            out.push((ep, EndpointPlan::UpToDate { base }));
            continue;
        }
        let compare_stock = endpoint_compares_stock(ep).map_err(SyncError::Config)?;
        // Compare-and-set: the lowered writes of the SKUs this sync carries.
        let cas: std::collections::BTreeMap<String, crate::catalog::Cas> = match compare_stock {
            false => Default::default(),
            true => stock_shown
                .get(&ep.id)
                .map(|rows| {
                    rows.iter()
                        .filter(|(sku, _)| carried(sku))
                        .map(|(sku, c)| (sku.clone(), *c))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let batches: Vec<BatchPlan> = items
            .chunks(options.batch_size as usize)
            .map(|c| BatchPlan {
                hash: payload_hash(c),
                items: c.len() as u32,
            })
            .collect();
        let input = SyncInput {
            endpoint: ep.id.clone(),
            snapshot,
            base,
            batch_size: options.batch_size,
            batches,
            policy: match &ep.policy {
                Some(p) => {
                    p.validate().map_err(|e| {
                        SyncError::Config(format!("endpoint {:?}: policy: {e}", ep.id))
                    })?;
                    p.clone()
                }
                None => options.policy.clone(),
            },
            mapping,
            on_removed,
            read_first: unsettled.contains(&ep.id),
            retry,
            repair: drifted,
            config: Some(ep.fingerprint()),
            compare_stock,
            cas,
        };
        out.push((ep, EndpointPlan::Send { input, items }));
    }
    Ok(PlannedEndpoints {
        stale: None,
        endpoints: out,
    })
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
    /// Read-back calls of reconciles.
    pub reads: AtomicU64,
    /// Probes that found the batch already landed (a re-send avoided).
    pub probe_hits: AtomicU64,
    /// Uploads (and probes) that failed.
    pub upload_failures: AtomicU64,
    /// Uploads that settled some items but not all (the rest retried, or quarantined).
    pub partial_uploads: AtomicU64,
    /// Batches verified: the endpoint shows what was sent.
    pub verified: AtomicU64,
    /// Batches whose read-back differed from what was sent (a failed validation).
    pub mismatches: AtomicU64,
    /// Verify calls that failed.
    pub verify_failures: AtomicU64,
    /// Calls given up after the policy's per-attempt timeout.
    pub timeouts: AtomicU64,
    /// Adapter calls in flight now.
    pub in_flight: AtomicU64,
    /// Latency of adapter calls by (adapter, outcome) — process-wide totals only (see
    /// [`SyncEffects::counting_into`]).
    pub latency:
        std::sync::Mutex<std::collections::BTreeMap<(Arc<str>, &'static str), CallLatency>>,
}

/// Latency of adapter calls of one (adapter, outcome): counts per bucket of
/// [`CallLatency::BOUNDS_SECONDS`] (not cumulative; the last counts the rest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallLatency {
    /// Calls per bucket.
    pub counts: [u64; CallLatency::BOUNDS_SECONDS.len() + 1],
    /// Their time, in microseconds.
    pub sum_micros: u64,
    /// Calls.
    pub count: u64,
}

impl CallLatency {
    /// Upper bounds of the latency buckets, in seconds.
    pub const BOUNDS_SECONDS: [f64; 12] = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];

    fn observe(&mut self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let i = Self::BOUNDS_SECONDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(Self::BOUNDS_SECONDS.len());
        self.counts[i] += 1;
        self.sum_micros += elapsed.as_micros() as u64;
        self.count += 1;
    }
}

/// The outcome label of an adapter call's result.
fn outcome<T>(r: &std::result::Result<T, AdapterError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(AdapterError::Transient(_)) => "transient",
        Err(AdapterError::RateLimited { .. }) => "rate_limited",
        Err(AdapterError::Unavailable { .. }) => "unavailable",
        Err(AdapterError::Rejected(_)) => "rejected",
        Err(AdapterError::Auth(_)) => "auth",
        Err(AdapterError::Partial(_)) => "partial",
        Err(AdapterError::Config(_)) => "config",
        Err(AdapterError::Fenced(_)) => "fenced",
    }
}

/// Executes endpoint-sync commands with portal adapters, under the circuits and limits.
pub struct SyncEffects {
    adapters: HashMap<String, Arc<dyn PortalAdapter>>,
    /// The adapter name of each endpoint (the `adapter` of its configuration), for the
    /// latency metrics.
    adapter_names: HashMap<String, Arc<str>>,
    circuits: CircuitView,
    diffs: Arc<DiffCache>,
    in_flight: Semaphore,
    gates: Gates,
    /// Call counters of these effects.
    pub stats: EffectStats,
    /// The process-wide counters the same calls also count into (see [`SyncEffects::counting_into`]).
    totals: Option<Arc<EffectStats>>,
    /// With several workers: each configured endpoint's fingerprint; syncs of other
    /// endpoints, or planned with another configuration, are declined (see
    /// [`SyncEffects::declining_foreign`]).
    known: Option<HashMap<String, String>>,
}

/// The shared circuits, read through a short-lived cache: a run's thousands of Begin
/// commands cost one query, and a circuit opened by another worker is seen within
/// [`CircuitView::TTL`].
struct CircuitView {
    store: Arc<dyn Store>,
    cache: Mutex<Option<(std::time::Instant, Circuits)>>,
}

/// Every circuit by subject, as read at one moment.
type Circuits = Arc<HashMap<String, CircuitRow>>;

impl CircuitView {
    const TTL: std::time::Duration = std::time::Duration::from_millis(500);

    async fn admission(&self, endpoint: &str, now: i64) -> Admission {
        let mut cache = self.cache.lock().await;
        let fresh = cache.as_ref().filter(|(at, _)| at.elapsed() < Self::TTL);
        let map = match fresh {
            Some((_, map)) => map.clone(),
            None => match self.store.circuits().await {
                Ok(rows) => {
                    let map: Arc<HashMap<String, CircuitRow>> =
                        Arc::new(rows.into_iter().map(|c| (c.subject.clone(), c)).collect());
                    *cache = Some((std::time::Instant::now(), map.clone()));
                    map
                }
                Err(e) => {
                    // Unknown circuit state: keep what we knew rather than guess closed.
                    tracing::warn!(error = %e, "reading circuits failed");
                    cache.as_ref().map(|(_, m)| m.clone()).unwrap_or_default()
                }
            },
        };
        map.get(endpoint)
            .map_or(Admission::Closed, |c| c.admission(now))
    }
}

/// Per-endpoint and per-host slots and per-host rate limiters. A call takes its
/// endpoint's slot, then its host's slot and rate token, then a global slot: a slow
/// endpoint holds only its own slots, and waiting on a busy host holds no global slot.
struct Gates {
    limits: Limits,
    endpoint: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
    host_of: HashMap<String, String>,
    host: HashMap<String, Arc<Semaphore>>,
    rate: HashMap<String, Arc<governor::DefaultDirectRateLimiter>>,
}

impl Gates {
    fn new(limits: Limits, hosts: HashMap<String, String>) -> Self {
        let mut host = HashMap::new();
        let mut rate = HashMap::new();
        for h in hosts.values() {
            let o = limits.hosts.get(h).copied().unwrap_or_default();
            if let Some(n) = o.max_in_flight.or(limits.per_host) {
                host.entry(h.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(n.max(1))));
            }
            if let Some(r) = o.rate_per_sec.or(limits.host_rate_per_sec) {
                let quota = governor::Quota::per_second(
                    std::num::NonZeroU32::new(r.max(1)).expect("at least 1"),
                )
                .allow_burst(std::num::NonZeroU32::MIN);
                rate.entry(h.clone())
                    .or_insert_with(|| Arc::new(governor::RateLimiter::direct(quota)));
            }
        }
        Self {
            limits,
            endpoint: std::sync::Mutex::default(),
            host_of: hosts,
            host,
            rate,
        }
    }

    /// Wait for the endpoint's and its host's slots and rate token.
    async fn enter(
        &self,
        endpoint: &str,
    ) -> (
        Option<tokio::sync::OwnedSemaphorePermit>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let slot = self
            .endpoint
            .lock()
            .expect("endpoint slots")
            .entry(endpoint.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.limits.per_endpoint.max(1))))
            .clone();
        let mine = slot.acquire_owned().await.ok();
        let host = self.host_of.get(endpoint);
        let theirs = match host.and_then(|h| self.host.get(h)) {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        if let Some(r) = host.and_then(|h| self.rate.get(h)) {
            r.until_ready().await;
        }
        (mine, theirs)
    }
}

/// The host part (`host[:port]`) of an endpoint's `base_url`, or its `host` setting:
/// what per-host limits group endpoints by.
pub fn endpoint_host(ep: &EndpointConfig) -> Option<String> {
    if let Some(h) = ep.settings.get("host") {
        return Some(h.clone());
    }
    let url = ep.settings.get("base_url")?;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl SyncEffects {
    /// Effects over the given adapters (by endpoint id), reading circuits from `store`.
    pub fn new(
        adapters: HashMap<String, Arc<dyn PortalAdapter>>,
        store: Arc<dyn Store>,
        diffs: Arc<DiffCache>,
        max_in_flight: usize,
    ) -> Self {
        Self::with_limits(
            adapters,
            store,
            diffs,
            max_in_flight,
            Limits::default(),
            HashMap::new(),
        )
    }

    /// Effects with per-endpoint and per-host limits; `hosts` maps endpoint ids to the
    /// host they share limits with ([`endpoint_host`]).
    pub fn with_limits(
        adapters: HashMap<String, Arc<dyn PortalAdapter>>,
        store: Arc<dyn Store>,
        diffs: Arc<DiffCache>,
        max_in_flight: usize,
        limits: Limits,
        hosts: HashMap<String, String>,
    ) -> Self {
        Self {
            adapters,
            adapter_names: HashMap::new(),
            circuits: CircuitView {
                store,
                cache: Mutex::new(None),
            },
            diffs,
            in_flight: Semaphore::new(max_in_flight.max(1)),
            gates: Gates::new(limits, hosts),
            stats: EffectStats::default(),
            totals: None,
            known: None,
        }
    }

    /// Decline (leave untouched for another worker) every sync whose endpoint is not
    /// among `endpoints`, or whose run was planned with another configuration of it: the
    /// rolling-deploy case, where workers briefly run different configurations. Without
    /// this, such a sync meets "endpoint … is not configured" and trips its endpoint.
    pub fn declining_foreign(mut self, endpoints: &[EndpointConfig]) -> Self {
        self.known = Some(
            endpoints
                .iter()
                .map(|e| (e.id.clone(), e.fingerprint()))
                .collect(),
        );
        self
    }

    /// Name each endpoint's adapter (endpoint id → adapter name) in the latency metrics.
    pub fn naming_adapters(mut self, names: HashMap<String, Arc<str>>) -> Self {
        self.adapter_names = names;
        self
    }

    /// Count every call into `totals` as well (a process's metrics, across many runs).
    pub fn counting_into(mut self, totals: Arc<EffectStats>) -> Self {
        self.totals = Some(totals);
        self
    }

    fn count(&self, counter: impl Fn(&EffectStats) -> &AtomicU64) {
        counter(&self.stats).fetch_add(1, Ordering::Relaxed);
        if let Some(t) = &self.totals {
            counter(t).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a call in flight until the guard drops (also when the call is abandoned).
    fn in_flight(&self) -> impl Drop + '_ {
        struct Guard<'a>(&'a SyncEffects);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
                if let Some(t) = &self.0.totals {
                    t.in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        self.count(|s| &s.in_flight);
        Guard(self)
    }

    /// Run one adapter call under the endpoint's, its host's and the global limits, and
    /// the policy's per-attempt timeout (a timeout is a transient failure).
    async fn call<T>(
        &self,
        input: &SyncInput,
        call: impl std::future::Future<Output = std::result::Result<T, AdapterError>>,
    ) -> Option<std::result::Result<T, AdapterError>> {
        self.call_on(&input.endpoint, &input.policy, call).await
    }

    /// [`SyncEffects::call`] for `endpoint` under `policy`.
    async fn call_on<T>(
        &self,
        endpoint: &str,
        policy: &SyncPolicy,
        call: impl std::future::Future<Output = std::result::Result<T, AdapterError>>,
    ) -> Option<std::result::Result<T, AdapterError>> {
        self.call_on_confirmed(endpoint, policy, None::<std::future::Ready<bool>>, call)
            .await
    }

    /// [`SyncEffects::call_on`], first awaiting `confirm` (if any) once the call has its
    /// slot: `false` drops the call unsent (`None`).
    async fn call_on_confirmed<T>(
        &self,
        endpoint: &str,
        policy: &SyncPolicy,
        confirm: Option<impl std::future::Future<Output = bool>>,
        call: impl std::future::Future<Output = std::result::Result<T, AdapterError>>,
    ) -> Option<std::result::Result<T, AdapterError>> {
        let _gates = self.gates.enter(endpoint).await;
        let _global = self.in_flight.acquire().await.ok()?;
        if let Some(confirm) = confirm
            && !confirm.await
        {
            tracing::warn!(
                endpoint,
                "lease no longer held by this worker (the database says so): upload not sent"
            );
            return None;
        }
        let limit = std::time::Duration::from_millis(policy.attempt_timeout_ms.max(1));
        let in_flight = self.in_flight();
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(limit, call).await;
        drop(in_flight);
        if let Some(t) = &self.totals {
            let name = self
                .adapter_names
                .get(endpoint)
                .cloned()
                .unwrap_or_else(|| Arc::from("unnamed"));
            let label = result.as_ref().map_or("timeout", outcome);
            if let Ok(mut latency) = t.latency.lock() {
                latency
                    .entry((name, label))
                    .or_default()
                    .observe(started.elapsed());
            }
        }
        Some(match result {
            Ok(r) => r,
            Err(_) => {
                self.count(|s| &s.timeouts);
                Err(AdapterError::Transient(format!(
                    "no answer within {} ms (attempt timeout)",
                    limit.as_millis()
                )))
            }
        })
    }

    /// Is `endpoint`'s circuit open now?
    pub(crate) async fn circuit_open(&self, endpoint: &str) -> bool {
        matches!(
            self.circuits.admission(endpoint, now_ms()).await,
            Admission::Open { .. }
        )
    }

    /// Read `batch` back through its endpoint's adapter, under the same limits and
    /// per-attempt timeout as any call (a reconcile's read).
    pub(crate) async fn read_back(
        &self,
        policy: &SyncPolicy,
        batch: &Batch,
    ) -> std::result::Result<crate::adapter::ReadBack, AdapterError> {
        let Some(adapter) = self.adapters.get(&batch.endpoint).cloned() else {
            return Err(AdapterError::Config(format!(
                "endpoint {:?} has no adapter",
                batch.endpoint
            )));
        };
        self.count(|s| &s.reads);
        self.call_on(&batch.endpoint, policy, adapter.read_back(batch))
            .await
            .unwrap_or_else(|| Err(AdapterError::Transient("shutting down".into())))
    }

    /// Batch `index` of `input`, without the positions in `skip` (then a remainder).
    /// Returns the batch and the position of each item it carries within the whole batch.
    async fn batch(
        &self,
        input: &SyncInput,
        index: u32,
        key: uuid::Uuid,
        skip: &ItemSet,
        progress: Option<&crate::endpoint_sync::Progress>,
    ) -> std::result::Result<(Batch, Vec<u32>), String> {
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
        let (positions, items): (Vec<u32>, Vec<Item>) = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| (i as u32, item))
            .filter(|(i, _)| !skip.contains(*i))
            .unzip();
        let cas = if input.compare_stock {
            self.cas(input, index, &items, &positions, progress)
                .await
                .map_err(|e| e.to_string())?
        } else {
            Default::default()
        };
        Ok((
            Batch {
                endpoint: input.endpoint.clone(),
                snapshot: input.snapshot,
                index,
                key,
                items,
                remainder: !skip.is_empty(),
                cas,
            },
            positions,
        ))
    }

    /// Compare-and-set: what each item of batch `index` compares with. A write of this
    /// sync that lowered the item (a re-send after it), else a lowered write of an
    /// earlier sync (`input.cas`), else the quantity the endpoint last confirmed (its
    /// base snapshot, mapped). An item new to the endpoint has none.
    async fn cas(
        &self,
        input: &SyncInput,
        index: u32,
        items: &[Item],
        positions: &[u32],
        progress: Option<&crate::endpoint_sync::Progress>,
    ) -> Result<std::collections::BTreeMap<String, crate::catalog::Cas>> {
        use crate::catalog::Cas;
        let base = match input.base {
            Some(b) => Some(
                self.diffs
                    .diff_mapped(None, b, input.mapping.as_ref(), input.on_removed)
                    .await?,
            ),
            None => None,
        };
        let mut out = std::collections::BTreeMap::new();
        for (item, &pos) in items.iter().zip(positions) {
            let own = progress.and_then(|p| {
                p.stock
                    .iter()
                    .find(|s| s.batch == index && s.item == pos)
                    .map(|s| Cas {
                        compare: s.qty,
                        basis: s.basis,
                    })
            });
            let cas = own
                .or_else(|| input.cas.get(&item.sku).copied())
                .or_else(|| {
                    base.as_ref().and_then(|b| {
                        b.binary_search_by(|i| i.sku.as_str().cmp(&item.sku))
                            .ok()
                            .map(|i| Cas::confirmed(b[i].qty))
                    })
                });
            if let Some(cas) = cas {
                out.insert(item.sku.clone(), cas);
            }
        }
        Ok(out)
    }

    /// The lowered writes an adapter reported, with the positions (within the whole batch)
    /// and the batch's quantities of their items (an item the call did not carry, or one
    /// "lowered" to its own quantity or above, is ignored).
    fn adjusted(
        batch: &Batch,
        positions: &[u32],
        adjusted: &[crate::adapter::Adjusted],
    ) -> Vec<crate::endpoint_sync::StockWritten> {
        let mut out: Vec<crate::endpoint_sync::StockWritten> = adjusted
            .iter()
            .filter_map(|a| {
                let i = batch.items.iter().position(|i| i.sku == a.sku)?;
                let item = &batch.items[i];
                (a.qty >= 0 && a.qty < item.qty).then(|| crate::endpoint_sync::StockWritten {
                    item: positions[i],
                    sku: a.sku.clone(),
                    qty: a.qty,
                    basis: item.qty,
                })
            })
            .collect();
        out.sort_by_key(|a| a.item);
        out.dedup_by_key(|a| a.item);
        out
    }

    /// The positions (within the whole batch) of the SKUs an adapter named.
    fn positions(
        input: &SyncInput,
        batch: &Batch,
        positions: &[u32],
        skus: impl Iterator<Item = String>,
    ) -> Vec<(u32, String)> {
        let by_sku: HashMap<&str, u32> = batch
            .items
            .iter()
            .zip(positions)
            .map(|(item, &p)| (item.sku.as_str(), p))
            .collect();
        skus.filter_map(|sku| match by_sku.get(sku.as_str()) {
            Some(&p) => Some((p, sku)),
            None => {
                tracing::warn!(endpoint = %input.endpoint, batch = batch.index, sku = %sku, "adapter named a SKU the call did not carry; ignored");
                None
            }
        })
        .collect()
    }
}

#[async_trait]
impl Effects<EndpointSync> for SyncEffects {
    fn accepts(&self, subject: &str, input_json: &str) -> std::result::Result<(), String> {
        let Some(known) = &self.known else {
            return Ok(());
        };
        let Some(here) = known.get(subject) else {
            return Err(format!(
                "endpoint {subject:?} is not in this worker's configuration"
            ));
        };
        /// Only the fingerprint of the input (the rest is decoded when driven).
        #[derive(serde::Deserialize)]
        struct Planned {
            #[serde(default)]
            config: Option<String>,
        }
        match serde_json::from_str::<Planned>(input_json) {
            Ok(Planned {
                config: Some(planned),
            }) if planned != *here => Err(format!(
                "endpoint {subject:?} is configured differently here (settings {here}) than when its run was planned (settings {planned})"
            )),
            // Same configuration, a journal from before fingerprints, or an input that
            // does not decode (driving it retires it, with the reason).
            _ => Ok(()),
        }
    }

    async fn execute(
        &self,
        ctx: &WorkflowCtx<EndpointSync>,
        state: &State,
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
                let admission = self.circuits.admission(&input.endpoint, at_ms).await;
                Some(Event::Begin {
                    at_ms,
                    circuit_open: matches!(admission, Admission::Open { .. }),
                    probe: admission == Admission::HalfOpen,
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
                let skip = state
                    .progress()
                    .map(|p| p.upload_skips(batch))
                    .unwrap_or_default();
                let (b, positions) = match self
                    .batch(input, batch, key, &skip, state.progress())
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(workflow = ctx.id, endpoint = %input.endpoint, error = %e, "cannot build batch");
                        return None;
                    }
                };
                // Not deduplicated at the other end: the lease is confirmed with the
                // database once the call has its slot, right before it goes out.
                let confirm = (!adapter.deduplicates())
                    .then(|| ctx.confirm_lease(self.circuits.store.as_ref()));
                let result = self
                    .call_on_confirmed(&input.endpoint, &input.policy, confirm, adapter.upload(&b))
                    .await?;
                self.count(|s| &s.uploads);
                Some(match result {
                    Ok(receipt) => Event::Uploaded { receipt },
                    Err(AdapterError::Partial(p)) => {
                        let p = *p;
                        if !(p.rest.is_none() && p.rejected.is_empty()) {
                            self.count(|s| &s.partial_uploads);
                        }
                        let adjusted = Self::adjusted(&b, &positions, &p.adjusted);
                        let done: ItemSet =
                            Self::positions(input, &b, &positions, p.done.into_iter())
                                .into_iter()
                                .map(|(i, _)| i)
                                .collect();
                        let mut reasons: HashMap<String, (String, bool)> = HashMap::new();
                        for r in p.rejected {
                            reasons.entry(r.sku).or_insert((r.message, r.kept));
                        }
                        let mut refused: Vec<Refused> = Self::positions(
                            input,
                            &b,
                            &positions,
                            reasons.keys().cloned().collect::<Vec<_>>().into_iter(),
                        )
                        .into_iter()
                        .filter(|(i, _)| !done.contains(*i))
                        .map(|(item, sku)| {
                            let (reason, kept) = reasons.remove(&sku).unwrap_or_default();
                            Refused {
                                item,
                                reason,
                                kept,
                                sku,
                            }
                        })
                        .collect();
                        refused.sort_by_key(|r| r.item);
                        // Every item accounted for and no reason given: nothing is left.
                        let rest = p.rest.or_else(|| {
                            let settled = done.len() + refused.len();
                            (settled < b.items.len()).then(|| {
                                AdapterError::Transient(format!(
                                    "the adapter settled {settled} of {} items and said nothing of the others",
                                    b.items.len()
                                ))
                            })
                        });
                        let adjusted = adjusted
                            .into_iter()
                            .filter(|a| done.contains(a.item))
                            .collect();
                        Event::UploadPartial {
                            at_ms: now_ms(),
                            done,
                            refused,
                            rest,
                            adjusted,
                        }
                    }
                    Err(error) => {
                        self.count(|s| &s.upload_failures);
                        Event::UploadFailed {
                            at_ms: now_ms(),
                            error,
                        }
                    }
                })
            }
            Command::Probe { batch, key } => {
                let skip = state
                    .progress()
                    .map(|p| p.upload_skips(batch))
                    .unwrap_or_default();
                // A remainder was sent under its own request key: ask for that one.
                let key = if skip.is_empty() {
                    key
                } else {
                    match self.batch(input, batch, key, &skip, state.progress()).await {
                        Ok((b, _)) => b.request_key(),
                        Err(e) => {
                            tracing::error!(workflow = ctx.id, endpoint = %input.endpoint, error = %e, "cannot build batch");
                            return None;
                        }
                    }
                };
                let result = self
                    .call(input, adapter.probe(&input.endpoint, key))
                    .await?;
                self.count(|s| &s.probes);
                Some(match result {
                    Ok(found) => {
                        if found.is_some() {
                            self.count(|s| &s.probe_hits);
                        }
                        Event::Probed { found }
                    }
                    Err(error) => {
                        self.count(|s| &s.upload_failures);
                        Event::UploadFailed {
                            at_ms: now_ms(),
                            error,
                        }
                    }
                })
            }
            Command::Verify {
                batch,
                key,
                receipt,
            } => {
                let skip = state
                    .progress()
                    .map(|p| p.verify_skips(batch))
                    .unwrap_or_default();
                let (b, positions) = match self
                    .batch(input, batch, key, &skip, state.progress())
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(workflow = ctx.id, endpoint = %input.endpoint, error = %e, "cannot build batch");
                        return None;
                    }
                };
                let result = self.call(input, adapter.verify(&b, &receipt)).await?;
                self.count(|s| &s.verifies);
                Some(match result {
                    Ok(Verification::Verified) => {
                        self.count(|s| &s.verified);
                        Event::Verified
                    }
                    Ok(Verification::Mismatch { details }) => {
                        self.count(|s| &s.mismatches);
                        Event::Mismatch {
                            details,
                            at_ms: Some(now_ms()),
                        }
                    }
                    Err(AdapterError::Partial(p)) => {
                        self.count(|s| &s.verify_failures);
                        let p = *p;
                        let done: ItemSet =
                            Self::positions(input, &b, &positions, p.done.into_iter())
                                .into_iter()
                                .map(|(i, _)| i)
                                .collect();
                        let rest = p.rest.or_else(|| {
                            (done.len() < b.items.len()).then(|| {
                                AdapterError::Transient(format!(
                                    "the adapter confirmed {} of {} items and said nothing of the others",
                                    done.len(),
                                    b.items.len()
                                ))
                            })
                        });
                        Event::VerifyPartial {
                            at_ms: now_ms(),
                            done,
                            rest,
                        }
                    }
                    Err(error) => {
                        self.count(|s| &s.verify_failures);
                        Event::VerifyFailed {
                            at_ms: now_ms(),
                            error,
                        }
                    }
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
    finalize_as(store, staging, run, "finished").await
}

/// [`finalize`], marking the run `status` (`finished` or `cancelled`).
pub async fn finalize_as(
    store: &dyn Store,
    staging: &Staging,
    run: RunId,
    status: &str,
) -> Result<bool> {
    Ok(finalize_run(store, staging, run, status).await? == RunEnd::Finished)
}

/// Where a run stands after [`finalize_run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Every workflow is terminal: settled and marked finished.
    Finished,
    /// Work is left that a worker can do.
    Open,
    /// What is left waits on paused endpoints only (its finished endpoints are settled):
    /// nothing to do until a hold is lifted.
    WaitingOnHolds,
}

/// [`finalize_as`], saying why a run that did not finish is open.
pub async fn finalize_run(
    store: &dyn Store,
    staging: &Staging,
    run: RunId,
    status: &str,
) -> Result<RunEnd> {
    let rows = store.workflows(Some(run), Some(EndpointSync::KIND)).await?;
    let open: Vec<&str> = rows
        .iter()
        .filter(|w| !w.terminal)
        .map(|w| w.subject.as_str())
        .collect();
    if !open.is_empty() {
        // The run waits only on paused endpoints (which may wait for days): what the
        // others confirmed is settled now, so later runs do not send it again. The run
        // itself ends when the paused ones do (settling is idempotent and never replaces
        // what a later run recorded).
        let held: HashSet<String> = store
            .holds()
            .await?
            .into_iter()
            .map(|h| h.subject)
            .collect();
        if open.iter().all(|s| held.contains(*s)) {
            let terminal: Vec<_> = rows.iter().filter(|w| w.terminal).cloned().collect();
            staging.settle(run, &settle_rows(&terminal)?).await?;
            return Ok(RunEnd::WaitingOnHolds);
        }
        return Ok(RunEnd::Open);
    }
    staging.settle(run, &settle_rows(&rows)?).await?;
    let tripped: Vec<&str> = rows
        .iter()
        .filter(|w| w.status == "Tripped" || w.status == bulwark_engine::runtime::RETIRED_STATUS)
        .map(|w| w.subject.as_str())
        .collect();
    let alert = (!tripped.is_empty()).then(|| {
        let shown: Vec<&str> = tripped.iter().copied().take(10).collect();
        let more = tripped.len().saturating_sub(shown.len());
        NewAlert {
            kind: "run_tripped".into(),
            level: AlertLevel::Warn,
            subject: format!("run:{run}"),
            message: format!(
                "run {run} finished with {} of {} endpoint(s) tripped or corrupt: {}{}",
                tripped.len(),
                rows.len(),
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        }
    });
    store.finish_run(run, status, alert).await?;
    Ok(RunEnd::Finished)
}

/// What the terminal endpoint syncs `rows` settled.
fn settle_rows(rows: &[bulwark_engine::WorkflowRow]) -> Result<Vec<Settled>> {
    let mut settled = Vec::new();
    for w in rows {
        let input: SyncInput = match serde_json::from_str(&w.input_json) {
            Ok(i) => i,
            // Retired because its input is unreadable: what it sent is unknown, so the
            // endpoint reads back before its next write.
            Err(_) if w.status == bulwark_engine::runtime::RETIRED_STATUS => {
                settled.push(Settled {
                    endpoint: w.subject.clone(),
                    snapshot: 0,
                    confirmed: None,
                    status: w.status.clone(),
                    carried: Vec::new(),
                    quarantined: Vec::new(),
                    stock: None,
                });
                continue;
            }
            Err(e) => {
                return Err(SyncError::Corrupt(format!(
                    "workflow {}: input does not decode: {e}",
                    w.id
                )));
            }
        };
        let done = w.status == "Done";
        // A skipped endpoint sent nothing; it stays as it was.
        if !done && w.status == "Skipped" {
            continue;
        }
        let (quarantined, stock) = if done {
            let state: State = serde_json::from_str(&w.state_json).map_err(|e| {
                SyncError::Corrupt(format!("workflow {}: state does not decode: {e}", w.id))
            })?;
            let quarantined: Vec<(String, String)> = state
                .quarantined()
                .iter()
                .map(|q| (q.sku.clone(), q.reason.clone()))
                .collect();
            let stock = input.compare_stock.then(|| {
                let shown: Vec<(String, i64, i64)> = state
                    .stock_shown()
                    .iter()
                    .map(|s| (s.sku.clone(), s.qty, s.basis))
                    .collect();
                // A lowered write recorded before, of a SKU this sync wrote as it was:
                // the record goes (a quarantined SKU was not written: it stays).
                let kept: HashSet<&str> = quarantined
                    .iter()
                    .map(|(sku, _)| sku.as_str())
                    .chain(shown.iter().map(|(sku, _, _)| sku.as_str()))
                    .collect();
                let cleared = input
                    .cas
                    .keys()
                    .filter(|sku| !kept.contains(sku.as_str()))
                    .cloned()
                    .collect();
                crate::staging::SettledStock { cleared, shown }
            });
            (quarantined, stock)
        } else {
            (Vec::new(), None)
        };
        let key = input.mapping.as_ref().map(EndpointMapping::cache_key);
        settled.push(Settled {
            endpoint: input.endpoint,
            snapshot: input.snapshot,
            confirmed: done.then_some(key),
            status: w.status.clone(),
            carried: input.retry,
            quarantined,
            stock,
        });
    }
    Ok(settled)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};

    use super::*;

    fn ep(id: &str, url: &str) -> EndpointConfig {
        EndpointConfig {
            id: id.into(),
            adapter: "rest".into(),
            settings: [("base_url".to_string(), url.to_string())].into(),
            policy: None,
        }
    }

    #[test]
    fn endpoints_are_grouped_by_the_host_of_their_url() {
        assert_eq!(
            endpoint_host(&ep("a", "https://user@Portal.Example:8443/ep/a?x=1")).as_deref(),
            Some("portal.example:8443")
        );
        assert_eq!(
            endpoint_host(&ep("b", "http://10.0.0.1/x")).as_deref(),
            Some("10.0.0.1")
        );
        let mut named = ep("c", "http://h/");
        named.settings.insert("host".into(), "group-1".into());
        assert_eq!(endpoint_host(&named).as_deref(), Some("group-1"));
    }

    /// Run `calls` calls of 30 ms through `gates`, each for `endpoint(i)`; returns the
    /// most that were inside at once per key of `group(i)`, and the elapsed time.
    async fn exercise(
        gates: Arc<Gates>,
        calls: usize,
        endpoint: fn(usize) -> String,
    ) -> (usize, Duration) {
        let inside = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..calls {
            let (gates, inside, peak) = (gates.clone(), inside.clone(), peak.clone());
            tasks.spawn(async move {
                let _held = gates.enter(&endpoint(i)).await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            });
        }
        while tasks.join_next().await.is_some() {}
        (peak.load(Ordering::SeqCst), start.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_endpoint_and_per_host_limits_bound_concurrency() {
        let hosts: HashMap<String, String> = (0..10)
            .map(|i| (format!("e{i}"), "h".to_string()))
            .collect();
        // One endpoint, default limits: its calls run one at a time.
        let gates = Arc::new(Gates::new(Limits::default(), hosts.clone()));
        let (peak, _) = exercise(gates, 6, |_| "e0".into()).await;
        assert_eq!(peak, 1);
        // Ten endpoints on one host capped at 3.
        let limits = Limits {
            per_host: Some(3),
            ..Limits::default()
        };
        let gates = Arc::new(Gates::new(limits, hosts.clone()));
        let (peak, _) = exercise(gates, 30, |i| format!("e{}", i % 10)).await;
        assert_eq!(peak, 3);
        // A host's own override wins over the default.
        let limits = Limits {
            per_host: Some(3),
            hosts: [(
                "h".to_string(),
                HostLimits {
                    max_in_flight: Some(5),
                    rate_per_sec: None,
                },
            )]
            .into(),
            ..Limits::default()
        };
        let gates = Arc::new(Gates::new(limits, hosts));
        let (peak, _) = exercise(gates, 30, |i| format!("e{}", i % 10)).await;
        assert_eq!(peak, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_rate_limit_spaces_calls_out() {
        let hosts: HashMap<String, String> = (0..10)
            .map(|i| (format!("e{i}"), "h".to_string()))
            .collect();
        let limits = Limits {
            host_rate_per_sec: Some(20),
            ..Limits::default()
        };
        let gates = Arc::new(Gates::new(limits, hosts));
        // 11 calls at 20/s with no burst: the last starts no sooner than 10 × 50 ms.
        let (_, took) = exercise(gates, 11, |i| format!("e{}", i % 10)).await;
        assert!(took >= Duration::from_millis(480), "{took:?}");
        // An endpoint on no limited host is not slowed.
        let gates = Arc::new(Gates::new(
            Limits {
                host_rate_per_sec: Some(1),
                ..Limits::default()
            },
            HashMap::new(),
        ));
        let (peak, took) = exercise(gates, 10, |i| format!("x{i}")).await;
        assert_eq!(peak, 10);
        assert!(took < Duration::from_millis(1_000), "{took:?}");
    }
}
