//! `bulwark serve`: a live web dashboard and Prometheus metrics over Bulwark's database.
//!
//! Bound to 127.0.0.1 by default. Bound anywhere else it refuses to start without a
//! token, and then every request must carry it (`Authorization: Bearer TOKEN`, or
//! `?token=TOKEN` for the page itself). The page is one embedded HTML file (no build
//! step) that polls the JSON API every second.
//!
//! Routes: `/` (dashboard), `/api/overview` (runs with progress, snapshots, circuits,
//! alerts), `/api/endpoints?state=S&q=TEXT`, `/api/endpoint/{id}` (runs, journal
//! timeline, circuit), `/metrics` (OpenMetrics text), and, without a token, `/healthz`
//! (the process answers) and `/readyz` (the database answers and no schedule is overdue).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bulwark_engine::now_ms;
use bulwark_workflows::app::Bulwark;
use serde::Deserialize;
use serde_json::json;

use crate::StoreArgs;
use crate::ops::{endpoint_history, latest, line};

/// Options of `bulwark serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    db: StoreArgs,
    /// Address to listen on. Anything but loopback requires a token.
    #[arg(long, default_value = "127.0.0.1:8800")]
    listen: SocketAddr,
    /// Environment variable holding the access token (required off loopback).
    #[arg(long, default_value = "BULWARK_SERVE_TOKEN")]
    token_env: String,
}

struct Ctx {
    app: Bulwark,
    token: Option<String>,
    /// The configured schedules `/readyz` checks (none without a configuration).
    schedules: Vec<bulwark_engine::schedule::Schedule>,
}

type Shared = Arc<Ctx>;

/// A schedule whose tick passed longer ago than this without firing is overdue.
const OVERDUE_AFTER_MS: i64 = 120_000;

/// The schedules of `config` (`[schedule]`), for `/readyz`.
pub(crate) fn schedules_of(
    config: Option<&crate::config::Config>,
) -> Result<Vec<bulwark_engine::schedule::Schedule>> {
    let Some(c) = config else {
        return Ok(Vec::new());
    };
    let s = &c.schedule;
    [
        ("snapshot", &s.snapshot),
        ("sync", &s.sync),
        ("reconcile", &s.reconcile),
        ("prune", &s.prune),
    ]
    .into_iter()
    .filter_map(|(name, cron)| cron.as_ref().map(|c| (name, c)))
    .map(|(name, cron)| {
        bulwark_engine::schedule::Schedule::new(name, &cron.0).map_err(anyhow::Error::msg)
    })
    .collect()
}

/// The dashboard's router over `app` (`token`: required on every request if set).
pub(crate) fn router(
    app: Bulwark,
    token: Option<String>,
    schedules: Vec<bulwark_engine::schedule::Schedule>,
) -> Router {
    guarded(
        Router::new()
            .route("/", get(page))
            .route("/api/overview", get(overview))
            .route("/api/endpoints", get(endpoints))
            .route("/api/endpoint/{id}", get(endpoint))
            .route("/metrics", get(metrics)),
        Ctx {
            app,
            token,
            schedules,
        },
    )
}

/// `routes` behind the token guard, plus the health routes (without it), over `ctx`.
fn guarded(routes: Router<Shared>, ctx: Ctx) -> Router {
    let ctx: Shared = Arc::new(ctx);
    routes
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), guard))
        .merge(health_routes())
        .with_state(ctx)
}

/// `/healthz` and `/readyz`: no token (they say nothing but whether to send traffic).
fn health_routes() -> Router<Shared> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
}

/// Ready: the database answers, and no configured schedule has a tick that passed more
/// than two minutes ago without firing (no worker is running it).
async fn readyz(State(ctx): State<Shared>) -> Response {
    let store = ctx.app.store();
    if let Err(e) = ctx.app.backend().schema_version().await {
        tracing::warn!(error = %e, "readyz: the database does not answer");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the database does not answer\n",
        )
            .into_response();
    }
    let now = now_ms();
    let mut overdue = Vec::new();
    for s in &ctx.schedules {
        match store.schedule_tick(s.name()).await {
            Ok(Some(last)) => {
                if s.next_after(last)
                    .is_some_and(|next| next + OVERDUE_AFTER_MS < now)
                {
                    overdue.push(s.name().to_string());
                }
            }
            Ok(None) => {}
            Err(_) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the database does not answer\n",
                )
                    .into_response();
            }
        }
    }
    if overdue.is_empty() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: schedule(s) overdue: {}\n", overdue.join(", ")),
        )
            .into_response()
    }
}

