//! Settling runs out of order (a run whose finished endpoints are settled while a paused
//! endpoint's sync waits, and again when it ends, possibly after later runs of the same
//! endpoints settled): what a later run recorded for an endpoint is never replaced by an
//! earlier run's. On SQLite and on PostgreSQL.

use bulwark_engine::Backend;
use bulwark_workflows::staging::{Settled, Staging};

fn done(endpoint: &str, snapshot: i64) -> Settled {
    Settled {
        endpoint: endpoint.into(),
        snapshot,
        confirmed: Some(None),
        status: "Done".into(),
        carried: Vec::new(),
        quarantined: Vec::new(),
        stock: None,
    }
}

fn tripped(endpoint: &str, snapshot: i64) -> Settled {
    Settled {
        confirmed: None,
        status: "Tripped".into(),
        ..done(endpoint, snapshot)
    }
}

async fn case(backend: Backend) {
    let staging = Staging::new(backend.clone());
    // Run 1 settles a and b while c waits; run 2 confirms a at snapshot 2.
    staging
        .settle(1, &[done("a", 1), done("b", 1)])
        .await
        .unwrap();
    staging.settle(2, &[done("a", 2)]).await.unwrap();
    // Run 1 ends: settled again in full — a keeps run 2's record, c is added.
    staging
        .settle(1, &[done("a", 1), done("b", 1), done("c", 1)])
        .await
        .unwrap();
    let confirmed = staging.confirmed().await.unwrap();
    assert_eq!(confirmed.get("a"), Some(&2), "{confirmed:?}");
    assert_eq!(confirmed.get("b"), Some(&1));
    assert_eq!(confirmed.get("c"), Some(&1));
    // Run 3 trips b; run 1 settling again does not clear that.
    staging.settle(3, &[tripped("b", 3)]).await.unwrap();
    staging.settle(1, &[done("b", 1)]).await.unwrap();
    assert!(staging.unsettled().await.unwrap().contains("b"));
    // An earlier run's trip does not mark unsettled what a later run confirmed.
    staging.settle(1, &[tripped("a", 1)]).await.unwrap();
    assert!(!staging.unsettled().await.unwrap().contains("a"));
    // A later run still settles over everything earlier.
    staging.settle(4, &[done("b", 4)]).await.unwrap();
    assert!(!staging.unsettled().await.unwrap().contains("b"));
    assert_eq!(staging.confirmed().await.unwrap().get("b"), Some(&4));
}

#[tokio::test]
async fn sqlite_settles_never_go_back_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::open(&dir.path().join("s.db").display().to_string())
        .await
        .unwrap();
    case(backend.clone()).await;
    backend.close().await;
}

#[tokio::test]
async fn postgres_settles_never_go_back_in_time() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let backend = Backend::open(&bulwark_tests::pg_schema_url(&base, "settle_order"))
        .await
        .unwrap();
    case(backend.clone()).await;
    if let Backend::Postgres(pg) = &backend {
        pg.drop_schema().await.unwrap();
    }
    backend.close().await;
}
