//! Operator read commands: runs, one run, endpoints, one endpoint's history, alerts and
//! closing a circuit by hand. Each has `--json`; tables fit 80 columns.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Result, bail};
use bulwark_engine::{Store, WorkflowRow};
use bulwark_workflows::app::Bulwark;
use serde::Serialize;

use crate::{StoreArgs, chrono_ms};

/// Operator commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Ops {
    /// Runs, newest first, with endpoint counts by state.
    Runs {
        #[command(flatten)]
        db: StoreArgs,
        /// Only the newest N runs.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Only runs started since then: a span (24h, 7d) or a UTC date/time.
        #[arg(long, value_name = "WHEN", value_parser = crate::parse_since)]
        since: Option<i64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One run: its endpoints that are not Done, and counts by state.
    Run {
        /// The run id.
        id: i64,
        #[command(flatten)]
        db: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Endpoints with their latest sync state.
    Endpoints {
        #[command(flatten)]
        db: StoreArgs,
        /// Only endpoints in this state (any case).
        #[arg(long, ignore_case = true,
              value_parser = clap::builder::PossibleValuesParser::new(bulwark_workflows::endpoint_sync::STATE_NAMES))]
        state: Option<String>,
        /// Only tripped endpoints (with the last error).
        #[arg(long)]
        tripped: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One endpoint: its runs and the journaled transitions of its latest sync.
    Endpoint {
        /// The endpoint id.
        id: String,
        #[command(flatten)]
        db: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Items endpoints refused (a value out of range, a SKU they do not know), left as each
    /// endpoint had them while the rest syncs: endpoint, SKU, snapshot, reason.
    Quarantine {
        #[command(flatten)]
        db: StoreArgs,
        /// Only this endpoint's.
        #[arg(long)]
        endpoint: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Have the next sync carry quarantined items again, even if the snapshot did not
    /// change them (all of them, one endpoint's, or one SKU's).
    Retry {
        #[command(flatten)]
        db: StoreArgs,
        /// Only this endpoint's.
        #[arg(long)]
        endpoint: Option<String>,
        /// Only this SKU (as sent to the endpoint).
        #[arg(long)]
        sku: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close an endpoint's circuit by hand (the next run syncs it again).
    ResetCircuit {
        /// The endpoint id.
        id: String,
        #[command(flatten)]
        db: StoreArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
pub(crate) struct EndpointLine {
    pub(crate) endpoint: String,
    pub(crate) run: i64,
    pub(crate) workflow: i64,
    pub(crate) state: String,
    pub(crate) detail: String,
}

fn detail(w: &WorkflowRow) -> String {
    let v: serde_json::Value = serde_json::from_str(&w.state_json).unwrap_or_default();
    let inner = v
        .as_object()
        .and_then(|o| o.values().next())
        .cloned()
        .unwrap_or_default();
    match w.status.as_str() {
        "Tripped" | "Skipped" => inner
            .get("reason")
            .and_then(|r| r.as_str())
            .unwrap_or("")
            .to_string(),
        "Done" => {
            let quarantined = inner
                .get("quarantined")
                .and_then(|q| q.as_array())
                .map_or(0, Vec::len);
            format!(
                "{} batches, {} items{}",
                inner.get("batches").and_then(|b| b.as_u64()).unwrap_or(0),
                inner.get("items").and_then(|b| b.as_u64()).unwrap_or(0),
                if quarantined > 0 {
                    format!(", {quarantined} quarantined")
                } else {
                    String::new()
                }
            )
        }
        _ => inner
            .get("batch")
            .map(|b| format!("batch {b}"))
            .unwrap_or_default(),
    }
}

pub(crate) fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

/// Word-wrap `s` to lines of at most `width` characters, at most `max` lines (the last
/// ends with "…" when some text is left out). A word longer than a line is cut.
pub(crate) fn wrap(s: &str, width: usize, max: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in s.split_whitespace() {
        let (n, w) = (cur.chars().count(), word.chars().count());
        if n > 0 && n + 1 + w > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
        while cur.chars().count() > width {
            let head: String = cur.chars().take(width).collect();
            cur = cur.chars().skip(width).collect();
            lines.push(head);
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    if lines.len() > max {
        lines.truncate(max);
        let last = lines.last_mut().expect("max >= 1");
        *last = cut(&format!("{last} …"), width);
        if !last.ends_with('…') {
            last.push('…');
        }
    }
    lines
}

/// The runs table (80 columns): id, kind, status, created, counts by state.
/// The line saying how many runs a limited listing left out.
pub(crate) fn print_older(status: &bulwark_workflows::app::Status) {
    let left = status.runs_total.saturating_sub(status.runs.len());
    if left > 0 {
        println!("  … and {left} older run(s) (`bulwark runs` lists them)");
    }
}

pub(crate) fn print_runs(runs: &[bulwark_workflows::app::RunStatus]) {
    println!(
        "{:>5}  {:<8} {:<9} {:<19}  states",
        "run", "kind", "status", "created"
    );
    for r in runs {
        let states: Vec<String> = r.states.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:>5}  {:<8} {:<9} {:<19}  {}",
            r.id,
            cut(&r.kind, 8),
            cut(&r.status, 9),
            chrono_ms(r.created_at),
            cut(&states.join(" "), 32)
        );
    }
}

/// Alerts (80 columns): a header line each (time, level, kind, subject, webhook), then
/// the message wrapped under it, at most three lines (`--json` has it whole).
pub(crate) fn print_alerts(alerts: &[bulwark_engine::AlertRow], webhook: bool) {
    for a in alerts {
        let delivery = if !webhook {
            String::new()
        } else if a.delivered_at.is_some() {
            "  webhook: delivered".to_string()
        } else if a.delivery_attempts > 0 {
            format!("  webhook: {} attempt(s)", a.delivery_attempts)
        } else {
            "  webhook: pending".to_string()
        };
        println!(
            "{} {:<5} {:<17} {}{}",
            chrono_ms(a.at),
            a.level.as_str(),
            a.kind,
            cut(&a.subject, 80 - 44 - delivery.len()),
            delivery
        );
        for l in wrap(&a.message, 76, 3) {
            println!("    {l}");
        }
    }
}

async fn open(db: &StoreArgs) -> Result<Bulwark> {
    Ok(Bulwark::open(&db.database()?, bulwark_adapters::default_registry()).await?)
}

/// Open for a command that only reads (works on a read-only database or a full disk).
async fn open_read(db: &StoreArgs) -> Result<Bulwark> {
    Ok(Bulwark::open_for_reading(&db.database()?, bulwark_adapters::default_registry()).await?)
}

/// Latest endpoint-sync workflow per endpoint.
pub(crate) async fn latest(store: &dyn Store) -> Result<BTreeMap<String, WorkflowRow>> {
    let mut by: BTreeMap<String, WorkflowRow> = BTreeMap::new();
    for w in store.workflows(None, Some("endpoint_sync")).await? {
        if by.get(&w.subject).is_none_or(|old| old.id < w.id) {
            by.insert(w.subject.clone(), w);
        }
    }
    Ok(by)
}

pub(crate) fn line(w: &WorkflowRow) -> EndpointLine {
    EndpointLine {
        endpoint: w.subject.clone(),
        run: w.run_id,
        workflow: w.id,
        state: w.status.clone(),
        detail: detail(w),
    }
}

fn print_lines(lines: &[EndpointLine]) {
    println!("{:<16} {:>5} {:<10} detail", "endpoint", "run", "state");
    for l in lines {
        println!(
            "{:<16} {:>5} {:<10} {}",
            cut(&l.endpoint, 16),
            l.run,
            l.state,
            cut(&l.detail, 45)
        );
    }
}

/// One endpoint's syncs (oldest first), the journal of its latest, and its circuit.
pub(crate) struct EndpointHistory {
    pub(crate) rows: Vec<WorkflowRow>,
    pub(crate) journal: Vec<bulwark_engine::JournalRow>,
    pub(crate) circuit: Option<bulwark_engine::CircuitRow>,
}

/// The history of endpoint `id` (`None`: it never synced).
pub(crate) async fn endpoint_history(
    store: &dyn Store,
    id: &str,
) -> Result<Option<EndpointHistory>> {
    let rows: Vec<WorkflowRow> = store
        .workflows(None, Some("endpoint_sync"))
        .await?
        .into_iter()
        .filter(|w| w.subject == id)
        .collect();
    let Some(last) = rows.last() else {
        return Ok(None);
    };
    let journal = store.journal(last.id).await?;
    let circuit = store
        .circuits()
        .await?
        .into_iter()
        .find(|c| c.subject == id);
    Ok(Some(EndpointHistory {
        rows,
        journal,
        circuit,
    }))
}

pub(crate) async fn run(op: Ops) -> Result<ExitCode> {
    match op {
        Ops::Runs {
            db,
            limit,
            since,
            json,
        } => {
            let app = open_read(&db).await?;
            let status = app.status_of_runs_since(limit, since).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status.runs)?);
            } else {
                print_runs(&status.runs);
                print_older(&status);
            }
        }
        Ops::Run { id, db, json } => {
            let app = open_read(&db).await?;
            let store = app.store();
            let Some(run) = store.runs().await?.into_iter().find(|r| r.id == id) else {
                bail!("no run {id}")
            };
            let rows = store.workflows(Some(id), None).await?;
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for w in &rows {
                *counts.entry(w.status.clone()).or_default() += 1;
            }
            let open_lines: Vec<EndpointLine> = rows
                .iter()
                .filter(|w| w.status != "Done")
                .map(line)
                .collect();
            if json {
                let v = serde_json::json!({ "run": run, "states": counts, "not_done": open_lines });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let states: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "run {id} ({}) {}: {}",
                    run.kind,
                    run.status,
                    states.join(" ")
                );
                if !open_lines.is_empty() {
                    print_lines(&open_lines);
                }
            }
        }
        Ops::Endpoints {
            db,
            state,
            tripped,
            json,
        } => {
            let app = open_read(&db).await?;
            let store = app.store();
            let lines: Vec<EndpointLine> = if tripped {
                // Tripped: the circuit is open (later runs skip it) or the latest sync
                // tripped; the detail is the error that tripped it.
                let now = bulwark_engine::now_ms();
                let open: std::collections::HashSet<String> = store
                    .circuits()
                    .await?
                    .into_iter()
                    .filter(|c| c.open && c.admission(now) != bulwark_engine::Admission::Closed)
                    .map(|c| c.subject)
                    .collect();
                let mut last_trip: BTreeMap<String, WorkflowRow> = BTreeMap::new();
                for w in store.workflows(None, Some("endpoint_sync")).await? {
                    if w.status == "Tripped" {
                        last_trip.insert(w.subject.clone(), w);
                    }
                }
                latest(store.as_ref())
                    .await?
                    .values()
                    .filter(|w| w.status == "Tripped" || open.contains(&w.subject))
                    .map(|w| {
                        last_trip
                            .get(&w.subject)
                            .map(line)
                            .unwrap_or_else(|| line(w))
                    })
                    .collect()
            } else {
                latest(store.as_ref())
                    .await?
                    .values()
                    .filter(|w| {
                        state
                            .as_deref()
                            .is_none_or(|s| w.status.eq_ignore_ascii_case(s))
                    })
                    .map(line)
                    .collect()
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                print_lines(&lines);
            }
        }
        Ops::Endpoint { id, db, json } => {
            let app = open_read(&db).await?;
            let Some(EndpointHistory {
                rows,
                journal,
                circuit,
            }) = endpoint_history(app.store().as_ref(), &id).await?
            else {
                bail!("no endpoint {id:?} in any run")
            };
            let last = rows.last().expect("a history has a sync");
            let now = bulwark_engine::now_ms();
            if json {
                let v = serde_json::json!({
                    "endpoint": id,
                    "runs": rows.iter().map(line).collect::<Vec<_>>(),
                    "circuit": circuit.as_ref().map(|c| serde_json::json!({
                        "state": c.state_name(now),
                        "failures": c.failures,
                        "opens": c.opens,
                        "opened_at": c.opened_at,
                        "retry_at": c.retry_at,
                        "reason": c.reason,
                    })),
                    "circuit_open_until": circuit.as_ref().filter(|c| c.open).map(|c| c.retry_at),
                    "journal": journal,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let state = match &circuit {
                    Some(c) if c.open => c.state_name(now),
                    _ => "closed",
                };
                println!("endpoint {}: circuit {state}", cut(&id, 50));
                if let Some(c) = circuit.as_ref().filter(|c| c.open) {
                    println!(
                        "  opened {} after {} failure(s), opening #{}",
                        chrono_ms(c.opened_at),
                        c.failures,
                        c.opens
                    );
                    println!("  probe from {}", chrono_ms(c.retry_at));
                }
                if let Some(reason) = circuit
                    .as_ref()
                    .filter(|c| c.open)
                    .and_then(|c| c.reason.as_deref())
                {
                    println!("  last error: {}", cut(reason, 66));
                }
                print_lines(&rows.iter().map(line).collect::<Vec<_>>());
                println!("latest sync (workflow {}):", last.id);
                for j in &journal {
                    let state: serde_json::Value =
                        serde_json::from_str(&j.state_json).unwrap_or_default();
                    let name = state
                        .as_object()
                        .and_then(|o| o.keys().next().cloned())
                        .unwrap_or_default();
                    let event = j.event_json.as_deref().unwrap_or("(created)");
                    println!(
                        "{:>4} {} {:<10} {}",
                        j.seq,
                        chrono_ms(j.at),
                        name,
                        cut(event, 44)
                    );
                }
            }
        }
        Ops::Quarantine { db, endpoint, json } => {
            let app = open_read(&db).await?;
            let rows: Vec<_> = app
                .quarantine()
                .await?
                .into_iter()
                .filter(|q| endpoint.as_ref().is_none_or(|e| *e == q.endpoint))
                .collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!("nothing quarantined");
            } else {
                println!(
                    "{:<16} {:<16} {:>8}  {:<19} reason",
                    "endpoint", "sku", "snapshot", "since"
                );
                for q in &rows {
                    let retry = if q.retry_requested {
                        " (retry asked)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<16} {:<16} {:>8}  {:<19} {}{retry}",
                        cut(&q.endpoint, 16),
                        cut(&q.sku, 16),
                        q.snapshot,
                        chrono_ms(q.at),
                        cut(&q.reason, 60)
                    );
                }
                println!(
                    "{} item(s); `bulwark retry` has the next sync carry them again",
                    rows.len()
                );
            }
        }
        Ops::Retry {
            db,
            endpoint,
            sku,
            json,
        } => {
            let app = open(&db).await?;
            let n = app
                .retry_quarantined(endpoint.as_deref(), sku.as_deref())
                .await?;
            if json {
                println!("{}", serde_json::json!({ "marked": n }));
            } else if n == 0 {
                println!("no quarantined item matches");
            } else {
                println!("{n} quarantined item(s) will be carried by the next sync");
            }
        }
        Ops::ResetCircuit { id, db, json } => {
            let app = open(&db).await?;
            let closed = app
                .store()
                .reset_circuit(&id, "reset by an operator (bulwark reset-circuit)")
                .await?;
            // An id nothing was ever recorded for is a typo, not a closed circuit.
            let known = closed
                || app
                    .store()
                    .circuits()
                    .await?
                    .iter()
                    .any(|c| c.subject == id)
                || app
                    .store()
                    .workflows(None, Some("endpoint_sync"))
                    .await?
                    .iter()
                    .any(|w| w.subject == id);
            if json {
                let v = serde_json::json!({ "endpoint": id, "closed": closed, "known": known });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if closed {
                println!("circuit of {id} closed; the next run syncs it again");
            } else if known {
                println!("circuit of {id} was not open");
            } else {
                eprintln!(
                    "error: endpoint {id:?} is unknown here: no sync and no circuit recorded for it (see `bulwark endpoints`)"
                );
            }
            if !known {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wrap_fits_the_width_and_marks_what_it_leaves_out() {
        assert_eq!(wrap("a bb ccc", 4, 3), ["a bb", "ccc"]);
        assert_eq!(wrap("", 10, 3), Vec::<String>::new());
        // A word longer than a line is cut across lines.
        assert_eq!(wrap("abcdefghij", 4, 5), ["abcd", "efgh", "ij"]);
        // Past `max` lines, the last one kept ends with "…" and still fits.
        let lines = wrap("one two three four five six seven", 9, 2);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.chars().count() <= 9), "{lines:?}");
        assert!(lines[1].ends_with('…'), "{lines:?}");
        assert_eq!(lines[0], "one two");
    }
}
