//! Circuit state survives a SIGKILL of the worker: `bulwark worker` with a sync schedule
//! trips a broken endpoint; the worker is killed while the circuit is open; after a
//! restart the endpoint is still skipped until its cooldown ends, and then one half-open
//! probe closes the circuit (the endpoint has healed meanwhile). Finally SIGTERM stops the
//! worker gracefully.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulwark_adapters::simulator::{self, Fault, SimConfig};
use bulwark_engine::{Backend, Store};
use bulwark_tests::{KillOnDrop, bulwark, run_ok};
use bulwark_workflows::endpoint_sync::{Event, State};

const BROKEN: &str = "ep-00003";

fn start_worker(config: &Path, log: &Path) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    KillOnDrop(
        bulwark()
            .args(["worker", "--config"])
            .arg(config)
            .env("BULWARK_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start bulwark worker"),
    )
}

async fn wait_for<T>(
    what: &str,
    secs: u64,
    log: &Path,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            panic!(
                "timed out waiting for {what}; worker log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (workflow id, Begin event, final state) of the broken endpoint's syncs, oldest first.
async fn broken_syncs(store: &dyn Store) -> Vec<(i64, Option<Event>, State)> {
    let mut out = Vec::new();
    for w in store.workflows(None, Some("endpoint_sync")).await.unwrap() {
        if w.subject != BROKEN || !w.terminal {
            continue;
        }
        let journal = store.journal(w.id).await.unwrap();
        let begin = journal
            .get(1)
            .and_then(|j| j.event_json.as_deref())
            .map(|e| serde_json::from_str(e).unwrap());
        out.push((w.id, begin, serde_json::from_str(&w.state_json).unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_circuit_survives_sigkill_and_a_probe_closes_it_once_healed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bulwark.db");
    let legacy = dir.path().join("legacy.db");
    let log = dir.path().join("worker.log");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", "250", "--path"])
            .arg(&legacy),
    );
    run_ok(
        bulwark()
            .arg("snapshot")
            .arg("--legacy")
            .arg(&legacy)
            .arg("--db")
            .arg(&db),
    );
    let sim = simulator::start(
        SimConfig {
            profiles: [(BROKEN.to_string(), Fault::Reject)].into(),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let endpoints: String = (1..=4)
        .map(|i| {
            let id = format!("ep-{i:05}");
            format!(
                "[[endpoint]]\nid = \"{id}\"\nadapter = \"rest\"\nsettings = {{ base_url = \"{}\" }}\n",
                sim.base_url(&id)
            )
        })
        .collect();
    let config = dir.path().join("bulwark.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"{}\"\n[sync]\nbatch_size = 100\nbackoff_base_ms = 10\nbackoff_max_ms = 50\n\
             cooldown_ms = 8000\nmax_cooldown_ms = 16000\n[schedule]\nsync = \"* * * * * *\"\n{endpoints}",
            db.display()
        ),
    )
    .unwrap();

    let mut worker = start_worker(&config, &log);
    let backend = Backend::open(&db.display().to_string()).await.unwrap();
    let store = backend.store();
    let circuit = wait_for("the broken endpoint to trip", 30, &log, async || {
        store
            .circuits()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.subject == BROKEN && c.open)
    })
    .await;
    // SIGKILL while the circuit is open; the endpoint heals while the worker is down.
    worker.0.kill().unwrap();
    worker.0.wait().unwrap();
    let killed_at = bulwark_engine::now_ms();
    assert!(
        killed_at < circuit.retry_at,
        "the cooldown outlasts the kill"
    );
    assert_eq!((circuit.failures, circuit.opens), (3, 1), "{circuit:?}");
    assert_eq!(sim.state().endpoint_report(BROKEN).await.deliveries, 3);
    sim.state().set_fault(BROKEN, Fault::Healthy);
    let before_restart = broken_syncs(store.as_ref()).await.len();

    let mut worker = start_worker(&config, &log);
    // Runs after the restart skip it while the circuit is open ...
    wait_for("a run that skips the open circuit", 30, &log, async || {
        let syncs = broken_syncs(store.as_ref()).await;
        syncs[before_restart..]
            .iter()
            .any(|(_, _, s)| matches!(s, State::Skipped { .. }))
            .then_some(())
    })
    .await;
    // ... and once the cooldown ends, one half-open probe closes it.
    // (The circuit closes with the probe's first verified batch; the probe's sync ends
    // Done after its last.)
    wait_for(
        "the probe to close the circuit and finish",
        40,
        &log,
        async || {
            let closed = store
                .circuits()
                .await
                .unwrap()
                .into_iter()
                .any(|c| c.subject == BROKEN && !c.open);
            let probed = broken_syncs(store.as_ref()).await[before_restart..]
                .iter()
                .any(|(_, _, s)| matches!(s, State::Done { .. }));
            (closed && probed).then_some(())
        },
    )
    .await;
    let syncs = broken_syncs(store.as_ref()).await;
    let after: Vec<_> = syncs[before_restart..].to_vec();
    for (id, begin, state) in &after {
        let Some(Event::Begin {
            at_ms,
            circuit_open,
            probe,
        }) = begin
        else {
            panic!("workflow {id} did not begin: {begin:?}")
        };
        if *at_ms < circuit.retry_at {
            assert!(
                *circuit_open && !probe,
                "workflow {id} began at {at_ms} < {}",
                circuit.retry_at
            );
            assert!(matches!(state, State::Skipped { .. }), "{id}: {state:?}");
        } else {
            assert!(!circuit_open, "{id}: the circuit was half-open, not open");
        }
    }
    let probes: Vec<_> = after
        .iter()
        .filter(|(_, b, _)| matches!(b, Some(Event::Begin { probe: true, .. })))
        .collect();
    assert_eq!(probes.len(), 1, "{after:?}");
    assert!(matches!(probes[0].2, State::Done { .. }), "{probes:?}");
    assert!(
        !after
            .iter()
            .any(|(_, _, s)| matches!(s, State::Tripped { .. })),
        "{after:?}"
    );
    // The healed endpoint got its three batches exactly once; the skipped runs sent nothing.
    let r = sim.state().endpoint_report(BROKEN).await;
    assert_eq!(
        r.applied_batches
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>(),
        [1, 1, 1]
    );
    assert_eq!(r.deliveries, 3 + 3, "{r:?}");
    let kinds: Vec<String> = store
        .alerts(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.subject == BROKEN)
        .map(|a| a.kind)
        .collect();
    assert_eq!(kinds, ["circuit_closed", "circuit_opened"], "newest first");

    // SIGTERM: a graceful stop, exit status 0.
    let pid = worker.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "worker did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status:?}\n{text}");
    assert!(text.contains("SIGTERM: stopping the worker"), "{text}");
    backend.close().await;
    sim.shutdown().await.unwrap();
}
