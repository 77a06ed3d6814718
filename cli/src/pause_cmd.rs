//! `bulwark pause` / `bulwark resume`: hold endpoints for every worker on the database
//! (a platform's planned maintenance), without tripping them or using up their retries.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use bulwark_workflows::adapter::EndpointConfig;
use bulwark_workflows::app::Bulwark;

use crate::DbArg;

/// Which endpoints a pause or resume names.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Targets {
    /// Endpoint ids.
    #[arg(value_name = "ENDPOINT")]
    ids: Vec<String>,
    /// Every endpoint of the configuration on this host: the host of its `base_url`
    /// (with or without the port) or its `host` setting. Needs --config.
    #[arg(long, value_name = "HOST")]
    host: Vec<String>,
    /// Configuration file: endpoint ids are checked against it, and --host needs it. Its
    /// `database` applies when --db is not given.
    #[arg(long, env = "BULWARK_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    db: DbArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `bulwark pause` arguments.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PauseArgs {
    #[command(flatten)]
    targets: Targets,
    /// Why (recorded with the pause, shown by `bulwark status`, alerted).
    #[arg(long, default_value = "paused by an operator")]
    reason: String,
}

/// `bulwark resume` arguments.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ResumeArgs {
    #[command(flatten)]
    targets: Targets,
    /// Every paused endpoint.
    #[arg(long, conflicts_with_all = ["ids", "host"])]
    all: bool,
}

/// Who did it, for the record and the alert.
fn operator(command: &str) -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(user) if !user.is_empty() => format!("{user} (bulwark {command})"),
        _ => format!("an operator (bulwark {command})"),
    }
}

/// The database and the endpoint ids `targets` names (each once, in order given).
async fn resolve(targets: &Targets) -> Result<(String, Vec<String>)> {
    let config = match &targets.config {
        Some(path) => Some(crate::config::Config::load(path)?),
        None => None,
    };
    let db = crate::database(&targets.db, config.as_ref());
    let endpoints: Option<Vec<EndpointConfig>> = config.as_ref().map(|c| c.endpoints());
    let mut ids: Vec<String> = Vec::new();
    for id in &targets.ids {
        if let Some(eps) = &endpoints
            && !eps.iter().any(|e| &e.id == id)
        {
            bail!("endpoint {id:?}: no such endpoint in the configuration");
        }
        if !ids.contains(id) {
            ids.push(id.clone());
        }
    }
    for host in &targets.host {
        let Some(eps) = &endpoints else {
            bail!(
                "--host {host:?} needs --config: the hosts of endpoints are in their configuration"
            );
        };
        let host = host.to_ascii_lowercase();
        let matched: Vec<&EndpointConfig> = eps
            .iter()
            .filter(|e| {
                bulwark_workflows::sync::endpoint_host(e).is_some_and(|h| {
                    h == host || h.rsplit_once(':').is_some_and(|(name, _)| name == host)
                })
            })
            .collect();
        if matched.is_empty() {
            bail!("--host {host:?}: no endpoint of the configuration is on that host");
        }
        for e in matched {
            if !ids.contains(&e.id) {
                ids.push(e.id.clone());
            }
        }
    }
    Ok((db, ids))
}

/// Without a configuration to check against, an id this database never heard of is
/// most likely a typo: refuse it (naming what would let it through).
async fn check_known(app: &Bulwark, targets: &Targets, ids: &[String]) -> Result<()> {
    if targets.config.is_some() {
        return Ok(());
    }
    // Every endpoint that ever synced is in one of these (small, per-endpoint) sets.
    let store = app.store();
    let known: std::collections::HashSet<String> = app
        .staging()
        .confirmed()
        .await?
        .into_keys()
        .chain(app.staging().unsettled().await?)
        .chain(store.open_subjects("endpoint_sync").await?)
        .chain(store.circuits().await?.into_iter().map(|c| c.subject))
        .chain(store.holds().await?.into_iter().map(|h| h.subject))
        .collect();
    for id in ids {
        if !known.contains(id) {
            bail!(
                "endpoint {id:?} is unknown here: no sync of it is recorded in this database (a typo? to pause an endpoint that never synced, give --config)"
            );
        }
    }
    Ok(())
}

/// Run `bulwark pause`.
pub(crate) async fn pause(args: PauseArgs) -> Result<ExitCode> {
    let (db, ids) = resolve(&args.targets).await?;
    if ids.is_empty() {
        bail!("name the endpoints to pause (ENDPOINT …, or --host HOST with --config)");
    }
    let app = Bulwark::open(&db, bulwark_adapters::default_registry()).await?;
    check_known(&app, &args.targets, &ids).await?;
    let by = operator("pause");
    let mut out = Vec::new();
    for id in &ids {
        let new = app.pause(id, &args.reason, &by).await?;
        out.push(serde_json::json!({ "endpoint": id, "paused": true, "already": !new }));
        if !args.targets.json {
            if new {
                println!("paused {id}: {}", args.reason);
            } else {
                println!("{id} was already paused (reason now: {})", args.reason);
            }
        }
    }
    if args.targets.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "every worker leaves them alone: no new sync is planned, one under way stops before its next request and waits untouched (no retry used, no circuit moved); `bulwark resume` lets them go on"
        );
    }
    app.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Run `bulwark resume`.
pub(crate) async fn resume(args: ResumeArgs) -> Result<ExitCode> {
    let (db, mut ids) = resolve(&args.targets).await?;
    let app = Bulwark::open(&db, bulwark_adapters::default_registry()).await?;
    if args.all {
        ids = app
            .paused_endpoints()
            .await?
            .into_iter()
            .map(|h| h.subject)
            .collect();
    } else if ids.is_empty() {
        bail!("name the endpoints to resume (ENDPOINT …, --host HOST with --config, or --all)");
    }
    let by = operator("resume");
    let mut out = Vec::new();
    for id in &ids {
        let was = app.resume(id, &by).await?;
        out.push(serde_json::json!({ "endpoint": id, "resumed": was }));
        if !args.targets.json {
            if was {
                println!("resumed {id}: its waiting sync goes on, and the next run plans it again");
            } else {
                println!("{id} was not paused");
            }
        }
    }
    if args.targets.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if ids.is_empty() {
        println!("no endpoint is paused");
    }
    app.close().await;
    Ok(ExitCode::SUCCESS)
}
