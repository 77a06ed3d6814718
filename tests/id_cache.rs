//! The HTTP adapter's lookup cache keeps ids in Bulwark's own database, on both backends.

use std::sync::Arc;

use bulwark_adapters::http::{IdCache, PgIdCache, SqliteIdCache};
use bulwark_engine::Backend;

async fn exercise(cache: Arc<dyn IdCache>) {
    let skus: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
    assert!(cache.get_many("p", "e", &skus).await.unwrap().is_empty());
    cache
        .put_many(
            "p",
            "e",
            &[("A".into(), "1".into()), ("B".into(), "2".into())],
        )
        .await
        .unwrap();
    cache
        .put_many("p", "e", &[("B".into(), "20".into())])
        .await
        .unwrap();
    cache
        .put_many("p", "other", &[("C".into(), "3".into())])
        .await
        .unwrap();
    let got = cache.get_many("p", "e", &skus).await.unwrap();
    assert_eq!(
        (
            got.get("A").map(String::as_str),
            got.get("B").map(String::as_str),
            got.get("C")
        ),
        (Some("1"), Some("20"), None)
    );
    cache.invalidate("p", "e", "A").await.unwrap();
    let got = cache.get_many("p", "e", &skus).await.unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test]
async fn sqlite_cache_lives_in_bulwarks_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("b.db");
    let Backend::Sqlite(store) = Backend::open(&db.display().to_string()).await.unwrap() else {
        unreachable!()
    };
    exercise(Arc::new(
        SqliteIdCache::new(store.pool().clone()).await.unwrap(),
    ))
    .await;
}

#[tokio::test]
async fn postgres_cache_lives_in_bulwarks_database() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let Backend::Postgres(pg) = Backend::open(&bulwark_tests::pg_schema_url(&base, "idcache"))
        .await
        .unwrap()
    else {
        unreachable!()
    };
    exercise(Arc::new(PgIdCache::new(pg.pool().clone()))).await;
    pg.drop_schema().await.unwrap();
}
