//! Platform shapes the `http` profile language must express without code, synced through
//! the real endpoint-sync machine against the API simulator's catalog mode: a listing
//! without a SKU filter (paged by page number, offset, cursor or `Link` header), several
//! ids per SKU, stock and prices as separate write requests, chained lookups, endpoints
//! that own only some fields, and the guards that keep a listing from being cut silently.

mod http_common;

use std::sync::Arc;

use bulwark_adapters::http::{self, IdCache, MapSecrets, Profiles, Secrets, SqliteIdCache};
use bulwark_adapters::sim_api::{ApiSimHandle, ApiSimStats};
use bulwark_workflows::adapter::{AdapterError, AdapterRegistry, EndpointConfig};
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::catalog::{Batch, Item};
use http_common::*;

/// The shipped example profile.
const CATALOG: &str = include_str!("../../examples/profiles/catalog.toml");
/// The shipped bulk GraphQL profile.
const GQL_BATCH: &str = include_str!("../../examples/profiles/gql_batch.toml");

const PAGE_URL: &str = "{{ base_url }}/products?limit={{ limit }}&page={{ page }}";
const PAGE_PAGINATION: &str = r#"pagination = { kind = "page", size = 250 }"#;

/// The example profile paged by `kind` with `size` records per page.
fn catalog_profile(kind: &str, size: u32) -> String {
    let (url, pagination) = match kind {
        "page" => (
            PAGE_URL.to_owned(),
            format!(r#"pagination = {{ kind = "page", size = {size} }}"#),
        ),
        "offset" => (
            "{{ base_url }}/products?limit={{ limit }}&offset={{ offset }}".to_owned(),
            format!(r#"pagination = {{ kind = "offset", size = {size} }}"#),
        ),
        "cursor" => (
            "{{ base_url }}/products?limit={{ limit }}{% if cursor %}&cursor={{ cursor }}{% endif %}"
                .to_owned(),
            format!(r#"pagination = {{ kind = "cursor", size = {size}, next = "$.next_cursor" }}"#),
        ),
        "link" => (
            "{{ base_url }}/products?limit={{ limit }}".to_owned(),
            format!(r#"pagination = {{ kind = "link", size = {size} }}"#),
        ),
        other => panic!("no kind {other}"),
    };
    let text = CATALOG
        .replace(PAGE_URL, &url)
        .replace(PAGE_PAGINATION, &pagination);
    assert_eq!(text.matches(&pagination).count(), 2, "{kind}: {text}");
    text
}

fn registry_for(
    profiles: &str,
    cache: Arc<dyn IdCache>,
    secrets: Arc<dyn Secrets>,
) -> AdapterRegistry {
    let profiles = Arc::new(Profiles::from_toml_str(profiles).expect("profile loads"));
    let mut r = AdapterRegistry::new();
    r.register(
        http::ADAPTER_NAME,
        http::factory_with(profiles, cache, secrets),
    );
    r
}

fn catalog_endpoint(sim: &ApiSimHandle, id: &str, extra: &[(&str, &str)]) -> EndpointConfig {
    endpoint(
        id,
        "catalog",
        sim.catalog_base_url(id),
        &[
            &[("api_key_env", API_KEY_VAR), ("location_id", "loc-1")],
            extra,
        ]
        .concat(),
    )
}

/// What the simulator shows for the SKUs of `want`.
fn shown(sim: &ApiSimHandle, endpoint: &str, want: &[Item]) -> Vec<Item> {
    let skus: std::collections::HashSet<&str> = want.iter().map(|i| i.sku.as_str()).collect();
    normalized(
        sim.items(endpoint)
            .into_iter()
            .filter(|i| skus.contains(i.sku.as_str()))
            .collect(),
    )
}

fn skus(n: u32) -> Vec<String> {
    items(n, 0).into_iter().map(|i| i.sku).collect()
}

fn delta(before: ApiSimStats, after: ApiSimStats) -> (u64, u64) {
    (
        after.pages - before.pages,
        after.writes_applied - before.writes_applied,
    )
}

/// A shop with `catalog` products at the simulator and a sealed snapshot of the first
/// `synced` of them in a fresh database.
struct Shop {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    creds: Creds,
    sim: ApiSimHandle,
    cache: Arc<dyn IdCache>,
    want: Vec<Item>,
}

async fn shop(catalog: u32, synced: u32) -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    sim.seed_catalog("shop", &skus(catalog));
    let want = items(synced, 0);
    seed(&db, &want).await;
    let cache: Arc<dyn IdCache> = Arc::new(SqliteIdCache::connect(&db).await.unwrap());
    Shop {
        _dir: dir,
        db,
        creds,
        sim,
        cache,
        want,
    }
}

impl Shop {
    fn registry(&self, profile: &str) -> AdapterRegistry {
        registry_for(profile, self.cache.clone(), self.creds.secrets())
    }

    async fn app(&self, profile: &str) -> Bulwark {
        Bulwark::open(&self.db, self.registry(profile))
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_without_a_sku_filter_syncs_with_every_kind_of_pagination() {
    for kind in ["page", "offset", "cursor", "link"] {
        // 450 products at the shop, 400 of them in the snapshot: the listing holds
        // records Bulwark does not sync.
        let shop = shop(450, 400).await;
        let (db, sim, want) = (&shop.db, &shop.sim, shop.want.clone());
        let app = shop.app(&catalog_profile(kind, 100)).await;
        let eps = vec![catalog_endpoint(sim, "shop", &[])];

        let before = sim.stats();
        let report = app.sync(&eps, &options(100), None).await.unwrap();
        assert_eq!(done(&report), 1, "{kind}: {report:?}");
        assert_eq!(
            shown(sim, "shop", &want),
            normalized(want.clone()),
            "{kind}"
        );
        let (pages, writes) = delta(before, sim.stats());
        // Stock and prices: two requests per item, each exactly once.
        assert_eq!(writes, 800, "{kind}");
        for i in [0, 99, 100, 399] {
            assert_eq!(
                sim.writes_for("shop", &want[i].sku),
                2,
                "{kind}: {}",
                want[i].sku
            );
        }
        assert_eq!(
            sim.writes_for("shop", "S-0420"),
            0,
            "{kind}: not in the snapshot"
        );
        // Lookups: one listing walked once (4 pages of 100 for 400 SKUs, resumed batch
        // after batch); read-backs: each batch's listing stops once its SKUs were seen
        // (1 + 2 + 3 + 4 pages).
        assert!(pages <= 4 + 10, "{kind}: {pages} pages on a first sync");
        eprintln!(
            "{kind}: first sync of 400 SKUs: {writes} write requests, {pages} listing pages (lookups and read-backs)"
        );
        assert_clean_audit(&app).await;

        // Nothing changed: nothing sent, nothing read.
        let before = sim.stats();
        seed(db, &want).await;
        let report = app.sync(&eps, &options(100), None).await.unwrap();
        assert_eq!(done(&report), 0, "{kind}: {report:?}");
        assert_eq!(delta(before, sim.stats()), (0, 0), "{kind}");

        // A 1 % change: only the changed items are written, with no lookup (ids are
        // cached): the read-back reads until it has seen them.
        let mut changed = want.clone();
        for i in [3, 150, 260, 399] {
            changed[i].qty += 7;
            changed[i].tiers[0].price_minor += 1;
        }
        seed(db, &changed).await;
        let before = sim.stats();
        let report = app.sync(&eps, &options(100), None).await.unwrap();
        assert_eq!(done(&report), 1, "{kind}: {report:?}");
        assert_eq!(
            shown(sim, "shop", &changed),
            normalized(changed.clone()),
            "{kind}"
        );
        let (pages, writes) = delta(before, sim.stats());
        assert_eq!(writes, 8, "{kind}: 4 items × stock and prices");
        assert!(pages <= 4, "{kind}: {pages} pages (read-back only)");
        eprintln!("{kind}: 1 % change (4 SKUs): {writes} write requests, {pages} listing pages");
        assert_eq!(sim.writes_for("shop", &changed[150].sku), 4);
        assert_eq!(sim.writes_for("shop", &changed[151].sku), 2);
        assert_clean_audit(&app).await;
        app.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stock_answer_resends_only_the_price_request() {
    let shop = shop(20, 20).await;
    let (sim, want) = (&shop.sim, shop.want.clone());
    let app = shop.app(CATALOG).await;
    // The first write (S-0000's stock) is applied, and its answer never arrives.
    sim.lose_next_writes("shop", 1);
    let eps = vec![catalog_endpoint(sim, "shop", &[])];
    let report = app.sync(&eps, &options(20), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(sim.stats().responses_lost, 1);
    assert_eq!(shown(sim, "shop", &want), normalized(want.clone()));
    // No profile probe and no idempotency key: the retry read back first; the stock
    // showed, so only the prices were sent. Every request landed exactly once.
    for item in &want {
        assert_eq!(sim.writes_for("shop", &item.sku), 2, "{}", item.sku);
    }
    assert_eq!(sim.stats().writes_applied, 40);
    assert_clean_audit(&app).await;
    app.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_owns_only_the_stock_never_writes_or_checks_prices() {
    let shop = shop(30, 30).await;
    let (db, sim, want) = (&shop.db, &shop.sim, shop.want.clone());
    let registry = shop.registry(CATALOG);
    // A typo or a field the profile does not write is refused when the adapter is built.
    for (owns, says) in [
        ("colour", "unknown field \"colour\""),
        ("", "names no field"),
    ] {
        let err = registry
            .build(&catalog_endpoint(sim, "shop", &[("owns", owns)]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("setting `owns`") && err.contains(says),
            "{owns:?}: {err}"
        );
    }
    let app = Bulwark::open(&db, registry).await.unwrap();
    // Another system owns the prices: they differ at the shop and stay as they are.
    let eps = vec![catalog_endpoint(sim, "shop", &[("owns", "qty")])];
    let report = app.sync(&eps, &options(10), None).await.unwrap();
    assert_eq!(
        done(&report),
        1,
        "verify compares only the stock: {report:?}"
    );
    let at_shop = shown(sim, "shop", &want);
    for (got, w) in at_shop.iter().zip(&want) {
        assert_eq!(got.qty, w.qty, "{}", w.sku);
        assert!(got.tiers.is_empty(), "{}: prices untouched", w.sku);
        assert_eq!(
            sim.writes_for("shop", &w.sku),
            1,
            "{}: one stock request",
            w.sku
        );
    }
    assert_clean_audit(&app).await;
    app.close().await;
}

/// A chain: the listing gives the product id, a per-item request on the product gives
/// the variant and inventory item ids (it sees the first step's `ids`).
const CHAINED_STEP_2: &str = r#"
[[profiles.catalog.lookup]]
mode = "list"
request = { method = "GET", url = "{{ base_url }}/products?limit={{ limit }}&page={{ page }}" }
pagination = { kind = "page", size = 250 }
records = "$.products[*]"
sku = "$.variants[0].sku"
ids = { product = "$.id" }

[[profiles.catalog.lookup]]
request = { method = "GET", url = "{{ base_url }}/products/{{ ids.product }}" }
records = "$.product.variants[*]"
sku = "$.sku"
ids = { variant = "$.id", inventory_item = "$.inventory_item_id" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chained_lookups_capture_ids_from_a_listing_then_from_each_record() {
    let single = CATALOG
        .split("[profiles.catalog.lookup]")
        .collect::<Vec<_>>();
    let rest = single[1]
        .split_once("[[profiles.catalog.write]]")
        .unwrap()
        .1;
    let profile = format!(
        "{}{CHAINED_STEP_2}\n[[profiles.catalog.write]]{rest}",
        single[0]
    );
    let shop = shop(30, 30).await;
    let (sim, want) = (&shop.sim, shop.want.clone());
    let app = shop.app(&profile).await;
    let eps = vec![catalog_endpoint(sim, "shop", &[])];
    let report = app.sync(&eps, &options(30), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(sim, "shop", &want), normalized(want.clone()));
    assert_eq!(
        sim.stats().reads,
        30,
        "one product request per SKU in step 2"
    );
    // The three ids of a SKU are cached together.
    let cached = shop
        .cache
        .get_many("catalog", "shop", &["S-0007".to_owned()])
        .await
        .unwrap();
    let ids: serde_json::Value = serde_json::from_str(&cached["S-0007"]).unwrap();
    for name in ["product", "variant", "inventory_item"] {
        assert!(ids[name].is_string(), "{name}: {ids}");
    }
    assert_clean_audit(&app).await;
    app.close().await;
}

fn batch(items: Vec<Item>) -> Batch {
    Batch {
        endpoint: "shop".into(),
        snapshot: 1,
        index: 0,
        key: uuid::Uuid::new_v4(),
        items,
        remainder: false,
        cas: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_is_never_cut_silently_and_ids_must_be_scalars() {
    let creds = Creds::random();
    let sim = api_sim(&creds).await;
    sim.seed_catalog("shop", &skus(450));
    let secrets: Arc<dyn Secrets> = Arc::new(MapSecrets::new().with(API_KEY_VAR, &creds.api_key));
    let cache = || -> Arc<dyn IdCache> { Arc::new(http::MemoryIdCache::default()) };
    let last = items(450, 0).pop().unwrap();

    // More pages than max_pages: an error that says so, not "S-0449 is absent".
    let capped = catalog_profile("page", 100).replace(
        r#"kind = "page", size = 100 }"#,
        r#"kind = "page", size = 100, max_pages = 2 }"#,
    );
    let adapter = registry_for(&capped, cache(), secrets.clone())
        .build(&catalog_endpoint(&sim, "shop", &[]))
        .unwrap();
    let err = adapter
        .read_back(&batch(vec![last.clone()]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdapterError::Config(m) if m.contains("more than max_pages = 2 pages")),
        "{err:?}"
    );

    // A cursor that does not move.
    let stuck = catalog_profile("cursor", 100).replace(
        "{% if cursor %}&cursor={{ cursor }}{% endif %}",
        "{% if cursor %}&page=1{% endif %}",
    );
    let adapter = registry_for(&stuck, cache(), secrets.clone())
        .build(&catalog_endpoint(&sim, "shop", &[]))
        .unwrap();
    let err = adapter
        .read_back(&batch(vec![last.clone()]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdapterError::Config(m) if m.contains("is the current one")),
        "{err:?}"
    );

    // An id path that selects a list is a configuration error naming the id.
    let wrong = CATALOG.replace(r#"variant = "$.id""#, r#"variant = "$.prices""#);
    let adapter = registry_for(&wrong, cache(), secrets.clone())
        .build(&catalog_endpoint(&sim, "shop", &[]))
        .unwrap();
    let err = adapter
        .upload(&batch(vec![last.clone()]))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("id `variant` of SKU \"S-0449\"")
            && text.contains("selected a list, not a scalar id"),
        "{text}"
    );
    assert_eq!(sim.stats().writes_applied, 0, "nothing was written");
    sim.shutdown().await;
}

fn load_err(text: &str) -> String {
    match Profiles::from_toml_str(text) {
        Ok(p) => panic!("expected a load error, loaded {:?}", p.names()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_shipped_example_profiles_load() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Profiles::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn what_the_new_profile_language_refuses_at_load_names_the_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        // A templated JSON path may use only what exists there.
        (
            "{{ settings.location_id }}].available",
            "{{ settings.shelf }}].available",
            &["field `read.qty`", "unknown field `settings.shelf`"],
        ),
        // Values are inserted quoted: a quoted expression would never match.
        (
            "== {{ settings.location_id }}]",
            "== '{{ settings.location_id }}']",
            &["field `read.qty`", "inserted as quoted JSON strings"],
        ),
        // Secrets never go into paths (they would show in errors).
        (
            "{{ settings.location_id }}].available",
            "{{ secrets.api_key }}].available",
            &[
                "field `read.qty`",
                "JSON paths may use endpoint values, not secrets",
            ],
        ),
        // A paged request must move the page.
        (
            r#"url = "{{ base_url }}/products?limit={{ limit }}&page={{ page }}" }
pagination = { kind = "page", size = 250 }
records = "$.products[*].variants[*]"
sku = "$.sku"
ids"#,
            r#"url = "{{ base_url }}/products?limit={{ limit }}" }
pagination = { kind = "page", size = 250 }
records = "$.products[*].variants[*]"
sku = "$.sku"
ids"#,
            &[
                "field `lookup.request`",
                "no template of it uses `{{ page }}`",
            ],
        ),
        // Paging variables need a pagination table.
        (
            r#"pagination = { kind = "page", size = 250 }
records = "$.products[*].variants[*]"
sku = "$.sku"
ids"#,
            r#"records = "$.products[*].variants[*]"
sku = "$.sku"
ids"#,
            &[
                "field `lookup.request.url`",
                "unknown variable `limit`",
                "pagination",
            ],
        ),
        // An id name templates do not know.
        (
            "{{ ids.inventory_item }}",
            "{{ ids.stock_item }}",
            &[
                "field `write[0].request.body`",
                "unknown field `ids.stock_item`",
                "inventory_item, product, variant",
            ],
        ),
        // A listing must say how records are matched to SKUs.
        (
            "records = \"$.products[*].variants[*]\"\nsku = \"$.sku\"\nids",
            "records = \"$.products[*].variants[*]\"\nids",
            &["field `lookup.records`", "need `records` and `sku` paths"],
        ),
        // Owning the stock needs reading it back.
        (
            "qty = \"$.inventory_levels",
            "# qty = \"$.inventory_levels",
            &["field `read.qty`", "owns `qty`"],
        ),
        // Every owned field has a write request.
        (
            "fields = [\"prices\"]",
            "fields = [\"qty\"]",
            &["field `write`", "no write request writes \"prices\""],
        ),
        // Pagination kinds and their keys.
        (
            r#"pagination = { kind = "page", size = 250 }
records = "$.products[*].variants[*]"
sku = "$.sku"
qty"#,
            r#"pagination = { kind = "cursor", size = 250 }
records = "$.products[*].variants[*]"
sku = "$.sku"
qty"#,
            &[
                "field `read.pagination.next`",
                "required for kind \"cursor\"",
            ],
        ),
    ];
    for (from, to, parts) in cases {
        assert!(CATALOG.contains(from), "test setup: {from:?}");
        let err = load_err(&CATALOG.replacen(from, to, 1));
        for p in *parts {
            assert!(err.contains(p), "{p:?} missing from: {err}");
        }
    }
    // A GraphQL document is sent verbatim: a `{{` in it is refused, not sent.
    let gql = PROFILES.replacen("query Lookup(", "query Lookup{{ sku }}(", 1);
    assert_ne!(gql, PROFILES, "test setup");
    let err = load_err(&gql);
    assert!(
        err.contains("graphql.query") && err.contains("sent verbatim"),
        "{err}"
    );
    // A path that is not a template anywhere refuses template syntax.
    let receipt = PROFILES.replacen(r#"receipt = "$.receipt""#, r#"receipt = "$.{{ key }}""#, 1);
    assert_ne!(receipt, PROFILES, "test setup");
    let err = load_err(&receipt);
    assert!(
        err.contains("write.receipt") && err.contains("not a template here"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_lookup_asks_for_many_skus_per_request_and_a_stale_id_only_for_itself() {
    let batched = CATALOG.replace(
        r#"mode = "list"
request = { method = "GET", url = "{{ base_url }}/products?limit={{ limit }}&page={{ page }}" }
pagination = { kind = "page", size = 250 }"#,
        r#"mode = "per_batch"
skus_per_request = 40
request = { method = "GET", url = "{{ base_url }}/products?limit=250&skus={{ skus | join(',') | urlencode }}" }"#,
    );
    assert_ne!(batched, CATALOG, "test setup");
    let shop = shop(200, 200).await;
    let (db, sim, want) = (&shop.db, &shop.sim, shop.want.clone());
    let app = shop.app(&batched).await;
    let eps = vec![catalog_endpoint(sim, "shop", &[])];
    let before = sim.stats();
    let report = app.sync(&eps, &options(100), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(sim, "shop", &want), normalized(want.clone()));
    let (pages, _) = delta(before, sim.stats());
    // Two batches of 100 SKUs, 40 per lookup request: 3 + 3 lookups; read-backs: one
    // page of 250 per batch.
    assert_eq!(pages, 6 + 2, "lookup and read-back requests");

    // The shop renumbers; one item changes: its stale ids are looked up again, alone.
    sim.renumber("shop");
    let mut changed = want.clone();
    changed[17].qty += 1;
    seed(db, &changed).await;
    let before = sim.stats();
    let report = app.sync(&eps, &options(100), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    assert_eq!(shown(sim, "shop", &changed), normalized(changed.clone()));
    let after = sim.stats();
    assert_eq!(
        after.pages - before.pages,
        1 + 1,
        "one lookup of the one SKU, one read-back"
    );
    assert_eq!(
        after.writes_refused - before.writes_refused,
        1,
        "the stale id's 404"
    );
    app.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_graphql_api_reports_item_errors_as_unions_inside_a_200() {
    // Products come into being at their first lookup; the shop refuses two SKUs.
    let shop = shop(0, 300).await;
    let (db, sim, want) = (&shop.db, &shop.sim, shop.want.clone());
    let bad = [want[7].sku.clone(), want[123].sku.clone()];
    sim.refuse_skus("shop", &[&bad[0], &bad[1]]);
    let app = shop.app(GQL_BATCH).await;
    let eps = vec![endpoint(
        "shop",
        "gql_batch",
        sim.graphql_url("shop"),
        GQL_CREDS,
    )];
    // A throttled platform answers 200 with an error: slowed down, not failed.
    sim.throttle_next("shop", 2);

    let report = app.sync(&eps, &options(100), None).await.unwrap();
    assert_eq!(
        done(&report),
        1,
        "the refusals are items, not the endpoint: {report:?}"
    );
    let stats = sim.stats();
    // Ids for 300 SKUs at 100 per request; one mutation per batch, 298 items applied.
    assert_eq!(stats.lookups, 3, "{stats:?}");
    assert_eq!(stats.writes_applied, 298, "{stats:?}");
    assert_eq!(
        stats.writes_refused, 2,
        "each refused once, never re-sent: {stats:?}"
    );
    let shown_now = shown(sim, "shop", &want);
    for item in &want {
        let got = shown_now.iter().find(|i| i.sku == item.sku).unwrap();
        if bad.contains(&item.sku) {
            assert_eq!(got.qty, 0, "{}: left as the shop had it", item.sku);
        } else {
            assert_eq!(got, item);
            assert_eq!(sim.writes_for("shop", &item.sku), 1, "{}", item.sku);
        }
    }
    let mut q: Vec<(String, String)> = app
        .quarantine()
        .await
        .unwrap()
        .into_iter()
        .map(|q| (q.sku, q.reason))
        .collect();
    q.sort();
    assert_eq!(q.len(), 2, "{q:?}");
    for ((sku, reason), bad) in q.iter().zip(&bad) {
        assert_eq!(sku, bad);
        assert!(
            reason.contains("cannot be sold"),
            "the platform's message: {reason}"
        );
    }
    assert_clean_audit(&app).await;

    // Nothing changed: nothing sent.
    seed(db, &want).await;
    let before = sim.stats();
    let report = app.sync(&eps, &options(100), None).await.unwrap();
    assert_eq!(done(&report), 0, "{report:?}");
    assert_eq!(sim.stats().writes_applied, before.writes_applied);
    assert_eq!(sim.stats().lookups, before.lookups);

    // The shop renumbers its products, then three of them change: the mutation answers
    // ProductNotFound (by position) for exactly those, whose ids are looked up again in
    // one request; nothing else is looked up or written.
    sim.renumber("shop");
    let mut changed = want.clone();
    for i in [3, 150, 299] {
        changed[i].qty += 5;
    }
    seed(db, &changed).await;
    let before = sim.stats();
    let report = app.sync(&eps, &options(100), None).await.unwrap();
    assert_eq!(done(&report), 1, "{report:?}");
    let after = sim.stats();
    assert_eq!(after.writes_applied - before.writes_applied, 3, "{after:?}");
    assert_eq!(
        after.lookups - before.lookups,
        1,
        "one batched re-lookup: {after:?}"
    );
    let skus: Vec<Item> = [3, 150, 299].map(|i| changed[i].clone()).into();
    assert_eq!(shown(sim, "shop", &skus), normalized(skus.clone()));
    assert_clean_audit(&app).await;
    app.close().await;
}

#[test]
fn an_item_level_error_rule_needs_an_item_class() {
    let text = GQL_BATCH.replacen(
        "class = \"rejected\"\nsku = \"$.sku\"",
        "class = \"auth\"\nsku = \"$.sku\"",
        1,
    );
    assert_ne!(text, GQL_BATCH);
    let err = Profiles::from_toml_str(&text).unwrap_err().to_string();
    assert!(
        err.contains("gql_batch") && err.contains("errors[2].class") && err.contains("item-level"),
        "{err}"
    );
}
