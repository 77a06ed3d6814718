//! `bulwark simulate-webui`: run the web-UI portal simulator
//! ([`bulwark_adapters::sim_webui`]) as a process of its own until SIGTERM/SIGINT, for
//! trying the `webdriver` adapter by hand and for real-binary tests.
//!
//! Portals are `portal-1` … `portal-N`, served under `http://LISTEN/p/portal-K`, all with
//! the same credentials (give them to `bulwark sync` as `BULWARK_SIM_USER` /
//! `BULWARK_SIM_PASS`, the secret names the ready recipes use). `--write-recipes DIR`
//! writes those recipes (`manifest.toml`, `per-item.toml`, `per-item-lookup.toml`; the
//! last one for portals started with `--numeric-ids`); `--state-listen ADDR` serves
//! the simulator's state as JSON (`GET /state`) and `--record FILE` keeps the same JSON in
//! a file (rewritten atomically whenever it changes, and on exit).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bulwark_adapters::sim_webui::{self, WebPortal, WebSimHandle};

/// Flags of `bulwark simulate-webui`.
#[derive(Debug, clap::Args)]
pub(crate) struct SimulateWebUiArgs {
    /// Address to listen on (loopback; port 0 picks a free port, printed on stderr).
    #[arg(long, default_value = "127.0.0.1:8710")]
    listen: SocketAddr,
    /// Number of portals: `portal-1` … `portal-N`, under `/p/portal-K/`.
    #[arg(long, default_value_t = 1)]
    portals: u32,
    /// User name every portal accepts (`BULWARK_SIM_USER` for the recipes).
    #[arg(long, default_value = "bulwark")]
    username: String,
    /// Password every portal accepts (`BULWARK_SIM_PASS` for the recipes).
    #[arg(long, default_value = "bulwark-sim")]
    password: String,
    /// Delay before every authenticated page answers (and before listings render), ms.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    /// Expire a session after this many authenticated requests.
    #[arg(long)]
    logout_after: Option<u32>,
    /// Address edit pages by a portal-given number (`/products/{n}/edit`) found on the
    /// search page, as real portals do (use the `per-item-lookup.toml` recipe).
    #[arg(long)]
    numeric_ids: bool,
    /// Write the simulator's recipes to this directory (`manifest.toml`,
    /// `per-item.toml`) before serving.
    #[arg(long)]
    write_recipes: Option<PathBuf>,
    /// Also serve the simulator's state as JSON at `GET http://ADDR/state` (every portal's
    /// uploads, products, logins and expirations).
    #[arg(long)]
    state_listen: Option<SocketAddr>,
    /// Keep the same JSON state in this file: rewritten atomically whenever it changes
    /// (checked every 100 ms) and on exit.
    #[arg(long)]
    record: Option<PathBuf>,
}

/// Portal id of the `i`-th portal (1-based).
fn portal_id(i: u32) -> String {
    format!("portal-{i}")
}

/// Run the simulator until SIGTERM/SIGINT.
pub(crate) async fn run(args: SimulateWebUiArgs) -> Result<()> {
    if let Some(dir) = &args.write_recipes {
        write_recipes(dir)?;
    }
    let ids: Vec<String> = (1..=args.portals.max(1)).map(portal_id).collect();
    let portals = ids
        .iter()
        .map(|id| WebPortal {
            slow_ms: args.slow_ms,
            logout_after: args.logout_after,
            numeric_ids: args.numeric_ids,
            ..WebPortal::new(id, &args.username, &args.password)
        })
        .collect();
    let sim = Arc::new(
        sim_webui::start(portals, args.listen)
            .await
            .with_context(|| format!("starting the web-UI simulator on {}", args.listen))?,
    );
    let addr = sim.addr();
    eprintln!(
        "web-UI simulator listening on http://{addr}: {} portal(s), {} … {}",
        ids.len(),
        sim.base_url(&ids[0]),
        sim.base_url(&ids[ids.len() - 1])
    );

    let mut tasks = Vec::new();
    if let Some(state_addr) = args.state_listen {
        let listener = tokio::net::TcpListener::bind(state_addr)
            .await
            .with_context(|| format!("binding the state endpoint on {state_addr}"))?;
        eprintln!("simulator state at http://{}/state", listener.local_addr()?);
        let (sim, ids) = (sim.clone(), ids.clone());
        let app = axum::Router::new().route(
            "/state",
            axum::routing::get(move || {
                let body = state_json(&sim, &ids).to_string();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        );
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }
    if let Some(path) = args.record.clone() {
        crate::ensure_parent(&path)?;
        let (sim, ids) = (sim.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let now = state_json(&sim, &ids).to_string();
                if now != last {
                    if let Err(e) = write_atomic(&path, &now) {
                        tracing::warn!(error = %e, "cannot write the simulator record");
                    }
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }

    wait_for_shutdown().await?;
    for t in &tasks {
        t.abort();
    }
    if let Some(path) = &args.record {
        write_atomic(path, &state_json(&sim, &ids).to_string())?;
    }
    eprintln!("web-UI simulator stopped");
    Ok(())
}

/// Write `manifest.toml`, `per-item.toml` and `per-item-lookup.toml` into `dir`.
fn write_recipes(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [
        ("manifest.toml", sim_webui::MANIFEST_RECIPE),
        ("per-item.toml", sim_webui::PER_ITEM_RECIPE),
        ("per-item-lookup.toml", sim_webui::PER_ITEM_LOOKUP_RECIPE),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("recipe written: {}", path.display());
    }
    Ok(())
}

/// Write `text` to `path` through a temporary file and a rename (readers never see half).
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The simulator's state: `{"portals": {id: {uploads, products, logins, expirations,
/// saves, searches, not_found, numbers}}}`.
fn state_json(sim: &WebSimHandle, ids: &[String]) -> serde_json::Value {
    let portals: serde_json::Map<String, serde_json::Value> = ids
        .iter()
        .map(|id| {
            let uploads: Vec<serde_json::Value> = sim
                .uploads(id)
                .into_iter()
                .map(|u| {
                    serde_json::json!({
                        "id": u.id,
                        "file_name": u.file_name,
                        "note": u.note,
                        "rows": u.rows,
                        "applied": u.applied,
                    })
                })
                .collect();
            let mut products: Vec<_> = sim.products(id).into_iter().collect();
            products.sort_by(|a, b| a.0.cmp(&b.0));
            let products: serde_json::Map<String, serde_json::Value> = products
                .into_iter()
                .map(|(sku, p)| {
                    (
                        sku,
                        serde_json::json!({
                            "qty": p.qty,
                            "price_minor": p.price_minor,
                            "note": p.note,
                        }),
                    )
                })
                .collect();
            (
                id.clone(),
                serde_json::json!({
                    "base_path": format!("/p/{id}"),
                    "uploads": uploads,
                    "products": products,
                    "logins": sim.logins(id),
                    "expirations": sim.expirations(id),
                    "saves": sim.saves(id),
                    "searches": sim.searches(id),
                    "not_found": sim.not_found(id),
                    "numbers": sim.numbers(id),
                }),
            )
        })
        .collect();
    serde_json::json!({ "portals": portals })
}

/// Resolve on SIGTERM or SIGINT.
async fn wait_for_shutdown() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
