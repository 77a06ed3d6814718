//! Effect fencing: a workflow causes an effect (an HTTP request, a browser step) only while
//! its worker still holds the workflow's lease, with a safety margin to spare.
//!
//! Journal appends are fenced by the store (an append carries the lease epoch it was
//! claimed with). Effects are not journal writes: a worker paused past its lease (SIGSTOP,
//! a VM migration, a long GC-like stall of the host) would, once resumed, send the writes
//! it was about to send, although another worker has taken the workflow over and may
//! already have sent newer values. A [`Fence`] closes that gap on the worker's side:
//!
//! * its deadline is measured on the **monotonic clock** from the moment the claim (or the
//!   last successful renewal) was *sent*, so it never outlives the lease the database
//!   granted; a process resumed after a pause sees the deadline passed at once, before it
//!   has even talked to the database;
//! * only a successful heartbeat moves the deadline on: a failing heartbeat stops effects
//!   at the deadline, not at the next failed append;
//! * the heartbeat marks it lost as soon as another worker holds the workflow.
//!
//! The runtime checks the fence before every command, and installs it for the task that
//! drives the workflow ([`scope`]), so that adapters check it before each request they
//! send ([`check`]), also inside per-item loops and lookups. A check that fails *trips* the
//! fence: the runtime then drops whatever the command returned, journals nothing, and
//! leaves the workflow to the worker that holds it (replay verifies before it re-sends).
//!
//! What remains: a request already on the wire when the pause began, and a request sent
//! within `margin` of the deadline that takes longer than the margin. Choose `margin`
//! above the adapters' request timeout; the next sync's diff, or `reconcile`, repairs a
//! value such a request left behind.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::store::WorkflowId;

/// Why an effect was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    /// Another worker claimed the workflow.
    #[error("workflow {workflow}: lease lost to another worker; effect not sent")]
    Lost {
        /// The workflow.
        workflow: WorkflowId,
    },
    /// The lease is about to run out (or has) and no renewal confirmed it.
    #[error("workflow {workflow}: lease {state} (renewal not confirmed); effect not sent")]
    Expiring {
        /// The workflow.
        workflow: WorkflowId,
        /// "expired 1234 ms ago" / "expires in 80 ms, under the 5000 ms margin".
        state: String,
    },
}

#[derive(Debug)]
struct Inner {
    workflow: WorkflowId,
    margin: Duration,
    deadline: Mutex<Instant>,
    lost: AtomicBool,
    tripped: AtomicBool,
}

/// One workflow's right to cause effects (cheap to clone; clones share state).
#[derive(Debug, Clone)]
pub struct Fence(Arc<Inner>);

impl Fence {
    /// A fence for a lease of `lease` granted by a request sent at `sent_at`, refusing
    /// effects once less than `margin` of it is left.
    pub fn new(workflow: WorkflowId, sent_at: Instant, lease: Duration, margin: Duration) -> Self {
        Self(Arc::new(Inner {
            workflow,
            margin,
            deadline: Mutex::new(sent_at + lease),
            lost: AtomicBool::new(false),
            tripped: AtomicBool::new(false),
        }))
    }

    /// The workflow it guards.
    pub fn workflow(&self) -> WorkflowId {
        self.0.workflow
    }

    /// A renewal sent at `sent_at` was confirmed: the lease now runs `lease` from then.
    pub fn renewed(&self, sent_at: Instant, lease: Duration) {
        let mut d = self.0.deadline.lock().expect("fence deadline");
        *d = (*d).max(sent_at + lease);
    }

    /// Another worker holds the workflow. Returns whether this is news.
    pub fn lose(&self) -> bool {
        !self.0.lost.swap(true, Ordering::SeqCst)
    }

    /// Has another worker taken the workflow?
    pub fn is_lost(&self) -> bool {
        self.0.lost.load(Ordering::SeqCst)
    }

