//! `bulwark simulate-api` as a process of its own, serving the bulk GraphQL shape
//! (`examples/profiles/gql_batch.toml`: batched lookups, a mutation whose answer is a list
//! of error-result unions inside a 200) over HTTPS with a CA generated here, synced by the
//! real binary: `bulwark sync --config` killed with SIGKILL mid-sync and started again
//! until done; every item lands exactly once, a SKU the shop refuses is quarantined alone,
//! a second sync sends nothing and a 1 % change sends only the changed items.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bulwark_adapters::legacy::sku_code;
use bulwark_adapters::sim_tls::TestCa;
use bulwark_tests::{KillOnDrop, bulwark, free_port, run_ok, wait_for_port};
use bulwark_workflows::adapter::AdapterRegistry;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Item, PriceTier};
use serde_json::Value;

const ENDPOINTS: usize = 3;
const SKUS: u32 = 400;

fn items(bump: i64) -> Vec<Item> {
    (0..SKUS)
        .map(|i| Item {
            sku: sku_code(i),
            qty: i64::from(i % 40) + 1 + bump,
            tiers: vec![
                PriceTier {
                    min_qty: 1,
                    price_minor: 1500 + i64::from(i) + bump,
                },
                PriceTier {
                    min_qty: 20,
                    price_minor: 1300 + i64::from(i),
                },
            ],
        })
        .collect()
}

async fn stage(db: &std::path::Path, items: &[Item]) {
    let app = Bulwark::open(db, AdapterRegistry::new()).await.unwrap();
    app.staging().import("test", items).await.unwrap();
    app.close().await;
}

/// The simulator's `/_sim/state`, over HTTPS trusting `ca`.
async fn state(client: &reqwest::Client, origin: &str) -> Value {
    client
        .get(format!("{origin}/_sim/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// (qty, sorted tiers, writes) of `sku` at `ep`.
fn product(state: &Value, ep: &str, sku: &str) -> (i64, Vec<(u64, i64)>, u64) {
    let p = state["endpoints"][ep]["products"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["sku"] == sku))
        .unwrap_or_else(|| panic!("{ep} has no {sku}"));
    let mut tiers: Vec<(u64, i64)> = p["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["min_qty"].as_u64().unwrap(),
                t["price_minor"].as_i64().unwrap(),
            )
        })
        .collect();
    tiers.sort();
    (
        p["qty"].as_i64().unwrap(),
        tiers,
        p["writes"].as_u64().unwrap(),
    )
}

fn stat(state: &Value, name: &str) -> u64 {
    state["stats"][name].as_u64().unwrap()
}

