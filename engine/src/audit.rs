//! Replay and audit: fold a journal through the machine's transition function.

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::machine::Machine;
use crate::store::{JournalRow, Store, WorkflowId, WorkflowRow};

/// One problem found in a journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The workflow concerned.
    pub workflow: WorkflowId,
    /// The sequence number concerned.
    pub seq: i64,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "workflow {} seq {}: {}",
            self.workflow, self.seq, self.problem
        )
    }
}

/// Fold `rows` (one workflow's journal, ordered by seq) through `M`, checking that row 0
/// holds the initial state, that sequence numbers have no gap, that every JSON value
/// decodes, and that every recorded state is exactly what the transition function
/// produces. Returns the folded state (if the journal is sound) and every finding.
pub fn check_journal<M: Machine>(
    workflow: WorkflowId,
    input_json: &str,
    rows: &[JournalRow],
) -> (Option<M::State>, Vec<Finding>) {
    let mut findings = Vec::new();
    let mut find = |seq: i64, problem: String| {
        findings.push(Finding {
            workflow,
            seq,
            problem,
        })
    };
    let input: M::Input = match serde_json::from_str(input_json) {
        Ok(i) => i,
        Err(e) => {
            find(0, format!("input does not decode: {e}"));
            return (None, findings);
        }
    };
    let Some(first) = rows.first() else {
        find(0, "journal is empty".into());
        return (None, findings);
    };
    if first.seq != 0 {
        find(
            first.seq,
            format!("journal starts at seq {} instead of 0", first.seq),
        );
        return (None, findings);
    }
    let mut state: M::State = match serde_json::from_str(&first.state_json) {
        Ok(s) => s,
        Err(e) => {
            find(0, format!("state does not decode: {e}"));
            return (None, findings);
        }
    };
    if state != M::initial(&input) {
        find(0, format!("row 0 is not the initial state: {state:?}"));
    }
    for pair in rows.windows(2) {
        let (prev, row) = (&pair[0], &pair[1]);
        if row.seq != prev.seq + 1 {
            find(
                row.seq,
                format!("gap in sequence numbers: {} follows {}", row.seq, prev.seq),
            );
            return (None, findings);
        }
        let Some(event_json) = &row.event_json else {
            find(row.seq, "row has no event".into());
            return (None, findings);
        };
        let event: M::Event = match serde_json::from_str(event_json) {
            Ok(e) => e,
            Err(e) => {
                find(row.seq, format!("event does not decode: {e}"));
                return (None, findings);
            }
        };
        let recorded: M::State = match serde_json::from_str(&row.state_json) {
            Ok(s) => s,
            Err(e) => {
                find(row.seq, format!("state does not decode: {e}"));
                return (None, findings);
            }
        };
        if M::is_terminal(&state) {
            find(
                row.seq,
                format!("event {event:?} recorded after terminal state {state:?}"),
            );
        }
        match M::apply(&input, &state, &event) {
            Ok(t) if t.state == recorded => state = recorded,
            Ok(t) => {
                find(
                    row.seq,
                    format!(
                        "recorded state {recorded:?} but the transition function gives {:?}",
                        t.state
                    ),
                );
                return (None, findings);
            }
            Err(e) => {
                find(row.seq, format!("illegal transition: {e}"));
                return (None, findings);
            }
        }
    }
    let ok = findings.is_empty();
    (ok.then_some(state), findings)
}

