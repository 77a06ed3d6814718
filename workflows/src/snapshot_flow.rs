//! The `Snapshot` workflow: the one gentle read of the legacy source as a journaled state
//! machine on the engine (kind `"snapshot"`).
//!
//! ```text
//!            Page (full)                         Page (short: the last one)
//!   Paging ──────────────▶ Paging(cursor') ───────────────────────────▶ Finishing
//!     │  ▲                                                                 │
//!     │  │ WindowOpened                                         Sealed /   │ Aborted
//!     ▼  │                                                                 ▼
//!   Paused{cursor, resume_at}                                   Sealed  |  Aborted
//!     (WindowClosed: outside the window)
//! ```
//!
//! Every page is read by key (`key > cursor ORDER BY key LIMIT page_size`), validated and
//! written to staging idempotently *before* its `Page` event is journaled; a crash between
//! the two re-reads the same page (same cursor) and re-writes it with no effect, so a
//! resumed snapshot seals with the same content hash as an uninterrupted one. Between pages
//! it pauses (`pause_ms`); outside its window (cron start + maximum duration) it parks in
//! `Paused` until the next window opens and continues from its cursor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bulwark_engine::{
    Alert, AlertLevel, Effects, Journal, JournalConfig, Machine, NewWorkflow, Notice, RunId,
    Runtime, RuntimeConfig, Transition, TransitionError, WorkflowCtx, now_ms,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::{Result, SyncError};
use crate::snapshot::{LegacySource, RawRow, SnapshotOptions, SnapshotReport, validate};
use crate::staging::{ChangeGuard, Reject, SealStats, Staging};

/// When a snapshot may read the source: windows opening at each occurrence of a cron
/// expression (5 fields, or 6 with seconds first) and lasting at most `max_duration_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotWindow {
    /// Cron expression of the window starts, in UTC (e.g. `"0 2 * * *"`: 02:00 daily).
    pub cron: String,
    /// How long each window stays open, in milliseconds.
    pub max_duration_ms: i64,
}

/// Whether the window is open at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowStatus {
    /// Open until this time (ms).
    OpenUntil(i64),
    /// Closed; the next window opens at this time (ms).
    ClosedUntil(i64),
}

impl SnapshotWindow {
    fn parse(&self) -> Result<croner::Cron> {
        croner::Cron::new(&self.cron)
            .with_seconds_optional()
            .parse()
            .map_err(|e| SyncError::Config(format!("snapshot window cron {:?}: {e}", self.cron)))
    }

    /// Check the expression and duration.
    pub fn validate(&self) -> Result<()> {
        if self.max_duration_ms <= 0 {
            return Err(SyncError::Config(
                "snapshot window: max duration must be positive".into(),
            ));
        }
        self.parse().map(|_| ())
    }

    /// Is the window open at `at_ms`? (The latest start at or before `at_ms` plus the
    /// duration decides; otherwise the next start.)
    pub fn status(&self, at_ms: i64) -> Result<WindowStatus> {
        let cron = self.parse()?;
        let to_dt = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
                .ok_or_else(|| SyncError::Config(format!("time {ms} out of range")))
        };
        let now = to_dt(at_ms)?;
        let from = to_dt(at_ms - self.max_duration_ms)?;
        let mut open_until = None;
        let mut t = from;
        loop {
            let next = cron
                .find_next_occurrence(&t, false)
                .map_err(|e| SyncError::Config(format!("snapshot window: {e}")))?;
            if next > now {
                break;
            }
            open_until = Some(next.timestamp_millis() + self.max_duration_ms);
            t = next;
        }
        match open_until {
            Some(until) if until > at_ms => Ok(WindowStatus::OpenUntil(until)),
            _ => {
                let next = cron
                    .find_next_occurrence(&now, false)
                    .map_err(|e| SyncError::Config(format!("snapshot window: {e}")))?;
                Ok(WindowStatus::ClosedUntil(next.timestamp_millis()))
            }
        }
    }
}

/// Immutable input of one snapshot workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInput {
    /// The staging snapshot being filled.
    pub snapshot: i64,
    /// Source description (no credentials).
    pub source: String,
    /// Rows per page.
    pub page_size: u32,
    /// Pause between pages, in milliseconds.
    pub pause_ms: u64,
    /// Minimum quantities of the price tiers, in tier order.
    pub tier_min_qty: Vec<u32>,
    /// Abort if more than this share of rows is rejected.
    pub max_rejected_share: f64,
    /// When the snapshot is held instead of sealed (journals before it hold the default).
    #[serde(default)]
    pub guard: ChangeGuard,
    /// When the source may be read (always, if absent).
    #[serde(default)]
    pub window: Option<SnapshotWindow>,
}

