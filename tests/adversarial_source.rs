//! Bad legacy data never panics, never halts a snapshot and never reaches a shop, on
//! SQLite, PostgreSQL and MariaDB, through the real binary: Latin-1 bytes (rejected with
//! the column named under the default `utf-8`, read right with `--encoding windows-1252`),
//! duplicate SKUs (every row rejected, also a run longer than a page, and the SKU keeps its
//! last accepted value at the endpoint), NULLs, and a 10 MB value (rejected with an
//! excerpt, not stored whole).

use std::collections::BTreeMap;
use std::path::Path;

use bulwark_adapters::simulator::{self, SimConfig};
use bulwark_tests::{bulwark, run_ok, shown};
use sqlx::{AssertSqlSafe, Connection};

/// One legacy row: SKU bytes, quantity and three prices as text (None: NULL).
type Row = (Vec<u8>, Option<String>, [Option<String>; 3]);

const HUGE: usize = 10 << 20;

fn row(sku: &[u8], qty: Option<&str>, prices: [Option<&str>; 3]) -> Row {
    (
        sku.to_vec(),
        qty.map(str::to_string),
        prices.map(|p| p.map(str::to_string)),
    )
}

fn ok(sku: &str, qty: i64) -> Row {
    row(
        sku.as_bytes(),
        Some(&qty.to_string()),
        [Some("10.00"), Some("9.00"), Some("8.00")],
    )
}

/// The good rows, and DUP-1 once (so a first snapshot accepts it).
fn good() -> Vec<Row> {
    let mut rows: Vec<Row> = (0..30).map(|i| ok(&format!("SKU-{i:03}"), i)).collect();
    rows.push(ok("DUP-1", 5));
    rows
}

/// The bad rows added later.
fn bad() -> Vec<Row> {
    let p = [Some("1.00"), Some("1.00"), Some("1.00")];
    let mut rows = vec![
        ok("DUP-1", 0),
        row(b"M\xdcLLER-1", Some("3"), p),
        row(b"NULLQ", None, p),
        row(b"NULLP", Some("1"), [Some("1.00"), None, Some("1.00")]),
        row(b"HUGE", Some(&"x".repeat(HUGE)), p),
    ];
    rows.extend((0..9).map(|i| ok("DUP-MANY", i)));
    rows
}

/// What a snapshot staged: SKU → quantity, and rejects (row key, reason, SKU).
type Staged = (BTreeMap<String, i64>, Vec<(String, String, Option<String>)>);

async fn staged(db: &Path) -> Staged {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT MAX(id) FROM snapshots")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let items: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, qty FROM snapshot_items WHERE snapshot_id = ?")
            .bind(id)
            .fetch_all(&mut c)
            .await
            .unwrap();
    let mut rejects: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT row_key, reason, sku FROM snapshot_rejects WHERE snapshot_id = ?")
            .bind(id)
            .fetch_all(&mut c)
            .await
            .unwrap();
    rejects.sort();
    (items.into_iter().collect(), rejects)
}

