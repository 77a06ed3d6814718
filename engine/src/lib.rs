//! Bulwark's generic durable-execution core.
//!
//! The engine knows workflows, events, journals, leases and alerts; it knows nothing about
//! SKUs or endpoints. A domain crate describes a workflow as a pure [`Machine`]
//! (`(input, state, event) → (state, commands)`) and an [`Effects`] implementation that
//! executes commands and turns their results into events. The [`Runtime`] journals every
//! transition durably (through the group-commit [`Journal`]) *before* it runs the
//! transition's commands, so a crash at any point resumes from the last journaled state.
//!
//! Invariants:
//! - a journal row `(workflow, seq)` is written once, in the same transaction that moves
//!   the workflow row from `seq - 1` to `seq`, and only if the writer holds the current
//!   lease epoch (fencing);
//! - replay is a fold of the journal through the machine's transition function; any
//!   disagreement (bad JSON, a gap, an illegal transition) refuses the workflow by id.

pub mod audit;
pub mod error;
pub mod journal;
pub mod machine;
pub mod runtime;
pub mod sqlite;
pub mod store;

pub use audit::{Finding, check_journal};
pub use error::{EngineError, Result};
pub use journal::{Journal, JournalConfig};
pub use machine::{Machine, Transition, TransitionError};
pub use runtime::{Effects, RunOutcome, Runtime, RuntimeConfig, WorkflowCtx};
pub use sqlite::SqliteStore;
pub use store::{
    Append, AppendOutcome, ClaimedWorkflow, JournalRow, NewAlert, NewWorkflow, RunId, RunRow,
    Store, WorkflowId, WorkflowRow, now_ms,
};
