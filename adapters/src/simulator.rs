//! [`PortalSimulator`]: a local portal server for tests, demos and benchmarks.
//!
//! One axum server on loopback serves any number of *virtual endpoints* on one port, under
//! `/ep/{endpoint}/...` (endpoint ids are arbitrary path segments such as `ep-0001`). It
//! speaks the protocol of [`RestAdapter`](crate::rest::RestAdapter):
//!
//! * `POST /ep/{e}/batches` (header `Idempotency-Key`, body `{"key", "snapshot", "index",
//!   "items"}`): records the raw delivery; if the key was already applied for that endpoint
//!   it answers 200 with the *same* receipt and applies nothing; otherwise it applies the
//!   items (absolute values) and answers 201 `{"receipt": "r-<uuid>"}`.
//! * `POST /ep/{e}/items/query` (body `{"skus": [...]}`) → `{"items": [...]}` with the
//!   current values (unknown SKUs are absent).
//! * `GET /ep/{e}/uploads/{key}` → `{"receipt": ...}` if applied, else 404.
//! * Admin: `PUT /admin/faults/{e}` (a [`Fault`]), `GET /admin/endpoints/{e}` (what it
//!   received), `PUT /admin/items/{e}/{sku}` (`{"qty": n}`) and `DELETE` of the same path:
//!   a hand edit in the shop, drift that `bulwark reconcile` repairs.
//!
//! With [`SimConfig::no_idempotency`] it is a platform without idempotency keys: every
//! upload is applied (a repeat too) and recorded with its snapshot and arrival time, the
//! shape under which a late write from a paused worker would do harm (effect fencing).
//!
//! Faults ([`Fault`]) are chosen per endpoint from [`SimConfig::profiles`], falling back to
//! [`SimConfig::default_fault`]. With [`SimConfig::required_token`] set, every request must
//! carry `Authorization: Bearer <token>` (else 401).
//!
//! # Durability
//!
//! With [`SimConfig::db_path`] set, every delivery and every applied batch is written to a
//! SQLite file (WAL, `synchronous=FULL`) **before** the HTTP response is sent:
//!
//! ```sql
//! deliveries(endpoint TEXT, key TEXT, batch_index INTEGER, at_ms INTEGER)
//! applied(endpoint TEXT, key TEXT, batch_index INTEGER, items INTEGER, receipt TEXT,
//!         PRIMARY KEY (endpoint, key))
//! ```
//!
//! Writes go through a single group-commit writer task: requests queue their rows with a
//! oneshot acknowledgement and the writer commits everything queued in one transaction, so
//! thousands of uploads per second cost a handful of fsyncs. On start, the applied
//! key → receipt index is reloaded from the file, so a restarted simulator still
//! de-duplicates. **Item values are kept in memory only**: after a restart, queries show
//! nothing until batches are applied again. [`read_counts`] reads the durable record to
//! assert exactly-once delivery.
//!
//! Concurrency: requests for the same endpoint are serialised by a per-endpoint async lock
//! held across the durable write, so a key can never be applied twice, even by concurrent
//! duplicate deliveries.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bulwark_workflows::catalog::Item;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// How long a [`Fault::Flaky`] "stall" delays its (503) answer, after the request was
/// processed: long enough to trip short client timeouts.
pub const FLAKY_STALL_MS: u64 = 2_000;

/// Largest request body accepted (a batch), in bytes.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// Most queued writes the group-commit writer puts in one transaction.
const MAX_GROUP: usize = 4096;

/// Number of shards of the endpoint table.
const ENDPOINT_SHARDS: usize = 32;