/// Check a snapshot of good() + bad(): what was staged and what was rejected, and why.
fn check(s: &Staged, windows_1252: bool, carried_dup: bool) {
    let (items, rejects) = s;
    for i in 0..30 {
        assert_eq!(items.get(&format!("SKU-{i:03}")), Some(&i), "{items:?}");
    }
    // DUP-1: both rows rejected; carried forward (qty 5) when an earlier snapshot had it.
    assert_eq!(
        items.get("DUP-1"),
        carried_dup.then_some(&5),
        "DUP-1 must never be one of its duplicate rows"
    );
    assert!(!items.contains_key("DUP-MANY") && !items.contains_key("NULLQ"));
    assert!(!items.contains_key("NULLP") && !items.contains_key("HUGE"));
    let why = |key: &str| -> Vec<&str> {
        rejects
            .iter()
            .filter(|(k, ..)| k == key || k.starts_with(&format!("{key}…")))
            .map(|(_, r, _)| r.as_str())
            .collect()
    };
    let dup1 = why("DUP-1");
    assert!(
        !dup1.is_empty()
            && dup1
                .iter()
                .all(|r| r.contains("duplicate SKU \"DUP-1\": 2 rows")),
        "{dup1:?}"
    );
    let many = why("DUP-MANY");
    assert!(
        !many.is_empty() && many.iter().all(|r| r.contains("9 rows")),
        "{many:?}"
    );
    assert_eq!(why("NULLQ"), vec!["missing quantity"]);
    assert_eq!(why("NULLP"), vec!["missing price for tier 2"]);
    let huge = why("HUGE");
    assert_eq!(huge.len(), 1, "{rejects:?}");
    assert!(
        huge[0].contains("is not an integer") && huge[0].contains(&format!("{HUGE} bytes")),
        "{}",
        &huge[0][..huge[0].len().min(300)]
    );
    assert!(huge[0].len() < 300, "the 10 MB value is stored whole");
    if windows_1252 {
        assert_eq!(items.get("MÜLLER-1"), Some(&3), "{items:?}");
    } else {
        assert!(!items.contains_key("MÜLLER-1"));
        let (key, reason, sku) = rejects
            .iter()
            .find(|(k, ..)| k.starts_with("bytes:"))
            .expect("the Latin-1 row is rejected");
        assert_eq!(key, "bytes:M\\xdcLLER-1");
        assert!(
            reason.starts_with("column sku: bytes are not valid UTF-8")
                && reason.contains("encoding"),
            "{reason}"
        );
        assert_eq!(sku, &None);
    }
    // Rejected rows with a readable SKU remember it (for carry-forward).
    for (k, _, sku) in rejects {
        if k == "DUP-1" || k == "NULLQ" {
            assert_eq!(sku.as_deref(), Some(k.as_str()));
        }
    }
}

fn snapshot(db: &Path, source: &[&str], page: u32, encoding: Option<&str>) -> String {
    let mut c = bulwark();
    c.arg("snapshot")
        .args(source)
        .args([
            "--page-size",
            &page.to_string(),
            "--max-rejected-share",
            "0.6",
        ])
        .arg("--db")
        .arg(db);
    if let Some(e) = encoding {
        c.args(["--encoding", e]);
    }
    run_ok(&mut c)
}

