//! One source of truth for every command: `--config FILE` (or `BULWARK_CONFIG`) names the
//! database (relative to the file, whatever the working directory) for the read and
//! operator commands as it does for `sync`, `snapshot` reads the file's `[source]`, and a
//! command that only reads never creates a database. Also the exit statuses of `sync`:
//! 1 when work was left undone (nothing to sync from, an endpoint tripped or skipped), 0
//! when everything was done.

use std::path::Path;

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_tests::{bulwark, run_code, run_ok};

fn config(portal: &str, endpoints: &[&str]) -> String {
    let mut toml = String::from(
        "database = \"data/b.db\"\n\n[source]\nurl = \"legacy.db\"\npage_size = 7\n\n",
    );
    for id in endpoints {
        toml.push_str(&format!(
            "[[endpoint]]\nid = \"{id}\"\nadapter = \"rest\"\nsettings = {{ base_url = \"{portal}/ep/{id}\" }}\n\n"
        ));
    }
    toml
}

/// `bulwark ARGS --config CFG` run from `cwd`, requiring exit status `code`.
fn with_config(cwd: &Path, args: &[&str], cfg: &Path, code: i32) -> String {
    run_code(
        bulwark()
            .current_dir(cwd)
            .env_remove("BULWARK_DB")
            .env_remove("BULWARK_CONFIG")
            .args(args)
            .arg("--config")
            .arg(cfg),
        code,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_uses_the_database_of_its_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = dir.path().join("cfg");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", "30", "--path"])
            .arg(cfg_dir.join("legacy.db")),
    );
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
    let cfg = cfg_dir.join("bulwark.toml");
    std::fs::write(&cfg, config(&portal, &["ep-00001", "ep-00002"])).unwrap();
    let clean = cfg_dir.join("clean.toml");
    std::fs::write(&clean, config(&portal, &["ep-00001"])).unwrap();
    let cwd = elsewhere.as_path();

    let checked = with_config(cwd, &["check-config"], &cfg, 0);
    assert!(checked.contains("valid; 2 endpoint(s)"), "{checked}");

    // Nothing to sync from yet: the run did nothing, and says so with status 1.
    let early = with_config(cwd, &["sync"], &cfg, 1);
    assert!(early.contains("no sealed snapshot yet"), "{early}");

    // `snapshot --config` reads `[source]` (its path relative to the file, its page size).
    let snap = with_config(cwd, &["snapshot"], &cfg, 0);
    assert!(snap.contains("30 rows read, 30 accepted"), "{snap}");
    assert!(snap.contains("5 queries sent to the source"), "{snap}");
    assert!(cfg_dir.join("data/b.db").exists());

    // ep-00002 stores wrong values and trips: finished with work undone, status 1.
    let synced = with_config(cwd, &["sync"], &cfg, 1);
    assert!(synced.contains("1 done, 1 tripped"), "{synced}");
    let run: String = synced
        .lines()
        .find_map(|l| l.strip_prefix("run "))
        .and_then(|l| l.split(':').next())
        .unwrap_or_else(|| panic!("{synced}"))
        .to_string();

    // Every command that reads or operates finds that database through the file.
    let status = with_config(cwd, &["status"], &cfg, 0);
    assert!(status.contains("last snapshot: 1"), "{status}");
    let runs = with_config(cwd, &["runs"], &cfg, 0);
    assert!(runs.contains("snapshot") && runs.contains("sync"), "{runs}");
    let one = with_config(cwd, &["run", &run], &cfg, 0);
    assert!(one.contains("ep-00002"), "{one}");
    let endpoints = with_config(cwd, &["endpoints", "--tripped"], &cfg, 0);
    assert!(endpoints.contains("ep-00002"), "{endpoints}");
    assert!(!endpoints.contains("ep-00001"), "{endpoints}");
    let history = with_config(cwd, &["endpoint", "ep-00001"], &cfg, 0);
    assert!(history.contains("Done"), "{history}");
    let alerts = with_config(cwd, &["alerts"], &cfg, 0);
    assert!(alerts.contains("ep-00002"), "{alerts}");
    let audit = with_config(cwd, &["audit"], &cfg, 0);
    assert!(audit.contains(": 0 finding(s)"), "{audit}");
    let quarantine = with_config(cwd, &["quarantine", "--json"], &cfg, 0);
    assert_eq!(quarantine.trim(), "[]");
    let migrate = with_config(cwd, &["migrate"], &cfg, 0);
    assert!(
        migrate.contains(&cfg_dir.join("data/b.db").display().to_string()),
        "{migrate}"
    );
    let approve = with_config(cwd, &["snapshot", "approve", "1"], &cfg, 1);
    assert!(approve.is_empty(), "{approve}");
    // The environment variable works as the flag does.
    let by_env = run_ok(
        bulwark()
            .current_dir(cwd)
            .env_remove("BULWARK_DB")
            .env("BULWARK_CONFIG", &cfg)
            .args(["status", "--json"]),
    );
    assert!(by_env.contains("\"snapshot\""), "{by_env}");

    // The circuit is still open: the next sync skips ep-00002, still status 1.
    let skipped = with_config(cwd, &["sync", "--json"], &cfg, 1);
    let skipped: serde_json::Value =
        serde_json::from_str(&skipped).unwrap_or_else(|e| panic!("{e}: {skipped}"));
    assert_eq!(skipped["by_status"]["Skipped"], 1, "{skipped}");
    assert_eq!(skipped["quarantined"], 0, "{skipped}");
    let reset = with_config(cwd, &["reset-circuit", "ep-00002"], &cfg, 0);
    assert!(reset.contains("ep-00002"), "{reset}");
    let unknown = with_config(cwd, &["reset-circuit", "ep-09999"], &cfg, 1);
    assert!(unknown.is_empty(), "{unknown}");
    // Everything done for the endpoints of this file: status 0.
    let done = with_config(cwd, &["sync"], &clean, 0);
    assert!(done.contains("already up to date"), "{done}");

    // --since: a span or a date; what is older is left out.
    let recent = with_config(cwd, &["runs", "--since", "1h", "--json"], &cfg, 0);
    let recent: serde_json::Value = serde_json::from_str(&recent).unwrap();
    assert!(recent.as_array().unwrap().len() >= 3, "{recent}");
    let future = with_config(cwd, &["runs", "--since", "2099-01-01", "--json"], &cfg, 0);
    assert_eq!(future.trim(), "[]");
    let alerts_now = with_config(cwd, &["alerts", "--since", "10m", "--json"], &cfg, 0);
    assert!(alerts_now.contains("circuit_opened"), "{alerts_now}");
    let alerts_later = with_config(
        cwd,
        &["alerts", "--since", "2099-01-01T00:00:00Z", "--json"],
        &cfg,
        0,
    );
    assert_eq!(alerts_later.trim(), "[]");
    let status = with_config(cwd, &["status", "--since", "2099-01-01", "--json"], &cfg, 0);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["runs"].as_array().map(Vec::len), Some(0), "{status}");
    let bogus = bulwark()
        .current_dir(cwd)
        .args(["runs", "--since", "yesterday", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(bogus.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bogus.stderr).contains("neither a span"));
    // `snapshot --json`: the report as JSON.
    let again = with_config(cwd, &["snapshot", "--json"], &cfg, 0);
    let again: serde_json::Value =
        serde_json::from_str(&again).unwrap_or_else(|e| panic!("{e}: {again}"));
    assert_eq!(again["rows_read"], 30, "{again}");

    // Nothing was created where the commands ran.
    assert_eq!(std::fs::read_dir(cwd).unwrap().count(), 0);

    // A command that only reads never creates the database it is pointed at.
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    for (missing, args) in [
        (dir.path().join("nowhere/b.db"), ["status"]),
        (dir.path().join("nowhere/b.db"), ["runs"]),
        (dir.path().join("empty/b.db"), ["alerts"]),
        (dir.path().join("empty/b.db"), ["audit"]),
        (dir.path().join("empty/b.db"), ["endpoints"]),
    ] {
        let out = bulwark()
            .current_dir(cwd)
            .args(args)
            .arg("--db")
            .arg(&missing)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(
            err.contains(&missing.display().to_string()),
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("no database at").count(), 1, "said once: {err}");
        assert!(!missing.exists(), "{args:?} created it");
        assert!(
            !dir.path().join("nowhere").exists(),
            "{args:?} created a folder"
        );
    }
    sim.shutdown().await.unwrap();
}

