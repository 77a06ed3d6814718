//! The operator commands' output on a small fixture database, plain and `--json`: what
//! they print agrees with the database, and every plain line fits an 80-column terminal.
//!
//! The fixture: a 60-SKU legacy database, snapshotted; a sync of 4 simulated endpoints of
//! which one (ep-00002) stores wrong values and trips; then a second run, planned but not
//! driven, for ep-00002 (never confirmed) and a new ep-00005.

use std::path::Path;
use std::process::Output;

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_tests::{bulwark, run_code, run_ok};
use bulwark_workflows::adapter::EndpointConfig;
use bulwark_workflows::app::Bulwark;
use bulwark_workflows::sync::SyncOptions;
use serde_json::Value;

/// Require every line of `out` (of `bulwark ARGS`) to fit 80 columns.
fn fits(args: &[&str], out: &str) {
    for line in out.lines() {
        assert!(
            line.chars().count() <= 80,
            "`bulwark {}`: a line of {} columns:\n{line}\n\n{out}",
            args.join(" "),
            line.chars().count()
        );
    }
}

/// Run `bulwark ARGS --db DB`, require success, check the width of every line, and return
/// standard output.
fn show(args: &[&str], db: &Path) -> String {
    let out = run_ok(bulwark().args(args).arg("--db").arg(db));
    if !args.contains(&"--json") {
        fits(args, &out);
    }
    out
}

fn json(args: &[&str], db: &Path) -> Value {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let out = show(&args, db);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("`bulwark {args:?}`: {e}:\n{out}"))
}

fn failing(args: &[&str], db: &Path) -> Output {
    let out = bulwark().args(args).arg("--db").arg(db).output().unwrap();
    assert!(!out.status.success(), "`bulwark {args:?}` succeeded");
    out
}