/// How an endpoint misbehaves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Accepts and stores everything.
    #[default]
    Healthy,
    /// Every upload is refused with 422 (the delivery is still recorded).
    Reject,
    /// Uploads are accepted but stored with `qty + 1`, so verification mismatches.
    Corrupt,
    /// Each request fails with probability `p_error`, with one of (equally likely):
    /// 500 before processing; 429 with `Retry-After: 1` before processing; 500 *after*
    /// processing (a lost acknowledgement: an upload is applied but the client sees an
    /// error); a stall of [`FLAKY_STALL_MS`] after processing, then 503 (a client with a
    /// shorter timeout sees a timeout); or a connection reset before processing (the
    /// connection is aborted mid-response).
    Flaky {
        /// Probability (0..=1) that a request fails.
        p_error: f64,
    },
    /// The next `times` requests are answered 503 with `Retry-After: <retry_after>` (delta
    /// seconds or an HTTP-date) before processing; then healthy.
    Unavailable {
        /// The header's value.
        retry_after: String,
        /// How many requests get the 503.
        times: u32,
    },
    /// Refuses these SKUs item by item (as a platform refuses a value out of its range or
    /// a SKU it does not know) and applies the rest of each upload: the answer is 200 with
    /// the receipt and `"rejected": [{"sku", "error"}]`; a repeated key gets the same
    /// answer.
    RejectSkus {
        /// The SKUs refused.
        skus: Vec<String>,
    },
    /// Eventually consistent reads (a platform behind a cache or a read replica): after
    /// an upload, the next `reads` read-backs of each SKU it wrote still show the value
    /// it had before.
    StaleReads {
        /// Read-backs per written SKU that lag behind.
        reads: u32,
    },
    /// Healthy, but every request takes `latency_ms` (a slow portal).
    Slow {
        /// Added latency per request, in milliseconds.
        latency_ms: u64,
    },
}

/// Simulator configuration. `Default` is an in-memory, healthy, zero-latency simulator.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// SQLite file for the durable record of deliveries and applied batches (created if
    /// missing). `None`: keep everything in memory.
    pub db_path: Option<PathBuf>,
    /// Artificial latency added to every request, in milliseconds.
    pub latency_ms: u64,
    /// Fault per endpoint id.
    pub profiles: HashMap<String, Fault>,
    /// Fault for endpoints not in `profiles`.
    pub default_fault: Fault,
    /// If set, every request must carry `Authorization: Bearer <token>`, else 401.
    pub required_token: Option<String>,
    /// Behave like a platform **without idempotency keys**: every upload is applied, a
    /// repeated key included, and `GET /ep/{e}/uploads/{key}` knows no upload (404). The
    /// durable record then also gets a `writes` row per applied upload, with the snapshot
    /// it carried and when it arrived, so a test can tell stale or late writes apart.
    pub no_idempotency: bool,
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("db_path", &self.db_path)
            .field("latency_ms", &self.latency_ms)
            .field("profiles", &self.profiles)
            .field("default_fault", &self.default_fault)
            .field("no_idempotency", &self.no_idempotency)
            .field(
                "required_token",
                &self.required_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl SimConfig {
    /// The fault that applies to `endpoint`.
    pub fn fault_for(&self, endpoint: &str) -> &Fault {
        self.profiles.get(endpoint).unwrap_or(&self.default_fault)
    }
}

/// Live counters of a simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// HTTP requests handled (all routes).
    pub requests: u64,
    /// Upload deliveries received with a well-formed body (raw, including duplicates and
    /// rejected ones).
    pub uploads_received: u64,
    /// Batches applied (first delivery of a key).
    pub batches_applied: u64,
    /// Keys applied a second time. Must stay 0: an applied key is never applied again.
    pub duplicates_applied: u64,
    /// Deliveries of an already-applied key, answered with the original receipt.
    pub deduplicated: u64,
    /// Uploads refused by a [`Fault::Reject`] endpoint.
    pub rejected: u64,
    /// Items refused by a [`Fault::RejectSkus`] endpoint (the rest of their uploads applied).
    #[serde(default)]
    pub items_refused: u64,
    /// Failures injected by [`Fault::Flaky`] endpoints.
    pub faults_injected: u64,
}

/// Counts read from a simulator's durable record (see [`read_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Rows in `deliveries` (raw upload deliveries).
    pub deliveries: u64,
    /// Rows in `applied` (distinct `(endpoint, key)` applied).
    pub applied: u64,
    /// Distinct `(endpoint, batch_index)` pairs applied.
    pub distinct_applied_pairs: u64,
    /// `(endpoint, batch_index)` pairs applied more than once (under different keys, e.g.
    /// a resend after a failed validation, or batches of different snapshots).
    pub duplicate_pairs: u64,
}

/// Simulator failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The listening socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("simulator server error: {0}")]
    Io(#[from] std::io::Error),
    /// The SQLite record could not be opened, created or read.
    #[error("simulator database {path}: {source}", path = path.display())]
    Db {
        /// Database file.
        path: PathBuf,
        /// Cause.
        source: sqlx::Error,
    },
}

// ---------------------------------------------------------------------------------------
// Durable writer
// ---------------------------------------------------------------------------------------

