//! Per-subject circuit breakers, persisted and shared by every worker on a database.
//!
//! ```text
//!            N consecutive failed validations
//!   Closed ─────────────────────────────────────▶ Open ──cooldown ends──▶ HalfOpen
//!     ▲                                             ▲                        │
//!     │              one probe succeeds             │  the probe fails:      │
//!     └─────────────────────────────────────────────┼── Open again, with a ◀─┘
//!                                                   │   longer cooldown
//!                  operator `reset-circuit` ────────┘ (closes from any state)
//! ```
//!
//! Counting happens inside a workflow's own journaled state (the machine folds outcomes
//! with [`CircuitPolicy::count_failure`]), so it is replayed exactly; what reaching the
//! threshold or passing a probe does to the shared circuit is a [`CircuitChange`] that the
//! store commits **in the same transaction** as the transition that caused it, together
//! with the alert it raises. HalfOpen is not stored: it is an open circuit whose
//! `retry_at` has passed ([`CircuitRow::admission`]).

use serde::{Deserialize, Serialize};

use crate::store::{AlertLevel, NewAlert};

/// When a subject's circuit opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitPolicy {
    /// Consecutive failed validations that open the circuit (≥ 1).
    pub threshold: u32,
    /// How long the circuit stays open the first time, in milliseconds.
    pub cooldown_ms: u64,
    /// Largest cooldown: each failed half-open probe doubles it, up to this.
    pub max_cooldown_ms: u64,
}

impl Default for CircuitPolicy {
    fn default() -> Self {
        Self {
            threshold: 3,
            cooldown_ms: 3_600_000,
            max_cooldown_ms: 86_400_000,
        }
    }
}

/// The result of counting one failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Below the threshold: keep going with this many consecutive failures.
    Below(u32),
    /// The threshold is reached: open the circuit after this many consecutive failures.
    Open(u32),
}

impl CircuitPolicy {
    /// Count one more failed validation after `failures` consecutive ones.
    pub fn count_failure(&self, failures: u32) -> Count {
        let failures = failures.saturating_add(1);
        if failures >= self.threshold.max(1) {
            Count::Open(failures)
        } else {
            Count::Below(failures)
        }
    }

    /// The consecutive-failure count a half-open probe starts from: one failure opens the
    /// circuit again.
    pub fn probe_failures(&self) -> u32 {
        self.threshold.max(1) - 1
    }

    /// The cooldown of the `opens`-th consecutive opening (1 = first): doubling, capped.
    pub fn cooldown(&self, opens: u32) -> u64 {
        let shift = opens.saturating_sub(1).min(40);
        self.cooldown_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_cooldown_ms.max(self.cooldown_ms))
    }
}

/// What a committed transition does to its subject's circuit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CircuitChange {
    /// The threshold was reached: open the circuit (or re-open it after a failed probe,
    /// with a longer cooldown).
    Open {
        /// Consecutive failed validations.
        failures: u32,
        /// The last error (no secrets).
        reason: String,
        /// The policy that decides the cooldown.
        policy: CircuitPolicy,
    },
    /// A validation succeeded: an open (half-open) circuit closes; a closed one is left.
    Close,
}

/// A subject's circuit, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitRow {
    /// The subject (an endpoint id).
    pub subject: String,
    /// `true` while open (including half-open).
    pub open: bool,
    /// Consecutive failed validations that opened it.
    pub failures: u32,
    /// Consecutive openings without a success in between (decides the cooldown).
    pub opens: u32,
    /// When it last opened (ms).
    pub opened_at: i64,
    /// When an open circuit turns half-open (ms).
    pub retry_at: i64,
    /// The error that opened it.
    pub reason: Option<String>,
}

/// What a circuit lets through at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Admission {
    /// Closed (or no circuit yet): work normally.
    Closed,
    /// Open: skip the subject until `until` (ms).
    Open {
        /// When it turns half-open.
        until: i64,
    },
    /// The cooldown ended: let one probe decide.
    HalfOpen,
}

impl CircuitRow {
    /// What this circuit admits at `now_ms`.
    pub fn admission(&self, now_ms: i64) -> Admission {
        match (self.open, now_ms < self.retry_at) {
            (false, _) => Admission::Closed,
            (true, true) => Admission::Open {
                until: self.retry_at,
            },
            (true, false) => Admission::HalfOpen,
        }
    }

