//! Profiles are validated when they are loaded; the lookup cache persists in Bulwark's
//! database.

mod http_common;

use std::sync::Arc;

use bulwark_adapters::http::{self, IdCache, MemoryIdCache, Profiles, SqliteIdCache};
use bulwark_workflows::adapter::{AdapterError, AdapterRegistry};
use bulwark_workflows::app::Bulwark;
use http_common::*;

/// The test profiles with `from` replaced by `to` (which must occur).
fn edited(from: &str, to: &str) -> String {
    assert!(
        PROFILES.contains(from),
        "test setup: {from:?} not in profiles"
    );
    PROFILES.replacen(from, to, 1)
}

fn load_err(text: &str) -> String {
    match Profiles::from_toml_str(text) {
        Ok(p) => panic!("expected a load error, loaded {:?}", p.names()),
        Err(e) => {
            eprintln!("load error: {e}");
            e.to_string()
        }
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "{p:?} missing from: {err}");
    }
}

#[test]
fn the_test_profiles_and_the_documented_examples_load() {
    let p = profiles();
    assert_eq!(p.names(), vec!["batch_rest", "gql", "rest_items"]);
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/http-adapter.md"
    ))
    .unwrap();
    // Every ```toml block of the reference together forms one profiles file, except a
    // ```toml excerpt block: that one must appear verbatim in a shipped example profile
    // (examples/profiles, each loaded by the http_shapes tests).
    let examples_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles");
    let examples: Vec<String> = std::fs::read_dir(examples_dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let mut toml = String::new();
    let mut excerpt: Option<String> = None;
    let mut excerpts = 0;
    let mut inside = false;
    for line in doc.lines() {
        let t = line.trim_start();
        if t.starts_with("```toml") {
            inside = true;
            if t.contains("excerpt") {
                excerpt = Some(String::new());
            }
        } else if t.starts_with("```") {
            inside = false;
            if let Some(x) = excerpt.take() {
                assert!(
                    examples.iter().any(|e| e.contains(&x)),
                    "this excerpt of docs/http-adapter.md is in no file of examples/profiles:\n{x}"
                );
                excerpts += 1;
            }
        } else if let Some(x) = excerpt.as_mut() {
            x.push_str(line);
            x.push('\n');
        } else if inside {
            toml.push_str(line);
            toml.push('\n');
        }
    }
    assert!(
        excerpts >= 1,
        "the reference's excerpt blocks were not found"
    );
    let loaded = Profiles::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert!(loaded.names().len() >= 2, "{:?}", loaded.names());
}

#[test]
fn template_referencing_an_unknown_item_field_fails_at_load() {
    let err = load_err(&edited("{{ item.qty }}", "{{ item.quantity }}"));
    assert_names(
        &err,
        &[
            "profile \"rest_items\"",
            "field `write.request.body`",
            "item.quantity",
            "known item fields",
        ],
    );
}

#[test]
fn template_referencing_an_unknown_variable_fails_at_load() {
    let err = load_err(&edited(
        "url = \"{{ base_url }}/batches\"",
        "url = \"{{ baseurl }}/batches\"",
    ));
    assert_names(
        &err,
        &[
            "profile \"batch_rest\"",
            "field `write.request.url`",
            "unknown variable `baseurl`",
        ],
    );
    // `id` without a lookup table, `token` without a login.
    let err = load_err(&edited(
        "url = \"{{ base_url }}/batches\"",
        "url = \"{{ base_url }}/batches/{{ token }}\"",
    ));
    assert_names(&err, &["batch_rest", "`token` needs auth kind"]);
}

#[test]
fn unknown_field_of_a_loop_variable_fails_at_load() {
    let err = load_err(&edited("{{ it.qty }}", "{{ it.stock }}"));
    assert_names(
        &err,
        &[
            "profile \"batch_rest\"",
            "field `write.request.body`",
            "render",
        ],
    );
}

#[test]
fn undeclared_secret_or_setting_fails_at_load() {
    let err = load_err(&edited("{{ secrets.password }}", "{{ secrets.pasword }}"));
    assert_names(
        &err,
        &[
            "rest_items",
            "auth.login.body",
            "secrets.pasword",
            "declare it in `secrets`",
        ],
    );
    let err = load_err(&edited("{{ sku | urlencode }}", "{{ settings.shop }}"));
    assert_names(&err, &["rest_items", "lookup.request.url", "settings.shop"]);
}

#[test]
fn body_that_is_not_json_fails_at_load() {
    let err = load_err(&edited(
        "body = '{\"skus\": {{ skus }}}'",
        "body = '{\"skus\": {{ skus }}'",
    ));
    assert_names(
        &err,
        &["batch_rest", "read.request.body", "does not render to JSON"],
    );
}

#[test]
fn template_syntax_error_fails_at_load() {
    let err = load_err(&edited("{{ item.qty }}", "{{ item.qty }"));
    assert_names(
        &err,
        &["rest_items", "write.request.body", "does not parse"],
    );
}