/// Running counters, journaled with every page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCounts {
    /// Rows read.
    pub read: i64,
    /// Rows accepted.
    pub accepted: i64,
    /// Rows rejected.
    pub rejected: i64,
    /// Page queries sent to the source (journaled pages).
    pub queries: i64,
    /// Times the workflow paused at a window's end.
    pub pauses: i64,
}

/// Persisted state of a snapshot workflow. Variant names are schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotState {
    /// Reading the page after `cursor` (from the start if `None`).
    Paging {
        /// Key of the last row written.
        cursor: Option<String>,
        /// Index of the next page.
        page_no: u32,
        /// Counters so far.
        counts: SnapshotCounts,
    },
    /// Outside the window: waits until `resume_at`, then continues after `cursor`.
    Paused {
        /// Key of the last row written.
        cursor: Option<String>,
        /// Index of the next page.
        page_no: u32,
        /// Counters so far.
        counts: SnapshotCounts,
        /// When the next window opens (ms).
        resume_at: i64,
    },
    /// Every page read: sealing (or aborting) the snapshot.
    Finishing {
        /// Final counters.
        counts: SnapshotCounts,
    },
    /// Sealed: visible to sync runs.
    Sealed {
        /// Final counters.
        counts: SnapshotCounts,
        /// Content hash.
        hash: String,
    },
    /// Sealed but held: it changes too much against the previous sealed snapshot, so no
    /// sync uses it until an operator approves it.
    Held {
        /// Final counters.
        counts: SnapshotCounts,
        /// Content hash.
        hash: String,
        /// Why it is held.
        reason: String,
    },
    /// Aborted (too many rejected rows); never synced.
    Aborted {
        /// Final counters.
        counts: SnapshotCounts,
        /// Why.
        reason: String,
    },
}

/// Facts fed to a snapshot workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotEvent {
    /// A page was read and written to staging.
    Page {
        /// Rows the query returned.
        rows: u32,
        /// Rows accepted.
        accepted: u32,
        /// Rows rejected.
        rejected: u32,
        /// Key of the page's last row.
        last_key: Option<String>,
        /// Rows the query returned after `last_key` and left for the next page: the
        /// look-ahead row, and the rows sharing its key at the end of the page, so that
        /// rows with one key are always read (and judged as duplicates) together.
        #[serde(default, skip_serializing_if = "is_zero")]
        held_back: u32,
    },
    /// The window is closed (checked at `at_ms`); it opens again at `next_open_ms`.
    WindowClosed {
        /// When this was found (ms).
        at_ms: i64,
        /// When the next window opens (ms).
        next_open_ms: i64,
    },
    /// The window opened again.
    WindowOpened {
        /// When (ms).
        at_ms: i64,
    },
    /// The snapshot was sealed with this content hash.
    Sealed {
        /// Content hash.
        hash: String,
        /// Rejected rows that kept their SKU's last accepted value.
        #[serde(default)]
        carried: Carried,
    },
    /// The snapshot was sealed held (see [`SnapshotState::Held`]).
    Held {
        /// Content hash.
        hash: String,
        /// Why.
        reason: String,
        /// Rejected rows that kept their SKU's last accepted value.
        #[serde(default)]
        carried: Carried,
    },
    /// The snapshot was aborted.
    Aborted {
        /// Why.
        reason: String,
    },
}

/// Rejected rows whose SKU kept its last accepted value, as journaled: how many, and the
/// first few as "SKU: reason".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    /// How many.
    pub total: u32,
    /// The first [`Carried::SHOWN`], "SKU: why its row was rejected".
    pub first: Vec<String>,
}

impl Carried {
    /// How many carried SKUs are named.
    pub const SHOWN: usize = 20;

    fn from_rows(rows: &[(String, String)]) -> Self {
        Self {
            total: rows.len() as u32,
            first: rows
                .iter()
                .take(Self::SHOWN)
                .map(|(sku, why)| format!("{sku}: {why}"))
                .collect(),
        }
    }
}

/// Effects of a snapshot workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCommand {
    /// Read (after the window check and the pause) the page after `cursor`.
    Page {
        /// Key of the last row written.
        cursor: Option<String>,
        /// Index of the page.
        page_no: u32,
    },
    /// Sleep until the window opens.
    WaitWindow {
        /// When (ms).
        resume_at: i64,
    },
    /// Seal the snapshot, or abort it if too many rows were rejected.
    Finish {
        /// Final counters.
        counts: SnapshotCounts,
    },
}

