//! `bulwark reconcile`: read back what endpoints show, and send drifted items again.

use std::process::ExitCode;

use anyhow::Result;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::reconcile::EndpointDrift;

/// How many endpoints the table lists (the rest: `--json`).
const LISTED: usize = 20;

/// Run a reconcile of the setup's endpoints (already narrowed to `--endpoint`/`--only`).
pub(crate) async fn run(
    setup: crate::Setup,
    json: bool,
    wait: &crate::worker::WaitArgs,
) -> Result<ExitCode> {
    if crate::is_postgres(&setup.db) {
        let app = Bulwark::open(&setup.db, setup.registry).await?;
        let Some((plan, found)) = app
            .enqueue_reconcile(&setup.endpoints, &setup.options)
            .await?
        else {
            println!("no sealed snapshot yet: run `bulwark snapshot` first");
            return Ok(ExitCode::from(1));
        };
        report(&found, json);
        let mut code = ExitCode::SUCCESS;
        match plan.run {
            Some(run) => {
                println!(
                    "run {run} enqueued: snapshot {}, {} endpoint(s) to sync, {} drifted item(s) to send again",
                    plan.snapshot, plan.workflows, plan.repairs
                );
                if wait.wait {
                    code = crate::worker::wait_for_run(&app, run, wait).await?;
                }
            }
            None => println!("nothing to send"),
        }
        app.close().await;
        return Ok(code);
    }
    let alerts = crate::worker::AlertDelivery::start(setup.config.as_ref(), &setup.db).await?;
    let app = Bulwark::open(&setup.db, setup.registry).await?;
    crate::record_insecure_tls(&app, &setup.endpoints).await?;
    let interrupt = {
        let app = app.clone();
        crate::signals::Interrupt::listen("the reconcile", move || app.stop())
    };
    let bar = crate::progress::Progress::new();
    let result = app
        .reconcile(&setup.endpoints, &setup.options, Some(bar.clone()))
        .await;
    bar.finish();
    if let Some(a) = alerts {
        a.stop(std::time::Duration::from_secs(5)).await;
    }
    let result = result?;
    match &result.reconcile {
        Some(found) => report(found, json),
        None if json => println!("{}", serde_json::json!({ "reconcile": null })),
        None => {}
    }
    if !json {
        crate::progress::print_summary(&result);
    }
    let quarantined = crate::progress::print_quarantine(&app, &result, json).await?;
    app.close().await;
    if let Some(code) = interrupt.exit_code() {
        return Ok(code);
    }
    Ok(crate::progress::exit_code(&result, quarantined))
}

/// Print what the read-back found.
pub(crate) fn report(found: &[EndpointDrift], json: bool) {
    if json {
        println!("{}", serde_json::json!({ "reconcile": found }));
        return;
    }
    let read: u64 = found.iter().map(|f| f.read).sum();
    let drifted: usize = found.iter().map(|f| f.drifted.len()).sum();
    let unread: u64 = found.iter().map(|f| f.unread).sum();
    let at = found.iter().filter(|f| !f.drifted.is_empty()).count();
    let read_eps = found.iter().filter(|f| f.read > 0).count();
    println!(
        "reconcile: {read} item(s) read back at {read_eps} endpoint(s), {drifted} drifted at {at} endpoint(s), {unread} unread"
    );
    let notable: Vec<&EndpointDrift> = found
        .iter()
        .filter(|f| !f.drifted.is_empty() || f.unread > 0 || f.skipped.is_some())
        .collect();
    for f in notable.iter().take(LISTED) {
        let snap = f
            .snapshot
            .map_or_else(|| "-".to_string(), |s| s.to_string());
        let mut line = format!(
            "  {}  snapshot {snap}  read {}  drifted {}  unread {}",
            f.endpoint,
            f.read,
            f.drifted.len(),
            f.unread
        );
        if let Some(first) = f.drifted.first() {
            line.push_str(&format!("  ({}: {})", first.sku, first.detail));
        }
        if let Some(why) = &f.skipped {
            line.push_str(&format!("  not read: {why}"));
        }
        println!("{}", crate::ops::cut(&line, 160));
    }
    if notable.len() > LISTED {
        println!("  … and {} more (--json lists all)", notable.len() - LISTED);
    }
}
