//! `bulwark sync --dry-run` and `bulwark reconcile --dry-run`: plan as the real command
//! plans, print what would be sent, send nothing, journal nothing.

use std::process::ExitCode;

use anyhow::Result;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::preview::{DryRun, EndpointPreview, ItemChange};

/// How many endpoints with something to send the text output lists (the rest: `--json`).
const LISTED: usize = 20;

/// `sync --dry-run` over the setup's endpoints (already narrowed by `--endpoint`/`--only`).
pub(crate) async fn sync(setup: crate::Setup, json: bool) -> Result<ExitCode> {
    let app = Bulwark::open_for_reading(&setup.db, setup.registry).await?;
    let found = app.dry_run(&setup.endpoints, &setup.options).await?;
    app.close().await;
    finish(found.as_ref(), None, json)
}

/// `reconcile --dry-run`: read back (no effect at the endpoints), then what the repairing
/// sync would send; no reconcile record, no run.
pub(crate) async fn reconcile(setup: crate::Setup, json: bool) -> Result<ExitCode> {
    let app = Bulwark::open_for_reading(&setup.db, setup.registry).await?;
    let found = app
        .dry_run_reconcile(&setup.endpoints, &setup.options)
        .await?;
    app.close().await;
    match found {
        Some((preview, drift)) => {
            if !json {
                crate::reconcile_cmd::report(&drift, false);
            }
            finish(Some(&preview), Some(&drift), json)
        }
        None => finish(None, None, json),
    }
}

fn finish(
    found: Option<&DryRun>,
    drift: Option<&[bulwark_workflows::reconcile::EndpointDrift]>,
    json: bool,
) -> Result<ExitCode> {
    let Some(d) = found else {
        if json {
            println!("{}", serde_json::json!({ "dry_run": null }));
        } else {
            println!("no sealed snapshot yet: run `bulwark snapshot` first");
        }
        return Ok(ExitCode::from(1));
    };
    if json {
        let mut v = serde_json::json!({ "dry_run": d });
        if let Some(drift) = drift {
            v["reconcile"] = serde_json::to_value(drift)?;
        }
        println!("{v}");
    } else {
        print(d, LISTED);
    }
    // A stale snapshot is held, as the real run would be: not "everything done".
    Ok(if d.stale.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The text form, listing at most `listed` endpoints with something to send.
pub(crate) fn print(d: &DryRun, listed: usize) {
    println!(
        "dry run (nothing sent, nothing journaled): snapshot {}: {} endpoint(s) would be sent {} item(s) in {} batch(es); {} up to date; {} busy; {} paused",
        d.snapshot, d.send, d.items, d.batches, d.up_to_date, d.busy, d.paused
    );
    if let Some(s) = &d.stale {
        println!(
            "snapshot {} is {} s old, over max_snapshot_age ({} s): every endpoint ({}) would be held",
            d.snapshot,
            s.age_ms / 1000,
            s.max_ms / 1000,
            s.held
        );
    }
    if d.busy > 0 {
        println!("  busy: a sync of theirs is unfinished; `bulwark sync` resumes it first");
    }
    if d.circuit_open > 0 {
        let ids: Vec<&str> = d
            .endpoints
            .iter()
            .filter(|e| e.action == "circuit_open")
            .map(|e| e.endpoint.as_str())
            .collect();
        println!(
            "{}",
            crate::ops::cut(
                &format!(
                    "  {} circuit(s) open, skipped until they cool down (`bulwark reset-circuit ID`): {}",
                    ids.len(),
                    ids.join(", ")
                ),
                200
            )
        );
    }
    let sending: Vec<&EndpointPreview> =
        d.endpoints.iter().filter(|e| e.action == "send").collect();
    for e in sending.iter().take(listed) {
        let from = e.base.map_or_else(
            || "nothing confirmed: full send".to_string(),
            |b| format!("from snapshot {b}"),
        );
        let mut parts = vec![format!("{} new", e.new_items)];
        parts.push(format!("{} qty", e.qty_changes));
        parts.push(format!("{} price", e.price_changes));
        if e.retries > 0 {
            parts.push(format!("{} quarantine retries", e.retries));
        }
        if e.repairs > 0 {
            parts.push(format!("{} drift repairs", e.repairs));
        }
        println!(
            "  {} ({from}): {} item(s) in {} batch(es): {}",
            e.endpoint,
            e.items,
            e.batches,
            parts.join(", ")
        );
        let show = |label: &str, v: &[ItemChange]| {
            if !v.is_empty() {
                let s: Vec<String> = v.iter().map(change).collect();
                println!(
                    "{}",
                    crate::ops::cut(&format!("    {label}: {}", s.join("; ")), 200)
                );
            }
        };
        show("largest qty", &e.largest_qty);
        show("largest price", &e.largest_price);
        if e.largest_qty.is_empty() && e.largest_price.is_empty() {
            show("sample", &e.sample);
        }
    }
    if sending.len() > listed {
        println!("  … and {} more (--json lists all)", sending.len() - listed);
    }
}

/// `SKU qty 10 → 0, price 12.00 → 15.00 (+25.0 %)` (prices of the first tier, minor units
/// shown as they are: the currency's exponent is the platform's business).
fn change(c: &ItemChange) -> String {
    let mut s = c.sku.clone();
    match c.old_qty {
        Some(o) if o != c.new_qty => s.push_str(&format!(" qty {o} → {}", c.new_qty)),
        Some(_) => {}
        None => s.push_str(&format!(" qty (new) {}", c.new_qty)),
    }
    let first = |t: &[(u32, i64)]| t.first().map(|x| x.1);
    match (c.old_tiers.as_deref().and_then(first), first(&c.new_tiers)) {
        (Some(o), Some(n)) if o != n => {
            let pct = if o != 0 {
                format!(" ({:+.1} %)", (n - o) as f64 * 100.0 / o as f64)
            } else {
                String::new()
            };
            s.push_str(&format!(" price {o} → {n}{pct}"));
        }
        (Some(_), Some(_)) if c.old_tiers.as_deref() != Some(c.new_tiers.as_slice()) => {
            s.push_str(" tiers changed");
        }
        (None, Some(n)) => s.push_str(&format!(" price (new) {n}")),
        _ => {}
    }
    s
}
