//! The pure workflow description the engine executes.

use std::fmt::Debug;

use serde::{Serialize, de::DeserializeOwned};

use crate::circuit::CircuitChange;
use crate::store::AlertLevel;

/// The result of applying an event: the next state and the effects to run once that state
/// is durably journaled.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition<S, C> {
    /// The next state.
    pub state: S,
    /// Effects to execute, in order, after the new state is committed.
    pub commands: Vec<C>,
}

/// An event the machine does not accept in its current state. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal event {event} in state {state}: {reason}")]
pub struct TransitionError {
    /// Name of the state the machine was in.
    pub state: String,
    /// Name of the refused event.
    pub event: String,
    /// Why it was refused.
    pub reason: String,
}

/// A workflow as a pure, deterministic state machine. Implementations must not perform
/// I/O or read clocks: everything time-dependent arrives inside events, so that replaying
/// a journal reproduces exactly the recorded states.
pub trait Machine: Send + Sync + 'static {
    /// Stable name stored in `workflows.kind`.
    const KIND: &'static str;
    /// Version of the persisted encoding (input, states and events) this build writes,
    /// stamped on every workflow it creates. Keep it while changes stay readable both
    /// ways (a new optional field with a serde default); raise it when they do not (a
    /// renamed or removed variant or field, a changed meaning), and say in
    /// [`Machine::reads_version`] which older versions this build still folds. A worker
    /// never drives a workflow of a version it does not read: it leaves it untouched for
    /// a worker of that version (a rolling upgrade) and says so, instead of retiring it
    /// as corrupt.
    const VERSION: u32 = 1;
    /// Whether this build folds journals written in `version` (older than
    /// [`Machine::VERSION`]). Default: only its own.
    fn reads_version(version: u32) -> bool {
        version == Self::VERSION
    }
    /// Immutable input, fixed when the workflow is created.
    type Input: Serialize + DeserializeOwned + Debug + Send + Sync + 'static;
    /// Persisted state. Variant names are schema: renaming one is a migration.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + Debug + Send + Sync + 'static;
    /// Facts fed to the machine (results of commands, timers, operator actions).
    type Event: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;
    /// Effects for the runtime to execute.
    type Command: Debug + Send + Sync + 'static;

    /// The state a new workflow starts in.
    fn initial(input: &Self::Input) -> Self::State;
    /// The transition function.
    fn apply(
        input: &Self::Input,
        state: &Self::State,
        event: &Self::Event,
    ) -> Result<Transition<Self::State, Self::Command>, TransitionError>;
    /// Commands to issue when a worker (re)starts the workflow in `state`, e.g. after a
    /// crash. Must be safe to issue again: this is where "verify before re-send" lives.
    fn resume(input: &Self::Input, state: &Self::State) -> Vec<Self::Command>;
    /// Short state name, stored in `workflows.status`.
    fn status(state: &Self::State) -> &'static str;
    /// No further events are expected.
    fn is_terminal(state: &Self::State) -> bool;
    /// When a sleeping workflow should be woken (ms since epoch), if it sleeps.
    fn wake_at(_state: &Self::State) -> Option<i64> {
        None
    }
    /// What entering `state` from `previous` through `event` records besides the
    /// transition itself, in the same transaction: alerts about the workflow's subject
    /// and a change to the subject's circuit.
    fn notice(
        _input: &Self::Input,
        _previous: &Self::State,
        _event: &Self::Event,
        _state: &Self::State,
    ) -> Notice {
        Notice::default()
    }
}

/// Records a transition commits with itself (see [`Machine::notice`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notice {
    /// Alerts about the workflow's subject.
    pub alerts: Vec<Alert>,
    /// What happens to the subject's circuit.
    pub circuit: Option<CircuitChange>,
}

/// An alert a machine raises about its workflow's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// Kind, e.g. `retries_exhausted`.
    pub kind: &'static str,
    /// Severity.
    pub level: AlertLevel,
    /// Message (no secrets).
    pub message: String,
}