/// The snapshot state machine.
#[derive(Debug)]
pub struct SnapshotFlow;

fn illegal(state: &SnapshotState, event: &SnapshotEvent, reason: &str) -> TransitionError {
    TransitionError {
        state: SnapshotFlow::status(state).into(),
        event: format!("{event:?}"),
        reason: reason.into(),
    }
}

/// Share of rejected rows above which the snapshot aborts, and the reason, if it does.
pub fn abort_reason(input: &SnapshotInput, counts: &SnapshotCounts) -> Option<String> {
    let share = if counts.read == 0 {
        0.0
    } else {
        counts.rejected as f64 / counts.read as f64
    };
    (share > input.max_rejected_share).then(|| {
        format!(
            "snapshot {} aborted: {} of {} rows rejected ({:.1}% > {:.1}% allowed); see snapshot_rejects",
            input.snapshot,
            counts.rejected,
            counts.read,
            share * 100.0,
            input.max_rejected_share * 100.0
        )
    })
}

impl Machine for SnapshotFlow {
    const KIND: &'static str = "snapshot";
    type Input = SnapshotInput;
    type State = SnapshotState;
    type Event = SnapshotEvent;
    type Command = SnapshotCommand;

    fn initial(_input: &SnapshotInput) -> SnapshotState {
        SnapshotState::Paging {
            cursor: None,
            page_no: 0,
            counts: SnapshotCounts::default(),
        }
    }

    fn apply(
        input: &SnapshotInput,
        state: &SnapshotState,
        event: &SnapshotEvent,
    ) -> std::result::Result<Transition<SnapshotState, SnapshotCommand>, TransitionError> {
        use SnapshotEvent as E;
        use SnapshotState as S;
        match (state, event) {
            (
                S::Paging {
                    cursor,
                    page_no,
                    counts,
                },
                E::Page {
                    rows,
                    accepted,
                    rejected,
                    last_key,
                    held_back,
                },
            ) => {
                if accepted + rejected != *rows {
                    return Err(illegal(state, event, "accepted + rejected != rows"));
                }
                if *held_back > 0 && (*rows == 0 || last_key.is_none()) {
                    return Err(illegal(state, event, "rows held back from an empty page"));
                }
                let mut counts = *counts;
                counts.read += i64::from(*rows);
                counts.accepted += i64::from(*accepted);
                counts.rejected += i64::from(*rejected);
                counts.queries += 1;
                if rows + held_back < input.page_size {
                    return Ok(Transition {
                        state: S::Finishing { counts },
                        commands: vec![SnapshotCommand::Finish { counts }],
                    });
                }
                let cursor = last_key.clone().or_else(|| cursor.clone());
                Ok(Transition {
                    state: S::Paging {
                        cursor: cursor.clone(),
                        page_no: page_no + 1,
                        counts,
                    },
                    commands: vec![SnapshotCommand::Page {
                        cursor,
                        page_no: page_no + 1,
                    }],
                })
            }
            (
                S::Paging {
                    cursor,
                    page_no,
                    counts,
                },
                E::WindowClosed { next_open_ms, .. },
            ) => {
                let mut counts = *counts;
                counts.pauses += 1;
                Ok(Transition {
                    state: S::Paused {
                        cursor: cursor.clone(),
                        page_no: *page_no,
                        counts,
                        resume_at: *next_open_ms,
                    },
                    commands: vec![SnapshotCommand::WaitWindow {
                        resume_at: *next_open_ms,
                    }],
                })
            }
            (
                S::Paused {
                    cursor,
                    page_no,
                    counts,
                    ..
                },
                E::WindowOpened { .. },
            ) => Ok(Transition {
                state: S::Paging {
                    cursor: cursor.clone(),
                    page_no: *page_no,
                    counts: *counts,
                },
                commands: vec![SnapshotCommand::Page {
                    cursor: cursor.clone(),
                    page_no: *page_no,
                }],
            }),
            (S::Finishing { counts }, E::Sealed { hash, .. }) => Ok(Transition {
                state: S::Sealed {
                    counts: *counts,
                    hash: hash.clone(),
                },
                commands: vec![],
            }),
            (S::Finishing { counts }, E::Held { hash, reason, .. }) => Ok(Transition {
                state: S::Held {
                    counts: *counts,
                    hash: hash.clone(),
                    reason: reason.clone(),
                },
                commands: vec![],
            }),
            (S::Finishing { counts }, E::Aborted { reason }) => Ok(Transition {
                state: S::Aborted {
                    counts: *counts,
                    reason: reason.clone(),
                },
                commands: vec![],
            }),
            _ => Err(illegal(state, event, "not accepted in this state")),
        }
    }