async fn sqlite_insert(path: &Path, rows: &[Row]) {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS products (sku TEXT, qty TEXT, price_1 TEXT, price_2 TEXT, price_3 TEXT)",
    )
    .execute(&mut c)
    .await
    .unwrap();
    for (sku, qty, p) in rows {
        // Latin-1 bytes stored as TEXT, as an old export would.
        sqlx::query("INSERT INTO products VALUES (CAST(? AS TEXT), ?, ?, ?, ?)")
            .bind(sku)
            .bind(qty)
            .bind(&p[0])
            .bind(&p[1])
            .bind(&p[2])
            .execute(&mut c)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bad_rows_are_rejected_and_never_reach_the_shop() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let src = dir.path().join("legacy.db");
    let legacy = src.display().to_string();
    let sim = simulator::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let portal = format!("http://{}", sim.addr());
    let base = sim.base_url("ep-00001");
    let sync = || {
        run_ok(
            bulwark()
                .args(["sync", "--portal-url", &portal, "--endpoints", "1", "--db"])
                .arg(&db),
        )
    };
    sqlite_insert(&src, &good()).await;
    snapshot(&db, &["--legacy", &legacy], 2, None);
    sync();
    assert_eq!(shown(&base, &["DUP-1"]).await["DUP-1"], 5);

    sqlite_insert(&src, &bad()).await;
    let out = snapshot(&db, &["--legacy", &legacy], 2, None);
    assert!(out.contains("15 rejected"), "{out}");
    check(&staged(&db).await, false, true);
    sync();
    let view = shown(&base, &["DUP-1", "DUP-MANY", "MÜLLER-1", "NULLQ", "HUGE"]).await;
    assert_eq!(
        view,
        BTreeMap::from([("DUP-1".to_string(), 5)]),
        "a duplicated SKU keeps its value; rejected rows send nothing"
    );

    let out = snapshot(&db, &["--legacy", &legacy], 2, Some("windows-1252"));
    assert!(out.contains("14 rejected"), "{out}");
    check(&staged(&db).await, true, true);
    sync();
    assert_eq!(shown(&base, &["MÜLLER-1"]).await["MÜLLER-1"], 3);

    // Any page size reads the same: a page of one key grows, rows sharing a page's last
    // key are read with the next page.
    for page in [1, 3, 7, 500] {
        let db = dir.path().join(format!("p{page}.db"));
        snapshot(&db, &["--legacy", &legacy], page, Some("latin1"));
        check(&staged(&db).await, true, false);
    }
    // `bulwark audit` folds snapshot journals too, and finds a tampered one.
    let only = dir.path().join("p7.db");
    let out = run_ok(bulwark().args(["audit", "--db"]).arg(&only));
    assert!(
        out.starts_with("audited 1 workflows (0 endpoint_sync, 1 snapshot)")
            && out.contains(": 0 finding(s)"),
        "{out}"
    );
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", only.display()))
        .await
        .unwrap();
    let changed = sqlx::query(
        "UPDATE journal SET event_json = replace(event_json, '\"rejected\":', '\"rejected\":1') WHERE seq = 1",
    )
    .execute(&mut c)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(changed, 1);
    drop(c);
    let audit = bulwark()
        .args(["audit", "--db"])
        .arg(&only)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(audit.status.code(), Some(1), "{out}");
    assert!(
        out.contains("1 finding(s)") && out.contains("seq 1"),
        "{out}"
    );

    let err = bulwark()
        .args([
            "snapshot",
            "--legacy",
            &legacy,
            "--encoding",
            "klingon",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert!(
        !err.status.success() && stderr.contains("--encoding") && stderr.contains("windows-1252"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sql_ascii_bytes_and_bad_rows_are_rejected_or_decoded() {
    let Some(url) = bulwark_tests::pg_url() else {
        return;
    };
    let name = format!("bw_ascii_{}_{}", std::process::id(), rand_suffix());
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    // A database that does not know its text: bytes come back as stored.
    sqlx::query(AssertSqlSafe(format!(
        "CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let db_url = match url.rsplit_once('/') {
        Some((head, _)) => format!("{head}/{name}"),
        None => panic!("{url}"),
    };
    {
        let mut c = sqlx::PgConnection::connect(&db_url).await.unwrap();
        sqlx::query(
            "CREATE TABLE products (sku TEXT, qty TEXT, price_1 TEXT, price_2 TEXT, price_3 TEXT)",
        )
        .execute(&mut c)
        .await
        .unwrap();
        for (sku, qty, p) in good().into_iter().chain(bad()) {
            sqlx::query(
                "INSERT INTO products VALUES (convert_from($1, 'SQL_ASCII'), $2, $3, $4, $5)",
            )
            .bind(sku)
            .bind(qty)
            .bind(&p[0])
            .bind(&p[1])
            .bind(&p[2])
            .execute(&mut c)
            .await
            .unwrap();
        }
        c.close().await.unwrap();
    }
    check_every_decoding(&["--source-url", &db_url]).await;
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_binary_bytes_and_bad_rows_are_rejected_or_decoded() {
    let Some(url) = bulwark_tests::mysql_url() else {
        return;
    };
    let table = format!("bw_bad_{}_{}", std::process::id(), rand_suffix());
    let mut c = sqlx::MySqlConnection::connect(&url).await.unwrap();
    // A binary SKU column: no character set, bytes as stored (CAST AS CHAR would turn
    // the Latin-1 byte into '?').
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (sku VARBINARY(64), qty LONGTEXT, price_1 VARCHAR(20), price_2 VARCHAR(20), price_3 VARCHAR(20), KEY (sku))"
    )))
    .execute(&mut c)
    .await
    .unwrap();
    for (sku, qty, p) in good().into_iter().chain(bad()) {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} VALUES (?, ?, ?, ?, ?)"
        )))
        .bind(sku)
        .bind(qty)
        .bind(&p[0])
        .bind(&p[1])
        .bind(&p[2])
        .execute(&mut c)
        .await
        .unwrap();
    }
    check_every_decoding(&["--source-url", &url, "--table", &table]).await;
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&mut c)
        .await
        .unwrap();
}

/// Snapshot a server source holding good() + bad() with the default encoding, with
/// windows-1252, and with latin1 a row per page, each into a fresh database, and check it.
async fn check_every_decoding(source: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    for (page, encoding) in [(2, None), (2, Some("windows-1252")), (1, Some("latin1"))] {
        let db = dir.path().join(format!("s{page}{encoding:?}.db"));
        snapshot(&db, source, page, encoding);
        check(&staged(&db).await, encoding.is_some(), false);
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}