fn assert_shows(state: &Value, eps: &[String], want: &[Item], bad: &str) {
    for ep in eps {
        for item in want {
            let (qty, tiers, _) = product(state, ep, &item.sku);
            if item.sku == bad {
                assert_eq!(qty, 0, "{ep} {bad}: refused, left as the shop had it");
                continue;
            }
            let mut t: Vec<(u64, i64)> = item
                .tiers
                .iter()
                .map(|t| (u64::from(t.min_qty), t.price_minor))
                .collect();
            t.sort();
            assert_eq!((qty, tiers), (item.qty, t), "{ep} {}", item.sku);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_graphql_shape_over_https_syncs_exactly_once_through_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let ca = TestCa::new(dir.path(), "shop").unwrap();
    let tls = ca.server_tls(&["127.0.0.1"], None).unwrap();
    let key = format!("key-{}", uuid::Uuid::new_v4().simple());
    let bad = sku_code(77);
    let port = free_port();
    let origin = format!("https://127.0.0.1:{port}");
    let sim_log = dir.path().join("sim.log");
    let _sim = KillOnDrop(
        bulwark()
            .args(["simulate-api", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--latency-ms", "20", "--refuse-sku", &bad])
            .arg("--tls-cert")
            .arg(&tls.cert_file)
            .arg("--tls-key")
            .arg(&tls.key_file)
            .arg("--write-profiles")
            .arg(dir.path())
            .env("BULWARK_SIM_API_KEY", &key)
            .env("BULWARK_SIM_USER", "shop-user")
            .env("BULWARK_SIM_PASS", "shop-pass")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sim_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_port(port);
    bulwark_adapters::transport::install_crypto_provider();
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca.ca_file).unwrap()).unwrap(),
        )
        .build()
        .unwrap();

    let eps: Vec<String> = (1..=ENDPOINTS).map(|i| format!("shop-{i}")).collect();
    let mut config = String::from(
        "database = \"bulwark.db\"\n[sync]\nbatch_size = 100\nmax_in_flight = 2\n[http]\nprofiles = \"gql_batch.toml\"\n",
    );
    for ep in &eps {
        config.push_str(&format!(
            "[[endpoint]]\nid = \"{ep}\"\nadapter = \"http\"\nsettings = {{ profile = \"gql_batch\", base_url = \"{origin}/graphql/{ep}\", api_key_env = \"BULWARK_TEST_SHOP_KEY\", currency = \"EUR\", ca_file = \"{}\" }}\n",
            ca.ca_file.display()
        ));
    }
    let cfg = dir.path().join("bulwark.toml");
    std::fs::write(&cfg, config).unwrap();
    let sync = || {
        let mut c = bulwark();
        c.arg("sync")
            .arg("--config")
            .arg(&cfg)
            .env("BULWARK_TEST_SHOP_KEY", &key);
        c
    };
    let want = items(0);
    stage(&db, &want).await;

    // Kill the first sync while writes are landing (twice), then let one run to the end.
    let mut kills = 0;
    for delay_ms in [150u64, 400] {
        let before = stat(&state(&client, &origin).await, "writes_applied");
        let log = std::fs::File::create(dir.path().join(format!("sync-{delay_ms}.log"))).unwrap();
        let mut child = KillOnDrop(sync().stdout(Stdio::null()).stderr(log).spawn().unwrap());
        let start = Instant::now();
        while stat(&state(&client, &origin).await, "writes_applied") == before
            && start.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if child.0.try_wait().unwrap().is_none() {
            kills += 1;
        }
        drop(child); // SIGKILL
    }
    assert!(
        kills >= 1,
        "the sync was killed mid-run; its log: {}",
        std::fs::read_to_string(dir.path().join("sync-150.log")).unwrap_or_default()
    );
    let out = sync().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Whether this run or a killed one met the refusal, the summary counts it.
    assert!(
        text.contains(&format!(
            "quarantined: {ENDPOINTS} item(s) at {ENDPOINTS} endpoint(s)"
        )),
        "the quarantine is reported: {text}"
    );
    let st = state(&client, &origin).await;
    assert_shows(&st, &eps, &want, &bad);
    for ep in &eps {
        for item in &want {
            let writes = product(&st, ep, &item.sku).2;
            let once = u64::from(item.sku != bad);
            assert_eq!(writes, once, "{ep} {}: applied exactly once", item.sku);
        }
    }
    let applied = stat(&st, "writes_applied");
    assert_eq!(applied, (ENDPOINTS as u64) * u64::from(SKUS - 1));
    let quarantine = run_ok(bulwark().arg("quarantine").arg("--db").arg(&db));
    for ep in &eps {
        let row = quarantine
            .lines()
            .find(|l| l.starts_with(ep.as_str()))
            .unwrap_or_else(|| panic!("{ep} has a quarantined item: {quarantine}"));
        assert!(
            row.contains(bad.as_str()) && row.contains("cannot be"),
            "{row}"
        );
    }
    assert!(
        quarantine.contains(&format!("{ENDPOINTS} item(s)")),
        "{quarantine}"
    );
    let audit = run_ok(bulwark().arg("audit").arg("--db").arg(&db));
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
    eprintln!(
        "after {kills} kill(s): {} lookup requests for {} SKUs, {applied} items applied",
        stat(&st, "lookups"),
        ENDPOINTS as u32 * SKUS
    );

    // Nothing changed: nothing sent, nothing looked up.
    stage(&db, &want).await;
    let before = state(&client, &origin).await;
    let _ = sync().output().unwrap();
    let after = state(&client, &origin).await;
    for s in ["writes_applied", "writes_refused", "lookups"] {
        assert_eq!(stat(&after, s), stat(&before, s), "{s}");
    }

    // 1 % changed: 4 SKUs × 3 endpoints, no lookup.
    let mut changed = want.clone();
    for i in [0usize, 101, 250, 399] {
        changed[i].qty += 3;
        changed[i].tiers[0].price_minor += 1;
    }
    stage(&db, &changed).await;
    let _ = sync().output().unwrap();
    let last = state(&client, &origin).await;
    assert_eq!(
        stat(&last, "writes_applied") - stat(&after, "writes_applied"),
        12
    );
    assert_eq!(stat(&last, "lookups"), stat(&after, "lookups"));
    assert_shows(&last, &eps, &changed, &bad);
}