enum WriteOp {
    Delivery {
        endpoint: String,
        key: Uuid,
        index: u32,
        at_ms: i64,
    },
    Applied {
        endpoint: String,
        key: Uuid,
        index: u32,
        items: i64,
        receipt: Arc<str>,
    },
    /// An applied upload, in [`SimConfig::no_idempotency`] mode (keys may repeat).
    Write {
        endpoint: String,
        key: Uuid,
        snapshot: i64,
        index: u32,
        items: i64,
        at_ms: i64,
    },
}

struct WriteReq {
    ops: Vec<WriteOp>,
    ack: oneshot::Sender<Result<(), String>>,
}

struct Writer {
    tx: mpsc::Sender<WriteReq>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

async fn open_db(path: &Path) -> Result<SqliteConnection, sqlx::Error> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS deliveries (
             endpoint TEXT NOT NULL,
             key TEXT NOT NULL,
             batch_index INTEGER NOT NULL,
             at_ms INTEGER NOT NULL
         );
         CREATE TABLE IF NOT EXISTS applied (
             endpoint TEXT NOT NULL,
             key TEXT NOT NULL,
             batch_index INTEGER NOT NULL,
             items INTEGER NOT NULL,
             receipt TEXT NOT NULL,
             PRIMARY KEY (endpoint, key)
         );
         CREATE TABLE IF NOT EXISTS writes (
             endpoint TEXT NOT NULL,
             key TEXT NOT NULL,
             snapshot INTEGER NOT NULL,
             batch_index INTEGER NOT NULL,
             items INTEGER NOT NULL,
             at_ms INTEGER NOT NULL
         );",
    )
    .execute(&mut conn)
    .await?;
    Ok(conn)
}

async fn commit_group(conn: &mut SqliteConnection, group: &[WriteReq]) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    for req in group {
        for op in &req.ops {
            match op {
                WriteOp::Delivery {
                    endpoint,
                    key,
                    index,
                    at_ms,
                } => {
                    sqlx::query("INSERT INTO deliveries (endpoint, key, batch_index, at_ms) VALUES (?, ?, ?, ?)")
                        .bind(endpoint.as_str())
                        .bind(key.to_string())
                        .bind(i64::from(*index))
                        .bind(*at_ms)
                        .execute(&mut *tx)
                        .await?;
                }
                WriteOp::Applied {
                    endpoint,
                    key,
                    index,
                    items,
                    receipt,
                } => {
                    sqlx::query(
                        "INSERT INTO applied (endpoint, key, batch_index, items, receipt) VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(endpoint.as_str())
                    .bind(key.to_string())
                    .bind(i64::from(*index))
                    .bind(*items)
                    .bind(&**receipt)
                    .execute(&mut *tx)
                    .await?;
                }
                WriteOp::Write {
                    endpoint,
                    key,
                    snapshot,
                    index,
                    items,
                    at_ms,
                } => {
                    sqlx::query(
                        "INSERT INTO writes (endpoint, key, snapshot, batch_index, items, at_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    )
                    .bind(endpoint.as_str())
                    .bind(key.to_string())
                    .bind(*snapshot)
                    .bind(i64::from(*index))
                    .bind(*items)
                    .bind(*at_ms)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
    }
    tx.commit().await
}

async fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<WriteReq>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut group = Vec::with_capacity(256);
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut group, MAX_GROUP) => if n == 0 { break },
            _ = &mut stop => break,
        }
        let result = commit_group(&mut conn, &group)
            .await
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = group.len(), "simulator: group commit failed");
        }
        for req in group.drain(..) {
            let _ = req.ack.send(result.clone());
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "simulator: closing database failed");
    }
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct EndpointData {
    items: HashMap<String, Item>,
    applied: HashMap<Uuid, Arc<str>>,
    /// The items each applied key had refused (its answer is repeated on a duplicate).
    refused: HashMap<Uuid, Vec<Value>>,
    /// Upload deliveries received (well-formed; including rejected and duplicate ones).
    deliveries: u64,
    /// Times each (snapshot, batch index) was applied (under distinct keys).
    applied_batches: std::collections::BTreeMap<(i64, u32), u32>,
    /// [`Fault::StaleReads`]: per SKU, the value reads still show and how many more.
    lagging: HashMap<String, (Option<Item>, u32)>,
}