/// The access token from `token_env`; an error if there is none and `listen` is not
/// loopback (a dashboard or metrics open to the network without one is refused).
pub(crate) fn token_for(listen: SocketAddr, token_env: &str) -> Result<Option<String>> {
    let token = std::env::var(token_env).ok().filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && token.is_none() {
        bail!(
            "refusing to serve on {listen} without a token: set {token_env} (or bind to 127.0.0.1)"
        );
    }
    if let Some(t) = &token
        && t.chars().count() < MIN_TOKEN_CHARS
    {
        bail!(
            "the token in {token_env} is too short: {MIN_TOKEN_CHARS} characters at least (e.g. `openssl rand -hex 16`)"
        );
    }
    Ok(token)
}

/// Shorter tokens are refused: they can be guessed.
const MIN_TOKEN_CHARS: usize = 16;

/// A worker's own `/metrics` (its journal writer and adapter calls), behind the same
/// token rule as the dashboard, with `/healthz` and `/readyz`.
pub(crate) fn worker_metrics_router(
    app: Bulwark,
    token: Option<String>,
    schedules: Vec<bulwark_engine::schedule::Schedule>,
) -> Router {
    guarded(
        Router::new().route("/metrics", get(process_metrics)),
        Ctx {
            app,
            token,
            schedules,
        },
    )
}

async fn process_metrics(State(ctx): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            bulwark_workflows::metrics::CONTENT_TYPE,
        )],
        ctx.app.metrics_text(),
    )
        .into_response()
}

pub(crate) async fn run(args: ServeArgs) -> Result<()> {
    let token = token_for(args.listen, &args.token_env)?;
    let (db, config) = args.db.load()?;
    let schedules = schedules_of(config.as_ref())?;
    let app = Bulwark::open(&db, bulwark_adapters::default_registry()).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "dashboard on http://{}/ ({}; metrics at /metrics)",
        listener.local_addr()?,
        if token.is_some() {
            "token required"
        } else {
            "loopback only"
        }
    );
    axum::serve(listener, router(app, token, schedules))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Refuse requests without the token (when one is set). Compared in constant time.
async fn guard(State(ctx): State<Shared>, req: Request, next: Next) -> Response {
    let Some(want) = &ctx.token else {
        return next.run(req).await;
    };
    let header_token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let query_token = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    let given = header_token.or(query_token).unwrap_or("");
    let same = given.len() == want.len()
        && given
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "a valid token is required\n").into_response()
    }
}

fn fail(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(json!({ "error": e.to_string() })),
    )
        .into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn overview(State(ctx): State<Shared>) -> Response {
    let store = ctx.app.store();
    let result = async {
        let status = ctx.app.status().await?;
        let now = now_ms();
        let circuits: Vec<_> = store
            .circuits()
            .await?
            .into_iter()
            .map(|c| {
                json!({
                    "subject": c.subject, "state": c.state_name(now), "failures": c.failures,
                    "opens": c.opens, "opened_at": c.opened_at, "retry_at": c.retry_at,
                    "reason": c.reason,
                })
            })
            .collect();
        let runs: Vec<_> = status
            .runs
            .iter()
            .map(|r| {
                let total: i64 = r.states.values().sum();
                let finished: i64 = r
                    .states
                    .iter()
                    .filter(|(s, _)| {
                        matches!(
                            s.as_str(),
                            "Done"
                                | "Tripped"
                                | "Skipped"
                                | "Cancelled"
                                | "Corrupt"
                                | "Sealed"
                                | "Aborted"
                        )
                    })
                    .map(|(_, n)| n)
                    .sum();
                json!({
                    "id": r.id, "kind": r.kind, "status": r.status, "created_at": r.created_at,
                    "finished_at": r.finished_at, "states": r.states, "total": total,
                    "finished": finished,
                })
            })
            .collect();
        let snapshots = ctx.app.staging().snapshots().await?;
        anyhow::Ok(json!({
            "now": now,
            "runs": runs,
            "snapshots": snapshots,
            "circuits": circuits,
            "alerts": store.alerts(50).await?,
            "journal_rows": status.journal_rows,
            "insecure_tls": status.insecure_tls,
            "paused": status.paused,
            "quarantine": ctx.app.quarantine().await?.into_iter().take(500).collect::<Vec<_>>(),
            "quarantined": status.quarantined,
        }))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => fail(e),
    }
}

#[derive(Deserialize)]
struct EndpointFilter {
    state: Option<String>,
    q: Option<String>,
}