    fn resume(_input: &SnapshotInput, state: &SnapshotState) -> Vec<SnapshotCommand> {
        match state {
            SnapshotState::Paging {
                cursor, page_no, ..
            } => vec![SnapshotCommand::Page {
                cursor: cursor.clone(),
                page_no: *page_no,
            }],
            SnapshotState::Paused { resume_at, .. } => vec![SnapshotCommand::WaitWindow {
                resume_at: *resume_at,
            }],
            SnapshotState::Finishing { counts } => {
                vec![SnapshotCommand::Finish { counts: *counts }]
            }
            SnapshotState::Sealed { .. }
            | SnapshotState::Held { .. }
            | SnapshotState::Aborted { .. } => vec![],
        }
    }

    fn status(state: &SnapshotState) -> &'static str {
        match state {
            SnapshotState::Paging { .. } => "Paging",
            SnapshotState::Paused { .. } => "Paused",
            SnapshotState::Finishing { .. } => "Finishing",
            SnapshotState::Sealed { .. } => "Sealed",
            SnapshotState::Held { .. } => "Held",
            SnapshotState::Aborted { .. } => "Aborted",
        }
    }

    fn is_terminal(state: &SnapshotState) -> bool {
        matches!(
            state,
            SnapshotState::Sealed { .. }
                | SnapshotState::Held { .. }
                | SnapshotState::Aborted { .. }
        )
    }

    fn notice(
        input: &SnapshotInput,
        _previous: &SnapshotState,
        event: &SnapshotEvent,
        _state: &SnapshotState,
    ) -> Notice {
        let (carried, held) = match event {
            SnapshotEvent::Sealed { carried, .. } => (carried, None),
            SnapshotEvent::Held {
                carried, reason, ..
            } => (carried, Some(reason)),
            _ => return Notice::default(),
        };
        let mut alerts = Vec::new();
        if carried.total > 0 {
            let more = carried.total as usize - carried.first.len();
            alerts.push(Alert {
                kind: "rejected_rows_carried",
                level: AlertLevel::Warn,
                message: format!(
                    "snapshot {}: {} rejected row(s) keep their SKU's last accepted value (endpoints keep what they show): {}{}",
                    input.snapshot,
                    carried.total,
                    carried.first.join("; "),
                    if more > 0 { format!("; and {more} more (see snapshot_rejects)") } else { String::new() }
                ),
            });
        }
        if let Some(reason) = held {
            alerts.push(Alert {
                kind: "snapshot_held",
                level: AlertLevel::Error,
                message: format!(
                    "snapshot {} is held, no sync uses it: {reason}. If the change is real, approve it with `bulwark snapshot approve {}`",
                    input.snapshot, input.snapshot
                ),
            });
        }
        Notice {
            alerts,
            circuit: None,
        }
    }

    fn wake_at(state: &SnapshotState) -> Option<i64> {
        match state {
            SnapshotState::Paused { resume_at, .. } => Some(*resume_at),
            _ => None,
        }
    }
}

/// How many times the page size a page may grow to while a single key fills it.
const MAX_PAGE_GROWTH: u32 = 64;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Validate a page's rows against each other and against what staging already holds.
/// Returns accepted items (with their row keys) and rejects.
///
/// Duplicates: every row of a SKU that several rows of one page carry is rejected (which
/// of them is right cannot be known, so the SKU keeps its last accepted value). Rows with
/// the same key are always on one page (see the hold-back in [`SnapshotEffects`]); a row
/// whose SKU an earlier page staged under another key (keys that differ only in
/// surrounding blanks) is rejected, and the earlier row stays.
async fn check_page(
    staging: &Staging,
    input: &SnapshotInput,
    rows: &[RawRow],
) -> Result<(Vec<(String, crate::catalog::Item)>, Vec<Reject>)> {
    use crate::snapshot::excerpt;
    let mut items = Vec::with_capacity(rows.len());
    let mut rejects = Vec::new();
    for row in rows {
        match validate(row, &input.tier_min_qty) {
            Ok(item) => items.push((row.key.clone(), item)),
            Err(reason) => rejects.push(Reject {
                key: excerpt(&row.key),
                sku: readable_sku(row),
                reason,
            }),
        }
    }
    // Rows per SKU, rejected ones included: a SKU with one good and one bad row is a
    // duplicate too (which of them is right is unknown).
    let mut per_sku: HashMap<String, usize> = HashMap::new();
    for sku in items
        .iter()
        .map(|(_, it)| it.sku.clone())
        .chain(rejects.iter().filter_map(|r| r.sku.clone()))
    {
        *per_sku.entry(sku).or_default() += 1;
    }
    let (items, dups): (Vec<_>, Vec<_>) =
        items.into_iter().partition(|(_, it)| per_sku[&it.sku] == 1);
    for (key, it) in dups {
        rejects.push(Reject {
            reason: format!(
                "duplicate SKU {:?}: {} rows carry it; all are rejected and the SKU keeps its last accepted value",
                it.sku, per_sku[&it.sku]
            ),
            key: excerpt(&key),
            sku: Some(it.sku),
        });
    }
    // A SKU already staged by *another* row (an earlier page) is a duplicate; the same
    // row written again (this page re-read after a crash) is not.
    let skus: Vec<String> = items.iter().map(|(_, it)| it.sku.clone()).collect();
    let staged = staging.item_keys(input.snapshot, &skus).await?;
    let mut accepted = Vec::with_capacity(items.len());
    for (key, item) in items {
        match staged.get(&item.sku) {
            Some(k) if *k != key => {
                rejects.push(Reject {
                    reason: format!(
                        "duplicate SKU {:?}: row {:?} on an earlier page carries it and was kept",
                        item.sku,
                        excerpt(k)
                    ),
                    key: excerpt(&key),
                    sku: None,
                });
            }
            _ => accepted.push((key, item)),
        }
    }
    Ok((accepted, rejects))
}