/// What one endpoint of a simulator received (since it started; kept in memory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointReport {
    /// Upload deliveries received (including rejected and duplicate ones).
    pub deliveries: u64,
    /// Times each (snapshot, batch index) was applied under a distinct key: 1 each when
    /// every batch landed exactly once.
    pub applied_batches: Vec<((i64, u32), u32)>,
}

type Slot = Arc<tokio::sync::Mutex<EndpointData>>;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    uploads_received: AtomicU64,
    batches_applied: AtomicU64,
    duplicates_applied: AtomicU64,
    deduplicated: AtomicU64,
    rejected: AtomicU64,
    items_refused: AtomicU64,
    faults_injected: AtomicU64,
}

struct Inner {
    config: SimConfig,
    bearer: Option<String>,
    shards: Box<[Mutex<HashMap<String, Slot>>]>,
    hasher: std::collections::hash_map::RandomState,
    counters: Counters,
    writer: Option<Writer>,
    overrides: Mutex<HashMap<String, Fault>>,
}

/// The shared state of a simulator; cheap to clone. Build it with [`SimState::open`] and
/// serve it with [`router`] to embed the simulator in another axum app.
#[derive(Clone)]
pub struct SimState {
    inner: Arc<Inner>,
}

impl fmt::Debug for SimState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimState")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl SimState {
    /// Open the state: if `config.db_path` is set, create/open the SQLite record, reload
    /// the applied key → receipt index from it, and start the group-commit writer task
    /// (needs a Tokio runtime).
    pub async fn open(config: SimConfig) -> Result<Self, SimError> {
        let mut loaded: HashMap<String, EndpointData> = HashMap::new();
        let writer = match &config.db_path {
            None => None,
            Some(path) => {
                let db_err = |source| SimError::Db {
                    path: path.clone(),
                    source,
                };
                let mut conn = open_db(path).await.map_err(db_err)?;
                let rows: Vec<(String, String, String)> =
                    sqlx::query_as("SELECT endpoint, key, receipt FROM applied")
                        .fetch_all(&mut conn)
                        .await
                        .map_err(db_err)?;
                for (endpoint, key, receipt) in rows {
                    match Uuid::parse_str(&key) {
                        Ok(key) => {
                            loaded
                                .entry(endpoint)
                                .or_default()
                                .applied
                                .insert(key, receipt.into());
                        }
                        Err(_) => {
                            tracing::warn!(%endpoint, %key, "simulator: skipping unparsable key")
                        }
                    }
                }
                let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
                let (stop_tx, stop_rx) = oneshot::channel();
                let task = tokio::spawn(writer_loop(conn, rx, stop_rx));
                Some(Writer {
                    tx,
                    stop: Mutex::new(Some(stop_tx)),
                    task: Mutex::new(Some(task)),
                })
            }
        };
        let hasher = std::collections::hash_map::RandomState::new();
        let mut shards: Vec<HashMap<String, Slot>> =
            (0..ENDPOINT_SHARDS).map(|_| HashMap::new()).collect();
        for (endpoint, data) in loaded {
            let idx = (hasher.hash_one(endpoint.as_str()) as usize) % ENDPOINT_SHARDS;
            shards[idx].insert(endpoint, Arc::new(tokio::sync::Mutex::new(data)));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                bearer: config
                    .required_token
                    .as_ref()
                    .map(|t| format!("Bearer {t}")),
                config,
                shards: shards.into_iter().map(Mutex::new).collect(),
                hasher,
                counters: Counters::default(),
                writer,
                overrides: Mutex::default(),
            }),
        })
    }

    /// The configuration this state was opened with.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            requests: l(&c.requests),
            uploads_received: l(&c.uploads_received),
            batches_applied: l(&c.batches_applied),
            duplicates_applied: l(&c.duplicates_applied),
            deduplicated: l(&c.deduplicated),
            rejected: l(&c.rejected),
            items_refused: l(&c.items_refused),
            faults_injected: l(&c.faults_injected),
        }
    }

    /// Stop the durable writer after it has committed everything queued, and close the
    /// database. Later uploads fail with 500. Idempotent; a no-op without `db_path`.
    pub async fn close(&self) {
        let Some(writer) = &self.inner.writer else {
            return;
        };
        let stop = writer.stop.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let task = writer.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn slot(&self, endpoint: &str) -> Slot {
        let idx = (self.inner.hasher.hash_one(endpoint) as usize) % ENDPOINT_SHARDS;
        let mut shard = self.inner.shards[idx]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = shard.get(endpoint) {
            return slot.clone();
        }
        shard.entry(endpoint.to_owned()).or_default().clone()
    }

    /// Commit `ops` durably (no-op without a database).
    async fn persist(&self, ops: Vec<WriteOp>) -> Result<(), String> {
        let Some(writer) = &self.inner.writer else {
            return Ok(());
        };
        let (ack, done) = oneshot::channel();
        writer
            .tx
            .send(WriteReq { ops, ack })
            .await
            .map_err(|_| "durable writer stopped".to_owned())?;
        done.await
            .map_err(|_| "durable writer stopped".to_owned())?
    }

    /// Change `endpoint`'s fault from now on (e.g. heal a broken endpoint).
    pub fn set_fault(&self, endpoint: &str, fault: Fault) {
        self.inner
            .overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(endpoint.to_string(), fault);
    }

    /// The fault that applies to `endpoint` now.
    pub fn fault_for(&self, endpoint: &str) -> Fault {
        let overrides = self
            .inner
            .overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        overrides
            .get(endpoint)
            .unwrap_or_else(|| self.inner.config.fault_for(endpoint))
            .clone()
    }

    /// Change what `endpoint` shows for `sku` as a person editing the shop by hand would:
    /// set its quantity (an unknown SKU is created without price tiers), or with `None`
    /// delete it. Nothing is recorded as delivered: this is drift, for reconcile to find.
    pub async fn edit_item(&self, endpoint: &str, sku: &str, qty: Option<i64>) {
        let slot = self.slot(endpoint);
        let mut data = slot.lock().await;
        match qty {
            Some(qty) => {
                data.items
                    .entry(sku.to_string())
                    .or_insert_with(|| Item {
                        sku: sku.to_string(),
                        qty,
                        tiers: Vec::new(),
                    })
                    .qty = qty;
            }
            None => {
                data.items.remove(sku);
            }
        }
    }

    /// What `endpoint` received so far.
    pub async fn endpoint_report(&self, endpoint: &str) -> EndpointReport {
        let slot = self.slot(endpoint);
        let data = slot.lock().await;
        EndpointReport {
            deliveries: data.deliveries,
            applied_batches: data.applied_batches.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }

    /// Common request preamble: count, latency, auth, fault dice.
    async fn admit(&self, endpoint: &str, headers: &HeaderMap) -> Result<(Fault, After), Response> {
        let inner = &self.inner;
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        if inner.config.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(inner.config.latency_ms)).await;
        }
        if let Some(expected) = &inner.bearer {
            let ok = headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == expected.as_bytes());
            if !ok {
                return Err(error(
                    StatusCode::UNAUTHORIZED,
                    "missing or invalid bearer token",
                ));
            }
        }
        let fault = self.fault_for(endpoint);
        if let Fault::Unavailable { retry_after, times } = &fault {
            let next = match times {
                0 | 1 => Fault::Healthy,
                n => Fault::Unavailable {
                    retry_after: retry_after.clone(),
                    times: n - 1,
                },
            };
            self.set_fault(endpoint, next);
            if *times > 0 {
                inner
                    .counters
                    .faults_injected
                    .fetch_add(1, Ordering::Relaxed);
                let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "injected maintenance");
                if let Ok(v) = HeaderValue::from_str(retry_after) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
                return Err(resp);
            }
        }
        if let Fault::Slow { latency_ms } = fault {
            tokio::time::sleep(Duration::from_millis(latency_ms)).await;
        }
        let mut after = After::Normal;
        if let Fault::Flaky { p_error } = fault {
            let roll = {
                let mut rng = rand::rng();
                if rng.random_bool(p_error.clamp(0.0, 1.0)) {
                    Some(rng.random_range(0..5u8))
                } else {
                    None
                }
            };
            if let Some(kind) = roll {
                inner
                    .counters
                    .faults_injected
                    .fetch_add(1, Ordering::Relaxed);
                match kind {
                    0 => return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "injected failure")),
                    1 => {
                        let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "injected rate limit");
                        resp.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        return Err(resp);
                    }
                    2 => after = After::LostAck,
                    3 => after = After::Stall,
                    _ => return Err(reset()),
                }
            }
        }
        Ok((fault, after))
    }
}

