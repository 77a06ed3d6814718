//! `bulwark simulate-api`: run the shop-API simulator ([`bulwark_adapters::sim_api`]) as a
//! process of its own until SIGTERM/SIGINT, for trying `http` profiles by hand and for
//! real-binary tests. One port serves every shape, for any endpoint id:
//!
//! * per-item REST with a login: `http://LISTEN/rest/{endpoint}` (profile `rest_items`);
//! * GraphQL, per item and in bulk: `http://LISTEN/graphql/{endpoint}` (profiles `gql`,
//!   `gql_batch`);
//! * a catalog listing without a SKU filter, stock and prices as separate resources:
//!   `http://LISTEN/catalog/{endpoint}` (profile `catalog`; its products exist only once
//!   seeded with `--catalog`).
//!
//! Credentials come from the environment (`BULWARK_SIM_API_KEY`, `BULWARK_SIM_USER`,
//! `BULWARK_SIM_PASS`; give the same variables to the endpoints' `*_env` settings), so none
//! sits in a command line. `GET /_sim/state` answers the counters and every endpoint's
//! products as JSON.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bulwark_adapters::sim_api::{self, ApiSimConfig};
use bulwark_adapters::sim_tls::ServerTls;

/// The environment variables the simulator takes its credentials from.
const KEY_VAR: &str = "BULWARK_SIM_API_KEY";
const USER_VAR: &str = "BULWARK_SIM_USER";
const PASS_VAR: &str = "BULWARK_SIM_PASS";

/// Flags of `bulwark simulate-api`.
#[derive(Debug, clap::Args)]
pub(crate) struct SimulateApiArgs {
    /// Address to listen on (loopback; port 0 picks a free port, printed on stderr).
    #[arg(long, default_value = "127.0.0.1:8720")]
    listen: SocketAddr,
    /// Catalog endpoints to create with `--catalog-skus` products (repeatable).
    #[arg(long = "catalog", value_name = "ENDPOINT")]
    catalog: Vec<String>,
    /// Products of each `--catalog` endpoint: `SKU-000000` … (the SKUs
    /// `bulwark generate-legacy` makes).
    #[arg(long, default_value_t = 1000)]
    catalog_skus: u32,
    /// A SKU every endpoint refuses to sell (repeatable): its writes are answered with the
    /// shape's validation error.
    #[arg(long = "refuse-sku", value_name = "SKU")]
    refuse_skus: Vec<String>,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Lifetime of REST login tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl_secs: u64,
    /// Currency every product reports.
    #[arg(long, default_value = "EUR")]
    currency: String,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Write the example profiles for these shapes (`rest_items.toml`, `gql.toml`,
    /// `gql_batch.toml`, `catalog.toml`) to this directory before serving.
    #[arg(long)]
    write_profiles: Option<PathBuf>,
}

/// A credential from the environment; refused when unset or empty.
fn credential(var: &str) -> Result<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => bail!(
            "{var} is not set: the simulator takes its credentials from {KEY_VAR}, {USER_VAR} and {PASS_VAR} (give the same variables to the endpoints' api_key_env / username_env / password_env)"
        ),
    }
}

/// Run the simulator until SIGTERM/SIGINT.
pub(crate) async fn run(args: SimulateApiArgs) -> Result<()> {
    if let Some(dir) = &args.write_profiles {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in sim_api::PROFILES {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("profile written: {}", path.display());
        }
    }
    let config = ApiSimConfig {
        api_key: credential(KEY_VAR)?,
        username: credential(USER_VAR)?,
        password: credential(PASS_VAR)?,
        token_ttl_secs: args.token_ttl_secs,
        currency: args.currency,
        latency_ms: args.latency_ms,
        refuse_skus: args.refuse_skus,
    };
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert_file), Some(key_file)) => Some(ServerTls {
            cert_file,
            key_file,
            client_ca_file: None,
        }),
        _ => None,
    };
    let sim = sim_api::start_with(config, args.listen, tls.as_ref())
        .await
        .with_context(|| format!("starting the API simulator on {}", args.listen))?;
    let skus: Vec<String> = (0..args.catalog_skus)
        .map(bulwark_adapters::legacy::sku_code)
        .collect();
    for ep in &args.catalog {
        sim.seed_catalog(ep, &skus);
    }
    let origin = sim.rest_base_url("{endpoint}");
    let origin = origin.trim_end_matches("/rest/{endpoint}");
    eprintln!(
        "API simulator listening on {origin}: {origin}/rest/{{endpoint}}, {origin}/graphql/{{endpoint}}, {origin}/catalog/{{endpoint}} ({} catalog endpoint(s) of {} products); state at {origin}/_sim/state",
        args.catalog.len(),
        args.catalog_skus
    );
    crate::signals::terminated().await?;
    let stats = sim.stats();
    sim.shutdown().await;
    eprintln!(
        "API simulator stopped: {} lookups, {} writes applied, {} refused, {} reads, {} listing pages",
        stats.lookups, stats.writes_applied, stats.writes_refused, stats.reads, stats.pages
    );
    Ok(())
}