async fn endpoints(State(ctx): State<Shared>, Query(f): Query<EndpointFilter>) -> Response {
    let store = ctx.app.store();
    match latest(store.as_ref()).await {
        Ok(by) => {
            let q = f.q.as_deref().unwrap_or("").to_lowercase();
            let lines: Vec<_> = by
                .values()
                .filter(|w| {
                    f.state
                        .as_deref()
                        .is_none_or(|s| s.is_empty() || w.status.eq_ignore_ascii_case(s))
                })
                .filter(|w| q.is_empty() || w.subject.to_lowercase().contains(&q))
                .map(line)
                .collect();
            Json(lines).into_response()
        }
        Err(e) => fail(e),
    }
}

async fn endpoint(State(ctx): State<Shared>, Path(id): Path<String>) -> Response {
    let store = ctx.app.store();
    let history = match endpoint_history(store.as_ref(), &id).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": format!("no endpoint {id:?} in any run") })),
            )
                .into_response();
        }
        Err(e) => return fail(e),
    };
    let now = now_ms();
    let timeline: Vec<_> = history
        .journal
        .iter()
        .map(|j| {
            let state: serde_json::Value = serde_json::from_str(&j.state_json).unwrap_or_default();
            let name = state
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default();
            json!({ "seq": j.seq, "at": j.at, "state": name, "event": j.event_json, "worker": j.worker })
        })
        .collect();
    Json(json!({
        "endpoint": id,
        "runs": history.rows.iter().map(line).collect::<Vec<_>>(),
        "timeline": timeline,
        "circuit": history.circuit.map(|c| json!({
            "state": c.state_name(now), "failures": c.failures, "opens": c.opens,
            "retry_at": c.retry_at, "reason": c.reason,
        })),
    }))
    .into_response()
}

/// The OpenMetrics exposition of what the database knows (the process's own figures are
/// on `worker --metrics-listen`).
async fn metrics(State(ctx): State<Shared>) -> Response {
    match database_metrics(&ctx).await {
        Ok(x) => (
            [(
                header::CONTENT_TYPE,
                bulwark_workflows::metrics::CONTENT_TYPE,
            )],
            x.render(),
        )
            .into_response(),
        Err(e) => fail(e),
    }
}