/// What happens to a response after the request was processed.
#[derive(Debug, Clone, Copy)]
enum After {
    Normal,
    LostAck,
    Stall,
}

impl After {
    async fn finish(self, resp: Response) -> Response {
        match self {
            After::Normal => resp,
            After::LostAck => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected failure after processing",
            ),
            After::Stall => {
                tokio::time::sleep(Duration::from_millis(FLAKY_STALL_MS)).await;
                error(StatusCode::SERVICE_UNAVAILABLE, "injected stall")
            }
        }
    }
}

/// A response whose body fails at once: hyper aborts the connection mid-response, which
/// the client sees as a reset connection.
fn reset() -> Response {
    let body = axum::body::Body::from_stream(futures::stream::once(async {
        Err::<axum::body::Bytes, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection reset",
        ))
    }));
    (StatusCode::OK, body).into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct UploadReq {
    key: Uuid,
    #[serde(default)]
    snapshot: i64,
    #[serde(default)]
    index: u32,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct QueryReq {
    skus: Vec<String>,
}

async fn upload(
    State(state): State<SimState>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<UploadReq>, JsonRejection>,
) -> Response {
    // A real portal finishes what it started even if the client hangs up (e.g. the client
    // was killed mid-request): hyper drops the handler future on disconnect, so the work
    // runs in its own task, else the durable record and the in-memory index could part.
    match tokio::spawn(upload_to_completion(state, endpoint, headers, body)).await {
        Ok(resp) => resp,
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("upload task failed: {e}"),
        ),
    }
}