fn endpoints(portal: &str, n: u32) -> Vec<EndpointConfig> {
    (1..=n)
        .map(|i| {
            let id = format!("ep-{i:05}");
            EndpointConfig {
                settings: [("base_url".to_string(), format!("{portal}/ep/{id}"))].into(),
                adapter: "rest".into(),
                id,
                ..Default::default()
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_print_what_the_database_holds() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let snap = bulwark_tests::legacy_snapshot(dir.path(), 60, &db);
    assert!(
        snap.starts_with("snapshot 1: 60 rows read, 60 accepted, 0 rejected"),
        "{snap}"
    );
    assert!(
        snap.contains("\n  1 queries sent to the source\n"),
        "{snap}"
    );
    fits(&["snapshot"], &snap);
    let sim = simulator::start(
        SimConfig {
            profiles: [("ep-00002".to_string(), Fault::Corrupt)].into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let portal = format!("http://{}", sim.addr());
    let sync_args = ["--portal-url", &portal, "--batch-size", "25"];
    // A run that tripped an endpoint finished with work undone: status 1.
    let synced = run_code(
        bulwark()
            .args(["sync", "--endpoints", "4"])
            .args(sync_args)
            .arg("--db")
            .arg(&db),
        1,
    );
    assert!(
        synced.contains("run 2: snapshot 1, 4 endpoint(s) to sync"),
        "{synced}"
    );
    assert!(synced.contains("3 done, 1 tripped"), "{synced}");
    assert!(
        synced.contains("\n  12 batches, 240 items planned\n"),
        "{synced}"
    );
    fits(&["sync"], &synced);
    // A second run, planned and left for a worker.
    let app = Bulwark::open(&db, bulwark_adapters::default_registry())
        .await
        .unwrap();
    let options = SyncOptions {
        batch_size: 25,
        ..Default::default()
    };
    let plan = app
        .enqueue(&endpoints(&portal, 5), &options)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((plan.run, plan.workflows, plan.up_to_date), (Some(3), 2, 3));
    let store = app.store();

    // status
    let status = show(&["status"], &db);
    assert!(
        status.starts_with("last snapshot: 1 (sealed 20"),
        "{status}"
    );
    assert!(
        status.contains("60 rows read, 60 accepted, 0 rejected; 1 queries to the source"),
        "{status}"
    );
    let journal_rows = store.journal_len().await.unwrap();
    assert!(
        status.contains(&format!("journal rows: {journal_rows}, recent alerts: 2")),
        "{status}"
    );
    let status_json = json(&["status"], &db);
    assert_eq!(status_json["journal_rows"], journal_rows);
    assert_eq!(status_json["last_snapshot"]["rows_accepted"], 60);

    // runs
    let runs = show(&["runs"], &db);
    let lines: Vec<&str> = runs.lines().collect();
    assert_eq!(lines.len(), 4, "{runs}");
    assert!(
        lines[0].contains("run  kind     status    created"),
        "{runs}"
    );
    assert!(lines[1].starts_with("    3  sync     running"), "{runs}");
    assert!(lines[1].ends_with("Pending=2"), "{runs}");
    assert!(lines[2].starts_with("    2  sync     finished"), "{runs}");
    assert!(lines[2].ends_with("Done=3 Tripped=1"), "{runs}");
    assert!(lines[3].starts_with("    1  snapshot finished"), "{runs}");
    let runs_json = json(&["runs"], &db);
    let stored = store.runs().await.unwrap();
    assert_eq!(runs_json.as_array().unwrap().len(), stored.len());
    for (shown, r) in runs_json.as_array().unwrap().iter().zip(&stored) {
        assert_eq!(
            (shown["id"].as_i64(), shown["status"].as_str()),
            (Some(r.id), Some(r.status.as_str()))
        );
    }
    assert_eq!(runs_json[1]["states"]["Done"], 3);
    // Only the newest, with the rest counted.
    let newest = show(&["runs", "--limit", "1"], &db);
    let lines: Vec<&str> = newest.lines().collect();
    assert_eq!(lines.len(), 3, "{newest}");
    assert!(lines[1].starts_with("    3  sync     running"), "{newest}");
    assert_eq!(
        lines[2],
        "  … and 2 older run(s) (`bulwark runs` lists them)"
    );
    let limited = json(&["status", "--limit", "2"], &db);
    assert_eq!(
        limited["runs"].as_array().map(Vec::len),
        Some(2),
        "{limited}"
    );
    assert_eq!(limited["runs_total"], 3, "{limited}");
    assert_eq!(status_json["runs_total"], 3, "{status_json}");

    // run
    let run = show(&["run", "2"], &db);
    assert!(
        run.starts_with("run 2 (sync) finished: Done=3 Tripped=1"),
        "{run}"
    );
    assert!(
        run.contains("ep-00002             2 Tripped    batch 0: verify:"),
        "{run}"
    );
    let run_json = json(&["run", "2"], &db);
    assert_eq!(run_json["states"]["Tripped"], 1);
    assert_eq!(run_json["not_done"].as_array().unwrap().len(), 1);
    assert_eq!(run_json["not_done"][0]["endpoint"], "ep-00002");
    let no_run = failing(&["run", "99"], &db);
    assert!(String::from_utf8_lossy(&no_run.stderr).contains("no run 99"));

    // endpoints
    let all = show(&["endpoints"], &db);
    assert_eq!(all.lines().count(), 6, "{all}");
    assert!(all.contains("ep-00005             3 Pending"), "{all}");
    assert!(
        all.contains("ep-00001             2 Done       3 batches, 60 items"),
        "{all}"
    );
    let all_json = json(&["endpoints"], &db);
    let latest: Vec<(String, String)> = all_json
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["endpoint"].as_str().unwrap().into(),
                e["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expect = |id: &str, state: &str| (id.to_string(), state.to_string());
    assert_eq!(
        latest,
        [
            expect("ep-00001", "Done"),
            expect("ep-00002", "Pending"),
            expect("ep-00003", "Done"),
            expect("ep-00004", "Done"),
            expect("ep-00005", "Pending"),
        ]
    );
    let done = show(&["endpoints", "--state", "Done"], &db);
    assert_eq!(done.lines().count(), 4, "{done}");
    let tripped = json(&["endpoints", "--tripped"], &db);
    assert_eq!(tripped.as_array().unwrap().len(), 1, "{tripped}");
    assert_eq!(tripped[0]["endpoint"], "ep-00002");

    // endpoint
    let one = show(&["endpoint", "ep-00002"], &db);
    assert!(
        one.starts_with("endpoint ep-00002: circuit open\n  opened 20"),
        "{one}"
    );
    assert!(
        one.contains(" after 3 failure(s), opening #1\n  probe from 20"),
        "{one}"
    );
    assert!(one.contains("    2 Tripped"), "{one}");
    assert!(one.contains("    3 Pending"), "{one}");
    let one_json = json(&["endpoint", "ep-00002"], &db);
    assert_eq!(one_json["circuit"]["state"], "open", "{one_json}");
    assert_eq!(
        one_json["runs"].as_array().map(Vec::len),
        Some(2),
        "{one_json}"
    );
    let never = failing(&["endpoint", "ep-09999"], &db);
    assert!(String::from_utf8_lossy(&never.stderr).contains("ep-09999"));

    // alerts: a header line each, the message wrapped under it.
    let alerts = show(&["alerts"], &db);
    let headers: Vec<&str> = alerts.lines().filter(|l| !l.starts_with("    ")).collect();
    assert_eq!(headers.len(), 2, "{alerts}");
    assert!(
        headers[0].contains(" warn  run_tripped       run:2"),
        "{alerts}"
    );
    assert!(
        headers[1].contains(" error circuit_opened    ep-00002"),
        "{alerts}"
    );
    assert!(
        alerts.contains("    circuit of ep-00002 opened after 3 consecutive failed"),
        "{alerts}"
    );
    let alerts_json = json(&["alerts"], &db);
    let stored = store.alerts(50).await.unwrap();
    assert_eq!(alerts_json.as_array().unwrap().len(), stored.len());
    assert_eq!(alerts_json[1]["message"], stored[1].message.as_str());
    assert!(
        stored[1].message.chars().count() > 3 * 76,
        "the message is wrapped and cut"
    );

    // audit
    let audit = show(&["audit"], &db);
    assert!(
        audit.starts_with("audited 7 workflows (6 endpoint_sync, 1 snapshot)"),
        "{audit}"
    );
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
    let audit_json = json(&["audit"], &db);
    assert_eq!(audit_json["workflows"], 7);
    assert_eq!(audit_json["by_kind"]["snapshot"], 1);
    assert_eq!(audit_json["findings"].as_array().map(Vec::len), Some(0));

    // reset-circuit
    let reset = json(&["reset-circuit", "ep-00002"], &db);
    assert_eq!(
        reset,
        serde_json::json!({ "endpoint": "ep-00002", "closed": true, "known": true })
    );
    let again = show(&["reset-circuit", "ep-00002"], &db);
    assert_eq!(again.trim(), "circuit of ep-00002 was not open");
    // A typo is not a closed circuit.
    let typo = failing(&["reset-circuit", "ep-0002"], &db);
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("endpoint \"ep-0002\" is unknown here"),
        "{typo:?}"
    );
    // A state that does not exist is a usage error naming the valid ones; any case works.
    let bogus = failing(&["endpoints", "--state", "Bogus"], &db);
    let err = String::from_utf8_lossy(&bogus.stderr);
    assert_eq!(bogus.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Bogus") && err.contains("Tripped") && err.contains("Pending"),
        "{err}"
    );
    assert_eq!(
        show(&["endpoints", "--state", "dOnE"], &db).lines().count(),
        4
    );

    // cancel
    let cancelled = json(&["cancel", "3"], &db);
    assert_eq!(cancelled["cancelled"], 2, "{cancelled}");
    assert_eq!(cancelled["finished"], true, "{cancelled}");
    let twice = failing(&["cancel", "3"], &db);
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("run 3 is already cancelled"),
        "{twice:?}"
    );
    let not_sync = failing(&["cancel", "1"], &db);
    assert!(String::from_utf8_lossy(&not_sync.stderr).contains("run 1 is a snapshot run"));
    assert!(show(&["runs"], &db).contains("    3  sync     cancelled"));

    // replay: nothing left to resume, and no new run.
    let replay = show(
        &["replay", "--endpoints", "5", "--portal-url", &portal],
        &db,
    );
    assert!(replay.contains("nothing"), "{replay}");
    assert_eq!(store.runs().await.unwrap().len(), 3);

    app.close().await;
    sim.shutdown().await.unwrap();
}

/// `bulwark bench` prints its figures as `name: value unit` lines.
#[test]
fn bench_prints_figures_as_name_value_unit_lines() {
    let out = run_ok(bulwark().args(["bench", "--endpoints", "40", "--batches", "2"]));
    fits(&["bench"], &out);
    let figure = |name: &str| -> (f64, String) {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{out}"));
        let (value, unit) = line.split_once(' ').unwrap_or((line, ""));
        (value.parse().unwrap(), unit.to_string())
    };
    // 40 endpoints × 2 batches, each an upload and a verify step.
    assert_eq!(figure("durable_steps"), (160.0, "steps".into()));
    assert_eq!(figure("sink_applied"), (80.0, "batches".into()));
    assert_eq!(figure("sink_duplicates"), (0.0, "batches".into()));
    let (rate, unit) = figure("transitions_per_second");
    assert!(rate > 0.0 && unit == "transitions/s", "{out}");
}

#[test]
fn a_closed_standard_output_ends_the_program_quietly() {
    // `bulwark … | head` closes the pipe before bulwark writes: no panic, no backtrace,
    // the exit status of a tool killed by SIGPIPE (141), nothing on stderr.
    let dir = tempfile::tempdir().unwrap();
    let mut child = bulwark()
        .args(["generate-legacy", "--skus", "20", "--path"])
        .arg(dir.path().join("legacy.db"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

/// Logs on a stderr that is not a terminal (a file, a pipe, a collector) carry no colour
/// escape codes.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = bulwark()
        .env("BULWARK_LOG", "debug")
        .args(["generate-legacy", "--skus", "10", "--path"])
        .arg(dir.path().join("legacy.db"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG"), "no log lines to look at: {err}");
    assert!(!err.contains('\u{1b}'), "colour codes in piped logs: {err}");
}