/// A rejected row's SKU, when it is one (readable, not blank, not oversized): that SKU
/// keeps its last accepted value.
fn readable_sku(row: &RawRow) -> Option<String> {
    let sku = row.sku.as_deref()?.trim();
    (!sku.is_empty() && sku.len() <= 128 && !sku.chars().any(char::is_control))
        .then(|| sku.to_string())
}

/// Executes snapshot commands against a source and staging.
pub struct SnapshotEffects {
    source: Arc<dyn LegacySource>,
    staging: Staging,
    /// The last source or staging error (the workflow stopped, unfinished, on it).
    pub error: std::sync::Mutex<Option<String>>,
}

impl SnapshotEffects {
    /// Effects reading `source` into `staging`.
    pub fn new(source: Arc<dyn LegacySource>, staging: Staging) -> Self {
        Self {
            source,
            staging,
            error: std::sync::Mutex::new(None),
        }
    }

    fn now(&self) -> i64 {
        now_ms()
    }

    fn fail(&self, e: impl std::fmt::Display) -> Option<SnapshotEvent> {
        tracing::error!(error = %e, "snapshot stopped");
        *self.error.lock().expect("error") = Some(e.to_string());
        None
    }
}

#[async_trait]
impl Effects<SnapshotFlow> for SnapshotEffects {
    async fn execute(
        &self,
        ctx: &WorkflowCtx<SnapshotFlow>,
        _state: &SnapshotState,
        command: SnapshotCommand,
    ) -> Option<SnapshotEvent> {
        let input = &ctx.input;
        match command {
            SnapshotCommand::Page { cursor, page_no } => {
                if page_no > 0 && input.pause_ms > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(input.pause_ms)).await;
                }
                if let Some(window) = &input.window {
                    let at_ms = self.now();
                    match window.status(at_ms) {
                        Ok(WindowStatus::OpenUntil(_)) => {}
                        Ok(WindowStatus::ClosedUntil(next_open_ms)) => {
                            tracing::info!(
                                snapshot = input.snapshot,
                                page_no,
                                next_open_ms,
                                "window closed; snapshot paused"
                            );
                            return Some(SnapshotEvent::WindowClosed {
                                at_ms,
                                next_open_ms,
                            });
                        }
                        Err(e) => return self.fail(e),
                    }
                }
                // One row more than the page: a look-ahead that tells whether the page's
                // last key goes on (rows with one key are judged together).
                let mut limit = input.page_size;
                let mut rows = match self.source.page(cursor.as_deref(), limit + 1).await {
                    Ok(rows) => rows,
                    Err(e) => return self.fail(e),
                };
                // A page of one key: read more at once until the key's rows end.
                while rows.len() > limit as usize
                    && rows.first().map(|r| &r.key) == rows.last().map(|r| &r.key)
                    && limit < input.page_size.saturating_mul(MAX_PAGE_GROWTH)
                {
                    limit = limit.saturating_mul(4);
                    rows = match self.source.page(cursor.as_deref(), limit + 1).await {
                        Ok(rows) => rows,
                        Err(e) => return self.fail(e),
                    };
                }
                if rows.len() > limit as usize + 1 {
                    return self.fail(SyncError::Source {
                        source_name: self.source.describe(),
                        detail: format!("page of {} rows > limit {}", rows.len(), limit + 1),
                    });
                }
                // Keyset contract: every row follows the cursor. Order is the database's
                // (its collation), so only the cursor coming back is checked here: it means
                // the query does not page by `{after}`, and would read the same page forever.
                if let Some(c) = &cursor
                    && let Some(r) = rows.iter().find(|r| r.key == *c)
                {
                    return self.fail(SyncError::Source {
                        source_name: self.source.describe(),
                        detail: format!(
                            "keyset contract broken: the page after {:?} holds that key again (the query must return only rows with key > {{after}}, ordered by key)",
                            crate::snapshot::excerpt(&r.key)
                        ),
                    });
                }
                // Past the page: the look-ahead row, and the rows of the page's last key
                // when the look-ahead shows that key going on; the next page starts there.
                let mut held_back = 0u32;
                if rows.len() > limit as usize {
                    let next = rows[limit as usize].key.clone();
                    rows.truncate(limit as usize);
                    let run = rows.iter().rev().take_while(|r| r.key == next).count();
                    if run == rows.len() {
                        return self.fail(SyncError::Source {
                            source_name: self.source.describe(),
                            detail: format!(
                                "more than {limit} rows share the key {:?}: the key column must (nearly) identify a row",
                                crate::snapshot::excerpt(&next)
                            ),
                        });
                    }
                    rows.truncate(rows.len() - run);
                    held_back = run as u32 + 1;
                }
                let (items, rejects) = match check_page(&self.staging, input, &rows).await {
                    Ok(x) => x,
                    Err(e) => return self.fail(e),
                };
                if let Err(e) = self
                    .staging
                    .write_page_keyed(input.snapshot, &items, &rejects)
                    .await
                {
                    return self.fail(e);
                }
                Some(SnapshotEvent::Page {
                    rows: rows.len() as u32,
                    accepted: items.len() as u32,
                    rejected: rejects.len() as u32,
                    last_key: rows.last().map(|r| r.key.clone()),
                    held_back,
                })
            }
            SnapshotCommand::WaitWindow { resume_at } => {
                let wait = resume_at - self.now();
                if wait > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(wait as u64)).await;
                }
                Some(SnapshotEvent::WindowOpened { at_ms: self.now() })
            }
            SnapshotCommand::Finish { counts } => {
                let stats = SealStats {
                    rows_read: counts.read,
                    rows_rejected: counts.rejected,
                    queries: counts.queries,
                };
                if let Some(reason) = abort_reason(input, &counts) {
                    return match self.staging.abort(input.snapshot, stats).await {
                        Ok(()) => Some(SnapshotEvent::Aborted { reason }),
                        Err(e) => self.fail(e),
                    };
                }
                match self
                    .staging
                    .seal_checked(input.snapshot, stats, &input.guard)
                    .await
                {
                    Ok(out) => {
                        let carried = Carried::from_rows(&out.carried);
                        Some(match out.held {
                            Some(reason) => SnapshotEvent::Held {
                                hash: out.hash,
                                reason,
                                carried,
                            },
                            None => SnapshotEvent::Sealed {
                                hash: out.hash,
                                carried,
                            },
                        })
                    }
                    Err(e) => self.fail(e),
                }
            }
        }
    }
}