/// Check one workflow row against its journal: the fold must succeed and agree with the
/// row's current state and sequence number.
pub fn check_workflow<M: Machine>(
    row: &WorkflowRow,
    journal: &[JournalRow],
) -> (Option<M::State>, Vec<Finding>) {
    let (state, mut findings) = check_journal::<M>(row.id, &row.input_json, journal);
    if let Some(s) = &state {
        let last = journal.last().map(|r| r.seq).unwrap_or(-1);
        if last != row.seq {
            findings.push(Finding {
                workflow: row.id,
                seq: row.seq,
                problem: format!(
                    "workflow row is at seq {} but the journal ends at {last}",
                    row.seq
                ),
            });
        }
        match serde_json::from_str::<M::State>(&row.state_json) {
            Ok(current) if &current == s => {}
            Ok(current) => findings.push(Finding {
                workflow: row.id,
                seq: row.seq,
                problem: format!("workflow row holds {current:?} but the journal folds to {s:?}"),
            }),
            Err(e) => findings.push(Finding {
                workflow: row.id,
                seq: row.seq,
                problem: format!("workflow row state does not decode: {e}"),
            }),
        }
        if !row.status.is_empty() && row.status != M::status(s) {
            findings.push(Finding {
                workflow: row.id,
                seq: row.seq,
                problem: format!(
                    "workflow row status {} but the journal folds to {}",
                    row.status,
                    M::status(s)
                ),
            });
        }
        if row.terminal != M::is_terminal(s) {
            findings.push(Finding {
                workflow: row.id,
                seq: row.seq,
                problem: "terminal flag disagrees with the state".into(),
            });
        }
    }
    if findings.is_empty() {
        (state, findings)
    } else {
        (None, findings)
    }
}

/// Replay one workflow for resumption: its folded state, or an error naming the workflow.
pub async fn replay<M: Machine>(store: &dyn Store, row: &WorkflowRow) -> Result<M::State> {
    let journal = store.journal(row.id).await?;
    let (state, findings) = check_workflow::<M>(row, &journal);
    match (state, findings.into_iter().next()) {
        (Some(s), None) => Ok(s),
        (_, Some(f)) => Err(EngineError::Corrupt {
            workflow: f.workflow,
            seq: f.seq,
            detail: f.problem,
        }),
        (None, None) => Err(EngineError::Corrupt {
            workflow: row.id,
            seq: row.seq,
            detail: "journal does not fold".into(),
        }),
    }
}

/// Audit every workflow of kind `M::KIND`: returns (workflows checked, journal rows read,
/// findings).
pub async fn audit<M: Machine>(store: &dyn Store) -> Result<AuditSummary> {
    let rows = store.workflows(None, Some(M::KIND)).await?;
    let mut out = AuditSummary {
        workflows: rows.len(),
        ..AuditSummary::default()
    };
    for chunk in rows.chunks(2000) {
        let (from, to) = (chunk[0].id, chunk[chunk.len() - 1].id + 1);
        // The range may hold other kinds' rows too: only this kind's are counted.
        let journal = store.journal_range(from, to).await?;
        let mut i = 0;
        for row in chunk {
            while i < journal.len() && journal[i].workflow < row.id {
                i += 1;
            }
            let start = i;
            while i < journal.len() && journal[i].workflow == row.id {
                i += 1;
            }
            out.journal_rows += i - start;
            let journal = &journal[start..i];
            if row.terminal && row.status == crate::runtime::RETIRED_STATUS {
                // Retired: its row no longer follows its journal; what the journal itself
                // holds is still reported, apart.
                out.retired_workflows += 1;
                out.retired
                    .extend(check_journal::<M>(row.id, &row.input_json, journal).1);
            } else {
                out.findings.extend(check_workflow::<M>(row, journal).1);
            }
        }
    }
    Ok(out)
}

/// What [`audit`] found for one machine kind.
#[derive(Debug, Clone, Default)]
pub struct AuditSummary {
    /// Workflows checked.
    pub workflows: usize,
    /// Journal rows read.
    pub journal_rows: usize,
    /// Problems in live or finished workflows.
    pub findings: Vec<Finding>,
    /// Workflows retired as [`crate::runtime::RETIRED_STATUS`] (refused, alerted, no longer
    /// driven).
    pub retired_workflows: usize,
    /// Problems in the journals of retired workflows (kept for inspection).
    pub retired: Vec<Finding>,
}