async fn database_metrics(ctx: &Ctx) -> Result<bulwark_workflows::metrics::Exposition> {
    use bulwark_workflows::metrics::Exposition;
    let store = ctx.app.store();
    let mut x = Exposition::default();
    x.build_info();
    x.counter(
        "bulwark_transitions",
        "Journaled transitions (journal rows, creation rows included; pruning lowers it).",
        vec![(Vec::new(), store.journal_len().await? as f64)],
    );
    let mut by_kind_status: BTreeMap<(String, String), i64> = BTreeMap::new();
    for w in store.workflows(None, None).await? {
        *by_kind_status.entry((w.kind, w.status)).or_default() += 1;
    }
    x.gauge(
        "bulwark_workflows",
        "Workflows by kind and state.",
        by_kind_status
            .into_iter()
            .map(|((k, st), n)| (vec![("kind", k), ("state", st)], n as f64))
            .collect(),
    );
    let latest = latest(store.as_ref()).await?;
    x.one_gauge(
        "bulwark_endpoint_syncs_done",
        "Endpoints whose latest sync verified every batch.",
        latest.values().filter(|w| w.status == "Done").count() as f64,
    );
    // Every endpoint has a circuit: closed unless its row says otherwise.
    let now = now_ms();
    let rows: BTreeMap<String, bulwark_engine::CircuitRow> = store
        .circuits()
        .await?
        .into_iter()
        .map(|c| (c.subject.clone(), c))
        .collect();
    let mut circuits: BTreeMap<String, i64> = BTreeMap::new();
    for subject in latest
        .keys()
        .chain(rows.keys().filter(|k| !latest.contains_key(*k)))
    {
        let state = rows.get(subject).map_or("closed", |c| c.state_name(now));
        *circuits.entry(state.to_string()).or_default() += 1;
    }
    x.gauge(
        "bulwark_circuits",
        "Endpoint circuits by state (an endpoint that never failed is closed).",
        Exposition::by_label("state", &["closed", "open", "half_open"], &circuits),
    );
    x.one_gauge(
        "bulwark_endpoints_paused",
        "Endpoints an operator paused (bulwark pause): every worker leaves them alone.",
        store.holds().await?.len() as f64,
    );
    let mut alerts: BTreeMap<String, i64> = BTreeMap::new();
    for a in store.alerts(i64::MAX).await? {
        *alerts.entry(a.kind).or_default() += 1;
    }
    x.counter(
        "bulwark_alerts",
        "Alerts recorded, by kind (pruning lowers it).",
        Exposition::by_label("kind", &[], &alerts),
    );
    let staging = ctx.app.staging();
    let snaps = staging.snapshots().await?;
    x.counter(
        "bulwark_legacy_queries",
        "Queries sent to the legacy source by the snapshots kept.",
        vec![(
            Vec::new(),
            snaps.iter().map(|s| s.queries).sum::<i64>() as f64,
        )],
    );
    x.counter(
        "bulwark_legacy_rows_read",
        "Rows read from the legacy source by the snapshots kept.",
        vec![(
            Vec::new(),
            snaps.iter().map(|s| s.rows_read).sum::<i64>() as f64,
        )],
    );
    if let Some(at) = snaps
        .iter()
        .filter(|s| s.status == "sealed")
        .filter_map(|s| s.sealed_at)
        .max()
    {
        x.one_gauge(
            "bulwark_last_snapshot_sealed_timestamp_seconds",
            "When the newest sealed snapshot was sealed.",
            at as f64 / 1000.0,
        );
    }
    let mut finished: BTreeMap<String, i64> = BTreeMap::new();
    for r in store.runs().await? {
        if r.status == "finished"
            && let Some(at) = r.finished_at
        {
            let e = finished.entry(r.kind).or_default();
            *e = (*e).max(at);
        }
    }
    x.gauge(
        "bulwark_last_run_finished_timestamp_seconds",
        "When the newest finished run of each kind (sync, snapshot) finished.",
        finished
            .into_iter()
            .map(|(kind, at)| (vec![("kind", kind)], at as f64 / 1000.0))
            .collect(),
    );
    let mut fired = Vec::new();
    for name in ["snapshot", "sync", "reconcile", "prune"] {
        if let Some(at) = store.schedule_tick(name).await? {
            fired.push((vec![("schedule", name.to_string())], at as f64 / 1000.0));
        }
    }
    x.gauge(
        "bulwark_schedule_last_fired_timestamp_seconds",
        "When each worker schedule last fired (or was first seen).",
        fired,
    );
    let quarantine = staging.quarantine().await?;
    x.one_gauge(
        "bulwark_quarantined_items",
        "Items endpoints refused, left as each endpoint had them (bulwark quarantine).",
        quarantine.len() as f64,
    );
    let reconciles = staging.reconciles().await?;
    x.one_gauge(
        "bulwark_reconcile_drifted_items",
        "Items the latest reconcile of each endpoint found drifted.",
        reconciles.iter().map(|r| r.drifted).sum::<u64>() as f64,
    );
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn app() -> (tempfile::TempDir, Bulwark) {
        let dir = tempfile::tempdir().unwrap();
        let app = Bulwark::open(
            dir.path().join("b.db"),
            bulwark_adapters::default_registry(),
        )
        .await
        .unwrap();
        (dir, app)
    }

    async fn get_status(router: Router, uri: &str, auth: Option<&str>) -> StatusCode {
        let mut req = Request::builder().uri(uri);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        router
            .oneshot(req.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn with_a_token_every_route_refuses_requests_without_it() {
        let (_dir, app) = app().await;
        let r = router(app, Some("s3cret".into()), Vec::new());
        for uri in [
            "/",
            "/api/overview",
            "/api/endpoints",
            "/metrics",
            "/api/endpoint/x",
        ] {
            assert_eq!(
                get_status(r.clone(), uri, None).await,
                StatusCode::UNAUTHORIZED,
                "{uri}"
            );
            assert_eq!(
                get_status(r.clone(), uri, Some("Bearer wrong!")).await,
                StatusCode::UNAUTHORIZED,
                "{uri}"
            );
        }
        assert_eq!(
            get_status(r.clone(), "/api/overview", Some("Bearer s3cret")).await,
            StatusCode::OK
        );
        assert_eq!(
            get_status(r.clone(), "/?token=s3cret", None).await,
            StatusCode::OK
        );
        assert_eq!(
            get_status(r, "/metrics?token=s3cre", None).await,
            StatusCode::UNAUTHORIZED
        );
    }

    #[tokio::test]
    async fn off_loopback_without_a_token_it_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(ServeArgs {
            db: crate::StoreArgs {
                db: crate::DbArg {
                    db: dir.path().join("b.db").display().to_string(),
                },
                config: None,
            },
            listen: "0.0.0.0:0".parse().unwrap(),
            token_env: "BULWARK_TEST_UNSET_TOKEN_VARIABLE".into(),
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("without a token"), "{err}");
    }
}