/// A page request to the task that owns a borrowed source: (after, limit, reply).
type PageRequest = (Option<String>, u32, oneshot::Sender<Result<Vec<RawRow>>>);

/// A borrowed source served to the (`'static`) runtime over a channel: requests are
/// answered by the task that owns the borrow, while the runtime runs beside it.
struct SourceProxy {
    describe: String,
    tx: mpsc::UnboundedSender<PageRequest>,
}

#[async_trait]
impl LegacySource for SourceProxy {
    fn describe(&self) -> String {
        self.describe.clone()
    }
    async fn page(&self, after: Option<&str>, limit: u32) -> Result<Vec<RawRow>> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((after.map(str::to_string), limit, tx))
            .map_err(|_| SyncError::Config("snapshot source closed".into()))?;
        rx.await
            .map_err(|_| SyncError::Config("snapshot source closed".into()))?
    }
    fn queries(&self) -> u64 {
        0
    }
}

/// Settings of a snapshot workflow beyond [`SnapshotOptions`].
#[derive(Debug, Clone, Default)]
pub struct FlowOptions {
    /// The read window (always open if `None`).
    pub window: Option<SnapshotWindow>,
}

/// An unfinished snapshot workflow of this source, if any: (run, snapshot id).
async fn unfinished(staging: &Staging, source: &str) -> Result<Option<(RunId, i64)>> {
    let store = staging.backend().store();
    for w in store.workflows(None, Some(SnapshotFlow::KIND)).await? {
        if w.terminal {
            continue;
        }
        let input: SnapshotInput = serde_json::from_str(&w.input_json).map_err(|e| {
            SyncError::Corrupt(format!(
                "snapshot workflow {}: input does not decode: {e}",
                w.id
            ))
        })?;
        if input.source == source {
            return Ok(Some((w.run_id, input.snapshot)));
        }
    }
    Ok(None)
}