#[test]
fn bad_json_path_fails_at_load() {
    let err = load_err(&edited("qty = \"$.stock\"", "qty = \"$.stock[\""));
    assert_names(&err, &["rest_items", "read.qty", "invalid JSON path"]);
}

#[test]
fn unknown_config_key_fails_at_load() {
    let err = load_err(&edited("idempotency_header =", "idempotency_heder ="));
    assert_names(&err, &["batch_rest", "write", "idempotency_heder"]);
    let err = load_err(&edited("class = \"rejected\"", "class = \"rejectd\""));
    assert_names(&err, &["gql", "errors", "rejectd"]);
}

#[test]
fn endpoint_settings_are_checked_when_the_adapter_is_built() {
    let creds = Creds::random();
    let mut registry = AdapterRegistry::new();
    registry.register(
        http::ADAPTER_NAME,
        http::factory_with(profiles(), Arc::new(MemoryIdCache::new()), creds.secrets()),
    );
    let build = |profile: &str, extra: &[(&str, &str)]| {
        registry
            .build(&endpoint(
                "ep-1",
                profile,
                "http://127.0.0.1:9/x".into(),
                extra,
            ))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(build("nope", &[]).contains("unknown profile \"nope\""));
    assert!(build("rest_items", &[]).contains("username_env"));
    assert!(
        build(
            "rest_items",
            &[
                ("username_env", "UNSET_VAR"),
                ("password_env", PASSWORD_VAR)
            ]
        )
        .contains("\"UNSET_VAR\" (username_env) is not set")
    );
    assert!(
        build("rest_items", &[REST_CREDS, &[("shop_id", "1")]].concat())
            .contains("unknown setting `shop_id`")
    );
    assert_eq!(build("rest_items", REST_CREDS), "");
    // https builds (TLS is built in); a scheme that is neither http nor https is refused.
    registry
        .build(&endpoint(
            "ep-1",
            "gql",
            "https://x.invalid".into(),
            GQL_CREDS,
        ))
        .unwrap();
    let e = registry
        .build(&endpoint(
            "ep-1",
            "gql",
            "ftp://x.invalid".into(),
            GQL_CREDS,
        ))
        .err()
        .unwrap();
    assert!(
        matches!(e, AdapterError::Config(ref m) if m.contains("http or https") && m.contains("ftp")),
        "{e}"
    );
    // Transport settings are accepted, and checked: a CA file that is not there is named.
    let e = registry
        .build(&endpoint(
            "ep-1",
            "gql",
            "https://x.invalid".into(),
            &[GQL_CREDS, &[("ca_file", "/nonexistent/ca.pem")]].concat(),
        ))
        .err()
        .unwrap();
    assert!(
        matches!(e, AdapterError::Config(ref m) if m.contains("ep-1") && m.contains("/nonexistent/ca.pem")),
        "{e}"
    );
}

/// A plain pool on Bulwark's database file (what `SqliteIdCache::new` is given by an
/// embedding program: the store's own pool or one of its own).
async fn pool(db: &std::path::Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_id_cache_persists_in_the_bulwark_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let app = Bulwark::open(&db, AdapterRegistry::new()).await.unwrap();
    // Bulwark's migrations created the table.
    let p = pool(&db).await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'adapter_id_cache'",
    )
    .fetch_all(&p)
    .await
    .unwrap();
    assert_eq!(tables, vec!["adapter_id_cache".to_owned()]);
    let cache = SqliteIdCache::new(p.clone()).await.unwrap();
    let ids: Vec<(String, String)> = (0..700)
        .map(|i| (format!("S-{i}"), format!("id-{i}")))
        .collect();
    cache.put_many("p", "ep-1", &ids).await.unwrap();
    cache
        .put_many("p", "ep-1", &[("S-1".into(), "id-new".into())])
        .await
        .unwrap();
    cache.invalidate("p", "ep-1", "S-2").await.unwrap();
    p.close().await;
    app.close().await;

    let app = Bulwark::open(&db, AdapterRegistry::new()).await.unwrap();
    let cache = SqliteIdCache::connect(&db).await.unwrap();
    let skus: Vec<String> = (0..700).map(|i| format!("S-{i}")).collect();
    let got = cache.get_many("p", "ep-1", &skus).await.unwrap();
    assert_eq!(got.len(), 699);
    assert_eq!(got["S-1"], "id-new");
    assert_eq!(got["S-699"], "id-699");
    assert!(!got.contains_key("S-2"));
    assert!(cache.get_many("p", "ep-2", &skus).await.unwrap().is_empty());
    assert!(cache.get_many("q", "ep-1", &skus).await.unwrap().is_empty());
    cache.pool().close().await;
    app.close().await;

    let mem = MemoryIdCache::new();
    mem.put_many("p", "e", &ids[..3]).await.unwrap();
    mem.invalidate("p", "e", "S-0").await.unwrap();
    assert_eq!(mem.len(), 2);
}