async fn upload_to_completion(
    state: SimState,
    endpoint: String,
    headers: HeaderMap,
    body: Result<Json<UploadReq>, JsonRejection>,
) -> Response {
    let (fault, after) = match state.admit(&endpoint, &headers).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(rej) => return error(StatusCode::BAD_REQUEST, &rej.body_text()),
    };
    if let Some(h) = headers.get("idempotency-key") {
        let matches = h
            .to_str()
            .ok()
            .and_then(|s| Uuid::parse_str(s.trim()).ok())
            .is_some_and(|k| k == req.key);
        if !matches {
            return error(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key header does not match body key",
            );
        }
    }
    let counters = &state.inner.counters;
    counters.uploads_received.fetch_add(1, Ordering::Relaxed);
    let no_idempotency = state.inner.config.no_idempotency;
    let at_ms = now_ms();
    let delivery = WriteOp::Delivery {
        endpoint: endpoint.clone(),
        key: req.key,
        index: req.index,
        at_ms,
    };

    let slot = state.slot(&endpoint);
    let resp = {
        let mut data = slot.lock().await;
        data.deliveries += 1;
        if fault == Fault::Reject {
            if let Err(e) = state.persist(vec![delivery]).await {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("durable write failed: {e}"),
                );
            }
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!(
                    "validation failed: endpoint {endpoint} refuses batch {}",
                    req.index
                ),
            )
        } else if let Some(receipt) = data
            .applied
            .get(&req.key)
            .filter(|_| !no_idempotency)
            .cloned()
        {
            if let Err(e) = state.persist(vec![delivery]).await {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("durable write failed: {e}"),
                );
            }
            counters.deduplicated.fetch_add(1, Ordering::Relaxed);
            let mut body = json!({ "receipt": &*receipt });
            if let Some(r) = data.refused.get(&req.key) {
                body["rejected"] = Value::Array(r.clone());
            }
            (StatusCode::OK, Json(body)).into_response()
        } else {
            let receipt: Arc<str> = format!("r-{}", Uuid::new_v4()).into();
            let items = i64::try_from(req.items.len()).unwrap_or(i64::MAX);
            let applied = if no_idempotency {
                WriteOp::Write {
                    endpoint: endpoint.clone(),
                    key: req.key,
                    snapshot: req.snapshot,
                    index: req.index,
                    items,
                    at_ms,
                }
            } else {
                WriteOp::Applied {
                    endpoint: endpoint.clone(),
                    key: req.key,
                    index: req.index,
                    items,
                    receipt: receipt.clone(),
                }
            };
            if let Err(e) = state.persist(vec![delivery, applied]).await {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("durable write failed: {e}"),
                );
            }
            let corrupt = fault == Fault::Corrupt;
            let refuse: &[String] = match &fault {
                Fault::RejectSkus { skus } => skus,
                _ => &[],
            };
            let mut refused = Vec::new();
            for mut item in req.items {
                if refuse.contains(&item.sku) {
                    counters.items_refused.fetch_add(1, Ordering::Relaxed);
                    refused.push(json!({
                        "sku": item.sku,
                        "error": format!("price tier {} is below the platform's minimum", item.tiers.first().map_or(0, |t| t.price_minor)),
                    }));
                    continue;
                }
                if corrupt {
                    item.qty += 1;
                }
                let sku = item.sku.clone();
                let previous = data.items.insert(sku.clone(), item);
                if let Fault::StaleReads { reads } = fault {
                    data.lagging.insert(sku, (previous, reads));
                }
            }
            if no_idempotency {
                // No record of keys: a repeat is applied again, and no probe finds it.
            } else if data.applied.insert(req.key, receipt.clone()).is_some() {
                counters.duplicates_applied.fetch_add(1, Ordering::Relaxed);
            }
            *data
                .applied_batches
                .entry((req.snapshot, req.index))
                .or_default() += 1;
            counters.batches_applied.fetch_add(1, Ordering::Relaxed);
            let mut body = json!({ "receipt": &*receipt });
            if !refused.is_empty() {
                body["rejected"] = Value::Array(refused.clone());
                data.refused.insert(req.key, refused);
            }
            (StatusCode::CREATED, Json(body)).into_response()
        }
    };
    after.finish(resp).await
}