    /// `closed`, `open` or `half_open` at `now_ms`.
    pub fn state_name(&self, now_ms: i64) -> &'static str {
        match self.admission(now_ms) {
            Admission::Closed => "closed",
            Admission::Open { .. } => "open",
            Admission::HalfOpen => "half_open",
        }
    }

    /// The row after opening `previous` (if any) at `now_ms`: a circuit that was already
    /// open (its probe failed) opens again with the next, longer cooldown.
    pub fn opened(
        previous: Option<&CircuitRow>,
        subject: &str,
        now_ms: i64,
        failures: u32,
        reason: &str,
        policy: &CircuitPolicy,
    ) -> CircuitRow {
        let opens = match previous {
            Some(p) if p.open => p.opens.saturating_add(1),
            _ => 1,
        };
        let cooldown = i64::try_from(policy.cooldown(opens)).unwrap_or(i64::MAX);
        CircuitRow {
            subject: subject.to_string(),
            open: true,
            failures,
            opens,
            opened_at: now_ms,
            retry_at: now_ms.saturating_add(cooldown),
            reason: Some(reason.to_string()),
        }
    }

    /// The alert recorded with opening this circuit.
    pub fn opened_alert(&self) -> NewAlert {
        let secs = (self.retry_at - self.opened_at) as f64 / 1000.0;
        let again = if self.opens > 1 {
            format!(" (probe failed; opening #{} in a row)", self.opens)
        } else {
            String::new()
        };
        NewAlert {
            kind: "circuit_opened".into(),
            level: AlertLevel::Error,
            subject: self.subject.clone(),
            message: format!(
                "circuit of {} opened after {} consecutive failed validation(s){again}; skipped for {secs:.0}s: {}",
                self.subject,
                self.failures,
                self.reason.as_deref().unwrap_or("")
            ),
        }
    }
}

/// The alert recorded when a subject's circuit closes (`by`: what closed it).
pub fn closed_alert(subject: &str, by: &str) -> NewAlert {
    NewAlert {
        kind: "circuit_closed".into(),
        level: AlertLevel::Warn,
        subject: subject.to_string(),
        message: format!("circuit of {subject} closed: {by}"),
    }
}

/// Longest alert message logged as it is; longer ones (a read-back's item differences)
/// are cut in the log, and kept whole in the alert.
const LOGGED: usize = 300;

/// Emit an alert as a tracing event at its level (stores call this after the commit).
pub fn trace_alert(alert: &NewAlert) {
    let message = logged(&alert.message);
    match alert.level {
        AlertLevel::Error => {
            tracing::error!(kind = %alert.kind, subject = %alert.subject, "{message}")
        }
        AlertLevel::Warn => {
            tracing::warn!(kind = %alert.kind, subject = %alert.subject, "{message}")
        }
    }
}

fn logged(message: &str) -> std::borrow::Cow<'_, str> {
    match message.char_indices().nth(LOGGED) {
        None => message.into(),
        Some((cut, _)) => format!("{}… (whole: bulwark alerts)", &message[..cut]).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_in_the_log_only() {
        assert_eq!(logged("short"), "short");
        let long = "é".repeat(LOGGED + 50);
        let cut = logged(&long);
        assert!(cut.starts_with(&"é".repeat(LOGGED)), "{cut}");
        assert!(cut.ends_with("… (whole: bulwark alerts)"), "{cut}");
        assert!(!cut.contains(&"é".repeat(LOGGED + 1)));
    }

    #[test]
    fn cooldown_doubles_and_is_capped() {
        let p = CircuitPolicy {
            threshold: 3,
            cooldown_ms: 1_000,
            max_cooldown_ms: 5_000,
        };
        assert_eq!(
            (1..=5).map(|n| p.cooldown(n)).collect::<Vec<_>>(),
            [1_000, 2_000, 4_000, 5_000, 5_000]
        );
        assert_eq!(p.cooldown(u32::MAX), 5_000);
    }

    #[test]
    fn half_open_is_an_open_circuit_past_its_cooldown() {
        let p = CircuitPolicy {
            threshold: 3,
            cooldown_ms: 1_000,
            max_cooldown_ms: 10_000,
        };
        let first = CircuitRow::opened(None, "ep", 100, 3, "rejected", &p);
        assert_eq!(first.admission(500), Admission::Open { until: 1_100 });
        assert_eq!(first.admission(1_100), Admission::HalfOpen);
        // The probe fails: open again for twice as long.
        let again = CircuitRow::opened(Some(&first), "ep", 1_200, 1, "rejected", &p);
        assert_eq!((again.opens, again.retry_at), (2, 3_200));
        // A closed circuit starts over.
        let closed = CircuitRow {
            open: false,
            ..again
        };
        assert_eq!(
            CircuitRow::opened(Some(&closed), "ep", 0, 3, "x", &p).opens,
            1
        );
    }

    #[test]
    fn probe_starts_one_failure_short_of_the_threshold() {
        let p = CircuitPolicy::default();
        assert_eq!(p.count_failure(p.probe_failures()), Count::Open(3));
        assert_eq!(p.count_failure(0), Count::Below(1));
    }
}