static LOCK: Mutex<()> = Mutex::const_new(());

/// Take a snapshot of `source` as a journaled workflow: resume this source's unfinished
/// snapshot workflow (after a crash: from its journaled cursor), or start a new one, and
/// drive it to the end (waiting for windows if it has one).
pub async fn run_snapshot(
    source: &dyn LegacySource,
    staging: &Staging,
    options: &SnapshotOptions,
    flow: &FlowOptions,
) -> Result<SnapshotReport> {
    if options.page_size == 0 {
        return Err(SyncError::Config(
            "snapshot page_size must be at least 1".into(),
        ));
    }
    if let Some(w) = &flow.window {
        w.validate()?;
    }
    let _guard = LOCK.lock().await;
    let started = Instant::now();
    let queries_before = source.queries();
    let describe = source.describe();
    let store = staging.backend().store();
    let (run, snapshot) = match unfinished(staging, &describe).await? {
        Some(found) => {
            tracing::info!(snapshot = found.1, "resuming an unfinished snapshot");
            found
        }
        None => {
            let snapshot = staging.begin_snapshot(&describe).await?;
            let input = SnapshotInput {
                snapshot,
                source: describe.clone(),
                page_size: options.page_size,
                pause_ms: options.pause.as_millis() as u64,
                tier_min_qty: options.tier_min_qty.clone(),
                max_rejected_share: options.max_rejected_share,
                guard: options.guard,
                window: flow.window.clone(),
            };
            let state = SnapshotFlow::initial(&input);
            let params = serde_json::json!({ "snapshot": snapshot, "source": describe });
            let run = store.create_run("snapshot", &params.to_string()).await?;
            store
                .create_workflows(
                    run,
                    &[NewWorkflow {
                        kind: SnapshotFlow::KIND.into(),
                        subject: format!("snapshot-{snapshot}"),
                        input_json: serde_json::to_string(&input).expect("input serialises"),
                        state_json: serde_json::to_string(&state).expect("state serialises"),
                        status: SnapshotFlow::status(&state).into(),
                        version: SnapshotFlow::VERSION,
                    }],
                )
                .await?;
            (run, snapshot)
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let proxy: Arc<dyn LegacySource> = Arc::new(SourceProxy {
        describe: describe.clone(),
        tx,
    });
    let effects = Arc::new(SnapshotEffects::new(proxy, staging.clone()));
    let journal = Journal::start(store.clone(), JournalConfig::default());
    let runtime = Runtime::<SnapshotFlow>::new(
        store.clone(),
        journal,
        RuntimeConfig {
            worker: format!("snapshot-{}", std::process::id()),
            ..RuntimeConfig::default()
        },
    );
    let drive = runtime.run(Some(run), effects.clone(), None);
    tokio::pin!(drive);
    let outcome = loop {
        tokio::select! {
            outcome = &mut drive => break outcome?,
            Some((after, limit, reply)) = rx.recv() => {
                let _ = reply.send(source.page(after.as_deref(), limit).await);
            }
        }
    };
    if let Some((id, why)) = outcome.refused.first() {
        return Err(SyncError::Corrupt(format!(
            "snapshot workflow {id} refused: {why}"
        )));
    }
    let rows = store.workflows(Some(run), Some(SnapshotFlow::KIND)).await?;
    let row = rows
        .first()
        .ok_or_else(|| SyncError::Corrupt(format!("snapshot run {run} has no workflow")))?;
    let state: SnapshotState = serde_json::from_str(&row.state_json)
        .map_err(|e| SyncError::Corrupt(format!("snapshot state does not decode: {e}")))?;
    let queries = source.queries() - queries_before;
    if SnapshotFlow::is_terminal(&state) {
        let status = match state {
            SnapshotState::Sealed { .. } | SnapshotState::Held { .. } => "finished",
            _ => "aborted",
        };
        store.finish_run(run, status, None).await?;
    }
    let held = match &state {
        SnapshotState::Held { reason, .. } => Some(reason.clone()),
        _ => None,
    };
    match state {
        SnapshotState::Sealed { counts, hash } | SnapshotState::Held { counts, hash, .. } => {
            let carried = staging.carried_count(snapshot).await?;
            Ok(SnapshotReport {
                id: snapshot,
                rows_read: counts.read,
                accepted: counts.accepted,
                rejected: counts.rejected,
                queries,
                seconds: started.elapsed().as_secs_f64(),
                content_hash: Some(hash),
                sealed: true,
                held,
                carried,
            })
        }
        SnapshotState::Aborted { reason, .. } => Err(SyncError::Source {
            source_name: describe,
            detail: reason,
        }),
        other => {
            let why = effects.error.lock().expect("error").clone();
            Err(SyncError::Source {
                source_name: describe,
                detail: format!(
                    "snapshot {snapshot} stopped in state {}: {}; run `bulwark snapshot` again to resume from its cursor",
                    SnapshotFlow::status(&other),
                    why.unwrap_or_else(|| "stopped".into())
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_status_follows_cron_and_duration() {
        let w = SnapshotWindow {
            cron: "0 2 * * *".into(),
            max_duration_ms: 3_600_000,
        };
        let day = 86_400_000i64;
        let two = 2 * 3_600_000i64;
        assert_eq!(
            w.status(10 * day + two + 1000).unwrap(),
            WindowStatus::OpenUntil(10 * day + two + 3_600_000)
        );
        assert_eq!(
            w.status(10 * day + two + 3_600_000).unwrap(),
            WindowStatus::ClosedUntil(11 * day + two)
        );
        assert_eq!(
            w.status(10 * day).unwrap(),
            WindowStatus::ClosedUntil(10 * day + two)
        );
        assert!(
            SnapshotWindow {
                cron: "nope".into(),
                max_duration_ms: 1
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn machine_pages_pauses_and_finishes() {
        let input = SnapshotInput {
            snapshot: 1,
            source: "s".into(),
            page_size: 2,
            pause_ms: 0,
            tier_min_qty: vec![1],
            max_rejected_share: 0.5,
            guard: ChangeGuard::default(),
            window: None,
        };
        let s0 = SnapshotFlow::initial(&input);
        let page = |rows, last: &str| SnapshotEvent::Page {
            rows,
            accepted: rows,
            rejected: 0,
            last_key: Some(last.into()),
            held_back: 0,
        };
        let t = SnapshotFlow::apply(&input, &s0, &page(2, "b")).unwrap();
        assert!(
            matches!(&t.state, SnapshotState::Paging { cursor: Some(c), page_no: 1, .. } if c == "b")
        );
        let p = SnapshotFlow::apply(
            &input,
            &t.state,
            &SnapshotEvent::WindowClosed {
                at_ms: 0,
                next_open_ms: 99,
            },
        )
        .unwrap();
        assert_eq!(SnapshotFlow::wake_at(&p.state), Some(99));
        assert!(SnapshotFlow::apply(&input, &p.state, &page(1, "c")).is_err());
        let r = SnapshotFlow::apply(&input, &p.state, &SnapshotEvent::WindowOpened { at_ms: 99 })
            .unwrap();
        assert_eq!(
            r.commands,
            vec![SnapshotCommand::Page {
                cursor: Some("b".into()),
                page_no: 1
            }]
        );
        let f = SnapshotFlow::apply(&input, &r.state, &page(1, "c")).unwrap();
        assert!(
            matches!(f.state, SnapshotState::Finishing { counts } if counts.read == 3 && counts.queries == 2 && counts.pauses == 1)
        );
        // A full page whose last rows were held back (they share its last key) goes on.
        let held = SnapshotEvent::Page {
            rows: 1,
            accepted: 1,
            rejected: 0,
            last_key: Some("c".into()),
            held_back: 1,
        };
        let g = SnapshotFlow::apply(&input, &r.state, &held).unwrap();
        assert!(
            matches!(&g.state, SnapshotState::Paging { cursor: Some(c), page_no: 2, .. } if c == "c")
        );
        let empty = SnapshotEvent::Page {
            rows: 0,
            accepted: 0,
            rejected: 0,
            last_key: None,
            held_back: 2,
        };
        assert!(SnapshotFlow::apply(&input, &r.state, &empty).is_err());
        // Journals written before held_back existed decode as holding nothing back.
        let old: SnapshotEvent =
            serde_json::from_str(r#"{"Page":{"rows":2,"accepted":2,"rejected":0,"last_key":"b"}}"#)
                .unwrap();
        assert_eq!(old, page(2, "b"));
        assert!(!serde_json::to_string(&old).unwrap().contains("held_back"));
    }
}