async fn query(
    State(state): State<SimState>,
    UrlPath(endpoint): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Json<QueryReq>, JsonRejection>,
) -> Response {
    let (_, after) = match state.admit(&endpoint, &headers).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(rej) => return error(StatusCode::BAD_REQUEST, &rej.body_text()),
    };
    let slot = state.slot(&endpoint);
    let items: Vec<Item> = {
        let mut data = slot.lock().await;
        let data = &mut *data;
        req.skus
            .iter()
            .filter_map(|s| match data.lagging.get_mut(s) {
                Some((shown, left)) if *left > 0 => {
                    *left -= 1;
                    shown.clone()
                }
                _ => data.items.get(s).cloned(),
            })
            .collect()
    };
    after
        .finish(Json(json!({ "items": items })).into_response())
        .await
}

async fn probe(
    State(state): State<SimState>,
    UrlPath((endpoint, key)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let (_, after) = match state.admit(&endpoint, &headers).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Ok(key) = Uuid::parse_str(&key) else {
        return error(StatusCode::BAD_REQUEST, "upload key is not a uuid");
    };
    let slot = state.slot(&endpoint);
    let receipt = slot.lock().await.applied.get(&key).cloned();
    let resp = match receipt {
        Some(r) => Json(json!({ "receipt": &*r })).into_response(),
        None => error(StatusCode::NOT_FOUND, "no upload with this key"),
    };
    after.finish(resp).await
}

async fn set_fault(
    State(state): State<SimState>,
    UrlPath(endpoint): UrlPath<String>,
    Json(fault): Json<Fault>,
) -> StatusCode {
    state.set_fault(&endpoint, fault);
    StatusCode::NO_CONTENT
}

/// Body of `PUT /admin/items/{endpoint}/{sku}`.
#[derive(Debug, Deserialize)]
struct EditReq {
    qty: i64,
}

async fn edit_item(
    State(state): State<SimState>,
    UrlPath((endpoint, sku)): UrlPath<(String, String)>,
    Json(req): Json<EditReq>,
) -> StatusCode {
    state.edit_item(&endpoint, &sku, Some(req.qty)).await;
    StatusCode::NO_CONTENT
}

async fn delete_item(
    State(state): State<SimState>,
    UrlPath((endpoint, sku)): UrlPath<(String, String)>,
) -> StatusCode {
    state.edit_item(&endpoint, &sku, None).await;
    StatusCode::NO_CONTENT
}

async fn endpoint_report(
    State(state): State<SimState>,
    UrlPath(endpoint): UrlPath<String>,
) -> Json<EndpointReport> {
    Json(state.endpoint_report(&endpoint).await)
}

/// The simulator's routes (`/ep/{endpoint}/batches`, `/ep/{endpoint}/items/query`,
/// `/ep/{endpoint}/uploads/{key}`) over `state`, for embedding in another axum server.
pub fn router(state: SimState) -> Router {
    Router::new()
        .route("/ep/{endpoint}/batches", post(upload))
        .route("/ep/{endpoint}/items/query", post(query))
        .route("/ep/{endpoint}/uploads/{key}", get(probe))
        .route("/admin/faults/{endpoint}", axum::routing::put(set_fault))
        .route("/admin/endpoints/{endpoint}", get(endpoint_report))
        .route(
            "/admin/items/{endpoint}/{sku}",
            axum::routing::put(edit_item).delete(delete_item),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// Namespace for starting the simulator; see also the free functions [`start`] and
/// [`serve_forever`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PortalSimulator;

impl PortalSimulator {
    /// Same as [`start`].
    pub async fn start(config: SimConfig, addr: SocketAddr) -> Result<SimHandle, SimError> {
        start(config, addr).await
    }
}

/// A running simulator. Dropping it without [`SimHandle::shutdown`] stops the server in
/// the background.
pub struct SimHandle {
    addr: SocketAddr,
    scheme: &'static str,
    state: SimState,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .field("state", &self.state)
            .finish()
    }
}

impl SimHandle {
    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `base_url` setting for a virtual endpoint: `http://{addr}/ep/{endpoint}`
    /// (`https://…` when started with TLS; its certificate must name the address).
    pub fn base_url(&self, endpoint: &str) -> String {
        format!("{}://{}/ep/{endpoint}", self.scheme, self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.state.stats()
    }

    /// The shared state.
    pub fn state(&self) -> &SimState {
        &self.state
    }

    /// Stop accepting requests, let in-flight ones finish (at most 5 s), then flush and
    /// close the durable record.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let mut result = Ok(());
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => result = Err(SimError::Io(e)),
                Ok(Err(join)) => {
                    result = Err(SimError::Io(std::io::Error::other(join.to_string())))
                }
                Err(_) => server.abort(),
            }
        }
        self.state.close().await;
        result
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Open the state for `config`, bind `addr` (use port 0 for an ephemeral port) and serve
/// in a background task.
pub async fn start(config: SimConfig, addr: SocketAddr) -> Result<SimHandle, SimError> {
    start_with(config, addr, None).await
}

/// Like [`start`], serving HTTPS when `tls` is set.
pub async fn start_with(
    config: SimConfig,
    addr: SocketAddr,
    tls: Option<&crate::sim_tls::ServerTls>,
) -> Result<SimHandle, SimError> {
    let acceptor = tls.map(|t| t.acceptor()).transpose()?;
    let state = SimState::open(config).await?;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(source) => {
            state.close().await;
            return Err(SimError::Bind { addr, source });
        }
    };
    let bound = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let app = router(state.clone());
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    let server = tokio::spawn(crate::sim_tls::serve(listener, acceptor, app, stop_rx));
    tracing::info!(addr = %bound, scheme, "portal simulator listening");
    Ok(SimHandle {
        addr: bound,
        scheme,
        state,
        stop: Some(stop_tx),
        server: Some(server),
    })
}

/// Run a simulator on `addr` until Ctrl-C, then shut it down cleanly.
pub async fn serve_forever(
    config: SimConfig,
    addr: SocketAddr,
    tls: Option<&crate::sim_tls::ServerTls>,
) -> Result<(), SimError> {
    let handle = start_with(config, addr, tls).await?;
    tracing::info!(addr = %handle.addr(), "portal simulator running; press Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    let stats = handle.stats();
    tracing::info!(?stats, "portal simulator stopping");
    handle.shutdown().await
}

/// Read the durable record at `db_path` (of a running or stopped simulator).
pub async fn read_counts(db_path: impl AsRef<Path>) -> Result<Counts, SimError> {
    let path = db_path.as_ref();
    let db_err = |source| SimError::Db {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(db_err)?;
    let (deliveries, applied, distinct_applied_pairs, duplicate_pairs): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT
             (SELECT COUNT(*) FROM deliveries),
             (SELECT COUNT(*) FROM applied),
             (SELECT COUNT(*) FROM (SELECT DISTINCT endpoint, batch_index FROM applied)),
             (SELECT COUNT(*) FROM (SELECT 1 FROM applied GROUP BY endpoint, batch_index HAVING COUNT(*) > 1))",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(db_err)?;
    let _ = conn.close().await;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(Counts {
        deliveries: n(deliveries),
        applied: n(applied),
        distinct_applied_pairs: n(distinct_applied_pairs),
        duplicate_pairs: n(duplicate_pairs),
    })
}
