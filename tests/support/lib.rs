//! Shared helpers for Bulwark's cross-crate tests.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The `bulwark` binary built next to this test (`cargo build --release --bins` first;
/// `scripts/test` does).
pub fn bulwark_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join("bulwark");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release --bins` (scripts/test does)",
        bin.display()
    );
    bin
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Wait until something listens on `port` (at most 20 s).
pub fn wait_for_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing listens on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The endpoint ids `bulwark simulate --endpoints n --broken k` breaks (same rule as the CLI).
pub fn broken_ids(n: u32, broken: u32) -> Vec<String> {
    (0..broken.min(n))
        .map(|j| {
            let i = ((u64::from(j) + 1) * u64::from(n) / (u64::from(broken) + 1)).max(1) as u32;
            format!("ep-{i:05}")
        })
        .collect()
}

pub mod crash_portal;

/// The PostgreSQL server tests use: `BULWARK_TEST_PG_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`. Returns `None` (the test then skips) only
/// when `BULWARK_SKIP_POSTGRES=1` is set outside CI; in CI (`CI=true`) PostgreSQL tests
/// are mandatory.
pub fn pg_url() -> Option<String> {
    let skip = std::env::var("BULWARK_SKIP_POSTGRES").is_ok_and(|v| v == "1");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if skip {
        assert!(
            !ci,
            "BULWARK_SKIP_POSTGRES=1 is not allowed in CI: PostgreSQL tests are mandatory there"
        );
        eprintln!("skipping: BULWARK_SKIP_POSTGRES=1");
        return None;
    }
    Some(
        std::env::var("BULWARK_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
    )
}

/// A PostgreSQL URL with a fresh schema of its own (`schema=NAME`), unique per call.
pub fn pg_schema_url(base: &str, tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let schema = format!(
        "t_{tag}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    format!(
        "{base}{}schema={schema}",
        if base.contains('?') { '&' } else { '?' }
    )
}

/// The MariaDB/MySQL server tests use: `BULWARK_TEST_MYSQL_URL`, default
/// `mysql://root@127.0.0.1:3306/test`. Returns `None` (the test then skips) only when
/// `BULWARK_SKIP_MYSQL=1` is set outside CI; in CI (`CI=true`) MariaDB tests are mandatory.
pub fn mysql_url() -> Option<String> {
    let skip = std::env::var("BULWARK_SKIP_MYSQL").is_ok_and(|v| v == "1");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if skip {
        assert!(
            !ci,
            "BULWARK_SKIP_MYSQL=1 is not allowed in CI: MariaDB tests are mandatory there"
        );
        eprintln!("skipping: BULWARK_SKIP_MYSQL=1");
        return None;
    }
    Some(
        std::env::var("BULWARK_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
    )
}

/// A command running the `bulwark` binary.
pub fn bulwark() -> std::process::Command {
    std::process::Command::new(bulwark_bin())
}

/// Run `cmd`, require success, and return its standard output (both streams are shown on
/// failure).
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("spawn bulwark");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `cmd`, require exit status `code`, and return its standard output: for a sync that
/// finishes with work left undone (tripped endpoints, quarantined items: status 1).
pub fn run_code(cmd: &mut std::process::Command, code: i32) -> String {
    let out = cmd.output().expect("spawn bulwark");
    assert_eq!(
        out.status.code(),
        Some(code),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A child process killed (SIGKILL) and reaped when the test ends, pass or fail.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Generate a demo legacy database of `skus` SKUs in `dir` and snapshot it into `db` (a
/// SQLite path or a PostgreSQL URL) with `bulwark snapshot`; returns the snapshot's output.
pub fn legacy_snapshot(
    dir: &std::path::Path,
    skus: u32,
    db: impl AsRef<std::ffi::OsStr>,
) -> String {
    let legacy = dir.join("legacy.db");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", &skus.to_string(), "--path"])
            .arg(&legacy),
    );
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&legacy)
            .arg("--db")
            .arg(db),
    )
}

/// What a portal simulator endpoint at `base` shows for `skus`: quantity by SKU (absent
/// SKUs are left out), read through its own query route.
pub async fn shown(base: &str, skus: &[&str]) -> std::collections::BTreeMap<String, i64> {
    let body: serde_json::Value = bulwark_adapters::rest::RestAdapter::shared_client()
        .post(format!("{base}/items/query"))
        .json(&serde_json::json!({ "skus": skus }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["sku"].as_str().unwrap().to_string(),
                i["qty"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The quantity a portal simulator endpoint at `base` shows for `sku`, if any.
pub async fn shown_qty(base: &str, sku: &str) -> Option<i64> {
    shown(base, &[sku]).await.get(sku).copied()
}

/// An OpenMetrics exposition read by a real parser (`openmetrics-parser`, which refuses
/// what is not valid OpenMetrics): every sample as `name{k="v",…}` (labels sorted, none:
/// no braces) → value. Counters appear as `name_total`, info metrics as `name_info`,
/// histograms as `name_count`, `name_sum` and `name_bucket{…,le="…"}` (cumulative).
pub fn parse_openmetrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    use openmetrics_parser::OpenMetricsValue;
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(text)
        .unwrap_or_else(|e| panic!("not valid OpenMetrics: {e:?}\n{text}"));
    let key = |name: &str, labels: &[(String, String)]| {
        let mut labels = labels.to_vec();
        labels.sort();
        if labels.is_empty() {
            name.to_string()
        } else {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", inner.join(","))
        }
    };
    let mut out = std::collections::BTreeMap::new();
    for (name, family) in &parsed.families {
        for sample in family.iter_samples() {
            let labels: Vec<(String, String)> = sample
                .get_labelset()
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            match &sample.value {
                OpenMetricsValue::Gauge(n) | OpenMetricsValue::Unknown(n) => {
                    out.insert(key(name, &labels), n.as_f64());
                }
                OpenMetricsValue::Counter(c) => {
                    out.insert(key(&format!("{name}_total"), &labels), c.value.as_f64());
                }
                OpenMetricsValue::Info => {
                    out.insert(key(&format!("{name}_info"), &labels), 1.0);
                }
                OpenMetricsValue::Histogram(h) => {
                    out.insert(
                        key(&format!("{name}_count"), &labels),
                        h.count.unwrap_or(0) as f64,
                    );
                    out.insert(
                        key(&format!("{name}_sum"), &labels),
                        h.sum.as_ref().map_or(0.0, |s| s.as_f64()),
                    );
                    for b in &h.buckets {
                        let mut with_le = labels.clone();
                        let le = if b.upper_bound == f64::INFINITY {
                            "+Inf".to_string()
                        } else {
                            b.upper_bound.to_string()
                        };
                        with_le.push(("le".to_string(), le));
                        out.insert(key(&format!("{name}_bucket"), &with_le), b.count.as_f64());
                    }
                }
                other => panic!("{name}: unexpected {other:?}"),
            }
        }
    }
    out
}