    /// Did a check fail since the fence was made (an effect was refused)?
    pub fn tripped(&self) -> bool {
        self.0.tripped.load(Ordering::SeqCst)
    }

    /// Time left on the lease, less the margin (zero when effects are refused).
    pub fn remaining(&self) -> Duration {
        let deadline = *self.0.deadline.lock().expect("fence deadline");
        deadline.saturating_duration_since(Instant::now() + self.0.margin)
    }

    /// May an effect be sent now? A refusal trips the fence.
    pub fn check(&self) -> Result<(), Fenced> {
        let verdict = self.verdict();
        if verdict.is_err() {
            self.0.tripped.store(true, Ordering::SeqCst);
        }
        verdict
    }

    fn verdict(&self) -> Result<(), Fenced> {
        let workflow = self.0.workflow;
        if self.is_lost() {
            return Err(Fenced::Lost { workflow });
        }
        let deadline = *self.0.deadline.lock().expect("fence deadline");
        let now = Instant::now();
        if now + self.0.margin < deadline {
            return Ok(());
        }
        let state = if now >= deadline {
            format!("expired {} ms ago", (now - deadline).as_millis())
        } else {
            format!(
                "expires in {} ms, under the {} ms safety margin",
                (deadline - now).as_millis(),
                self.0.margin.as_millis()
            )
        };
        Err(Fenced::Expiring { workflow, state })
    }
}

tokio::task_local! {
    static CURRENT: Fence;
}

/// Run `f` with `fence` installed for this task: [`check`] inside it consults `fence`.
/// (Tasks spawned from inside do not inherit it; an adapter that spawns must pass
/// [`current`] along and [`scope`] the spawned future.)
pub async fn scope<F: std::future::Future>(fence: Fence, f: F) -> F::Output {
    CURRENT.scope(fence, f).await
}

/// The fence installed for this task, if any.
pub fn current() -> Option<Fence> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Check the fence installed for this task before sending an effect. Outside a workflow
/// (no fence installed: a test, a read-only probe, `bulwark check`) every effect may go.
pub fn check() -> Result<(), Fenced> {
    match CURRENT.try_with(|f| f.check()) {
        Ok(verdict) => verdict,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_within_margin_and_after_deadline() {
        let now = Instant::now();
        let f = Fence::new(7, now, Duration::from_secs(10), Duration::from_secs(2));
        assert!(f.check().is_ok());
        assert!(!f.tripped());
        // Granted long ago: expired.
        let old = Fence::new(
            7,
            now - Duration::from_secs(11),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        let err = old.check().unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(old.tripped());
        // Within the margin.
        let close = Fence::new(
            7,
            now - Duration::from_secs(9),
            Duration::from_secs(10),
            Duration::from_secs(2),
        );
        let err = close.check().unwrap_err();
        assert!(err.to_string().contains("safety margin"), "{err}");
        // A confirmed renewal moves the deadline on; a stale one does not move it back.
        close.renewed(Instant::now(), Duration::from_secs(10));
        assert!(close.check().is_ok());
        close.renewed(now - Duration::from_secs(100), Duration::from_secs(10));
        assert!(close.check().is_ok());
    }

    #[test]
    fn lost_refuses_at_once() {
        let f = Fence::new(3, Instant::now(), Duration::from_secs(60), Duration::ZERO);
        assert!(f.lose());
        assert!(!f.lose());
        assert_eq!(f.check(), Err(Fenced::Lost { workflow: 3 }));
    }

    #[tokio::test]
    async fn check_consults_the_task_fence() {
        assert!(check().is_ok(), "no fence installed: allowed");
        let f = Fence::new(1, Instant::now(), Duration::from_secs(60), Duration::ZERO);
        let g = f.clone();
        scope(f.clone(), async move {
            assert!(check().is_ok());
            g.lose();
            assert!(check().is_err());
            assert_eq!(current().map(|c| c.workflow()), Some(1));
        })
        .await;
        assert!(f.tripped());
        assert!(check().is_ok(), "out of scope again");
    }
}
