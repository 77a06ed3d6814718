//! Progress bars on a terminal, plain periodic lines elsewhere, and summaries.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bulwark_workflows::app::{Status, SyncProgress, SyncReport};
use bulwark_workflows::endpoint_sync::State;
use indicatif::{ProgressBar, ProgressStyle};

/// Counts finished endpoints and journaled transitions.
pub(crate) struct Progress {
    bar: ProgressBar,
    tty: bool,
    transitions: AtomicU64,
    finished: AtomicU64,
    tripped: AtomicU64,
    total: AtomicU64,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} endpoints {msg}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        Arc::new(Self {
            bar,
            tty,
            transitions: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            tripped: AtomicU64::new(0),
            total: AtomicU64::new(0),
            last_line: std::sync::Mutex::new(Instant::now()),
        })
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl SyncProgress for Progress {
    fn started(&self, workflows: usize) {
        self.total.fetch_add(workflows as u64, Ordering::Relaxed);
        self.bar.set_length(self.total.load(Ordering::Relaxed));
    }

    fn transition(&self, _endpoint: &str, state: &State, terminal: bool) {
        let t = self.transitions.fetch_add(1, Ordering::Relaxed) + 1;
        if terminal {
            self.finished.fetch_add(1, Ordering::Relaxed);
            if matches!(state, State::Tripped { .. }) {
                self.tripped.fetch_add(1, Ordering::Relaxed);
            }
            self.bar.inc(1);
            self.bar.set_message(format!(
                "({} tripped, {t} transitions)",
                self.tripped.load(Ordering::Relaxed)
            ));
        }
        if !self.tty {
            let mut last = self.last_line.lock().expect("progress lock");
            if last.elapsed().as_secs() >= 5 {
                *last = Instant::now();
                eprintln!(
                    "progress: {}/{} endpoints finished, {} tripped, {t} transitions",
                    self.finished.load(Ordering::Relaxed),
                    self.total.load(Ordering::Relaxed),
                    self.tripped.load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// The message for a plan held because its snapshot is too old.
pub(crate) fn print_stale(p: &bulwark_workflows::sync::Plan) {
    if let Some(s) = &p.stale {
        println!(
            "snapshot {} is too old to push stock from: its read started {} ago, max_snapshot_age is {}; all {} endpoint(s) held, nothing sent (seal a fresher snapshot)",
            p.snapshot,
            human_age(s.age_ms),
            human_age(s.max_ms),
            s.held
        );
    }
}

fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

pub(crate) fn print_summary(r: &SyncReport) {
    let count = |s: &str| r.by_status.get(s).copied().unwrap_or(0);
    if !r.resumed_runs.is_empty() {
        println!("resumed and finished run(s): {:?}", r.resumed_runs);
    }
    if let Some(p) = &r.plan {
        match p.run {
            None if p.stale.is_some() => print_stale(p),
            Some(run) => {
                println!(
                    "run {run}: snapshot {}, {} endpoint(s) to sync, {} already up to date",
                    p.snapshot, p.workflows, p.up_to_date
                );
                println!("  {} batches, {} items planned", p.batches, p.items);
            }
            None => println!(
                "snapshot {}: all {} endpoint(s) already up to date; nothing sent",
                p.snapshot, p.up_to_date
            ),
        }
    } else {
        if r.unfinished > 0 || !r.refused.is_empty() || !r.declined.is_empty() {
            println!(
                "no new run planned: workflows of an earlier run could not finish (above); the next sync tries again"
            );
        } else {
            println!("no sealed snapshot yet: run `bulwark snapshot` first");
        }
    }
    println!(
        "endpoints: {} done, {} tripped, {} skipped, {} cancelled",
        count("Done"),
        count("Tripped"),
        count("Skipped"),
        count("Cancelled"),
    );
    println!("  {} unfinished, {} refused", r.unfinished, r.refused.len());
    if !r.declined.is_empty() {
        println!("  {} left untouched for another worker:", r.declined.len());
        let mut reasons: Vec<&str> = r.declined.iter().map(|(_, why)| why.as_str()).collect();
        reasons.dedup();
        for why in reasons.iter().take(3) {
            println!("    {why}");
        }
    }
    let paused = r.plan.as_ref().map_or(0, |p| p.paused);
    if paused + r.held > 0 {
        println!(
            "  paused: {paused} endpoint(s) left out, {} sync(s) stopped to wait; `bulwark resume` lets them go on",
            r.held
        );
    }
    for (id, why) in r.refused.iter().take(10) {
        println!(
            "{}",
            crate::ops::cut(&format!("  refused workflow {id}: {why}"), 80)
        );
    }
    let rate = if r.seconds > 0.0 {
        r.transitions as f64 / r.seconds
    } else {
        0.0
    };
    println!(
        "batches: {} uploads, {} verifies, {} probes ({} found already landed)",
        r.uploads, r.verifies, r.probes.0, r.probes.1
    );
    println!(
        "transitions journaled: {}, wall time: {:.2}s, {:.0} transitions/s",
        r.transitions, r.seconds, rate
    );
}

pub(crate) fn print_status(s: &Status) {
    match &s.last_snapshot {
        Some(snap) => {
            println!(
                "last snapshot: {} ({}{})",
                snap.id,
                snap.status,
                snap.sealed_at
                    .map(|t| format!(" {}", crate::chrono_ms(t)))
                    .unwrap_or_default()
            );
            println!(
                "  {} rows read, {} accepted, {} rejected; {} queries to the source",
                snap.rows_read, snap.rows_accepted, snap.rows_rejected, snap.queries
            );
        }
        None => println!("last snapshot: none"),
    }
    println!(
        "journal rows: {}, recent alerts: {}",
        s.journal_rows, s.alerts
    );
    if s.quarantined > 0 {
        println!(
            "quarantined items: {} (refused by their endpoint; `bulwark quarantine` lists them)",
            s.quarantined
        );
    }
    if !s.insecure_tls.is_empty() {
        println!(
            "TLS verification OFF (insecure_skip_verify) for {} endpoint(s):",
            s.insecure_tls.len()
        );
        for line in crate::ops::wrap(&s.insecure_tls.join(", "), 76, 5) {
            println!("  {line}");
        }
    }
    if !s.paused.is_empty() {
        println!(
            "paused: {} endpoint(s), left alone by every worker until `bulwark resume`:",
            s.paused.len()
        );
        for h in s.paused.iter().take(20) {
            println!(
                "{}",
                crate::ops::cut(
                    &format!(
                        "  {} since {} by {}",
                        h.subject,
                        crate::chrono_ms(h.since),
                        h.by
                    ),
                    80
                )
            );
            println!("{}", crate::ops::cut(&format!("    {}", h.reason), 80));
        }
        if s.paused.len() > 20 {
            println!(
                "  … and {} more (`bulwark status --json`)",
                s.paused.len() - 20
            );
        }
    }
    print_workers(&s.workers);
    crate::ops::print_runs(&s.runs);
    crate::ops::print_older(s);
}

/// Workers by their heartbeats: live (beating within its lease) or silent, and the leases
/// each holds; a silent worker's expired leases are taken over at the next claim.
fn print_workers(workers: &[bulwark_engine::WorkerRow]) {
    if workers.is_empty() {
        return;
    }
    let now = bulwark_engine::now_ms();
    println!("workers (heard of in the last day):");
    for w in workers {
        let ago = (now - w.last_beat).max(0);
        let state = if ago <= w.lease_ms {
            "live"
        } else if w.leases + w.expired > 0 {
            "SILENT, its leases run out"
        } else {
            "gone"
        };
        let expired = if w.expired > 0 {
            format!(", {} expired (to be taken over)", w.expired)
        } else {
            String::new()
        };
        println!(
            "  {}: {state}; last heartbeat {} ago, lease {} ms; holds {} lease(s){expired}",
            w.worker,
            human_ms(ago),
            w.lease_ms,
            w.leases
        );
    }
}

fn human_ms(ms: i64) -> String {
    match ms {
        ..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min", ms / 60_000),
        _ => format!("{:.1} h", ms as f64 / 3_600_000.0),
    }
}

/// One line on what endpoints refused, if they refused anything.
/// Print the quarantine, if any (unless `quiet`); return how many of its items this
/// report's runs (the new one and those it resumed) quarantined.
pub(crate) async fn print_quarantine(
    app: &bulwark_workflows::app::Bulwark,
    r: &SyncReport,
    quiet: bool,
) -> anyhow::Result<usize> {
    let q = app.quarantine().await?;
    if !q.is_empty() && !quiet {
        let endpoints: std::collections::BTreeSet<&str> =
            q.iter().map(|r| r.endpoint.as_str()).collect();
        println!(
            "quarantined: {} item(s) at {} endpoint(s), refused by the endpoint and left as it had them (`bulwark quarantine`, `bulwark retry`)",
            q.len(),
            endpoints.len()
        );
    }
    let runs = runs_of(r);
    Ok(q.iter().filter(|row| runs.contains(&row.run)).count())
}

/// The runs a report covers: the one it planned and those it resumed.
fn runs_of(r: &SyncReport) -> Vec<i64> {
    let mut runs = r.resumed_runs.clone();
    runs.extend(r.plan.as_ref().and_then(|p| p.run));
    runs
}

/// The exit status of a finished sync, replay or reconcile (the table in README.md):
/// 1 when work was left undone — an endpoint tripped or skipped with its circuit open,
/// items quarantined by these runs, workflows refused or unfinished, no sealed snapshot
/// to sync from, or one too old to push — and 0 when everything was done.
pub(crate) fn exit_code(r: &SyncReport, quarantined: usize) -> std::process::ExitCode {
    let count = |s: &str| r.by_status.get(s).copied().unwrap_or(0);
    let stale = r.plan.as_ref().is_some_and(|p| p.stale.is_some());
    let undone = count("Tripped") + count("Skipped") + quarantined + r.refused.len() + r.unfinished;
    if undone > 0 || stale {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

pub(crate) fn print_summary_worker(r: &SyncReport) {
    let states: Vec<String> = r
        .by_status
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "worker done: {} workflow(s) claimed, finished: {}, {} lost to other workers or stopped, {} refused, {} transitions in {:.2}s",
        r.workflows,
        if states.is_empty() {
            "none".to_string()
        } else {
            states.join(" ")
        },
        r.unfinished,
        r.refused.len(),
        r.transitions,
        r.seconds
    );
}