/// Shell completions and manual pages come from the same definition as `--help`.
#[test]
fn completions_and_manual_pages_cover_every_command() {
    let bash = run_ok(bulwark().args(["completions", "bash"]));
    for word in ["reset-circuit", "quarantine", "--config", "--portal-url"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    // The script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bulwark.bash");
    std::fs::write(&script, &bash).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let zsh = run_ok(bulwark().args(["completions", "zsh"]));
    assert!(
        zsh.starts_with("#compdef bulwark"),
        "{}",
        &zsh[..80.min(zsh.len())]
    );
    let bad = bulwark().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let pages = dir.path().join("man");
    run_ok(bulwark().args(["man", "--dir"]).arg(&pages));
    for page in [
        "bulwark.1",
        "bulwark-sync.1",
        "bulwark-reset-circuit.1",
        "bulwark-snapshot-approve.1",
    ] {
        let text =
            std::fs::read_to_string(pages.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a manual page");
    }
    let main = run_ok(bulwark().arg("man"));
    assert!(
        main.contains("BULWARK_LOG_FORMAT"),
        "the page documents the environment"
    );
    // --help keeps the demo flags of production commands apart, and names the environment.
    let help = run_ok(bulwark().args(["sync", "--help"]));
    let demo = help.find("Simulated endpoints").expect("a demo heading");
    assert!(help.find("--portal-url").unwrap() > demo, "{help}");
    assert!(help.find("--config").unwrap() < demo, "{help}");
    assert!(run_ok(bulwark().arg("--help")).contains("BULWARK_LOG"));
}
