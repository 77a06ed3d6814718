//! Effect fencing, with the real binary on PostgreSQL (W4, short): three `bulwark worker`
//! processes sync a portal that has **no idempotency keys** (every write is applied and
//! recorded with its snapshot and arrival time). The worker holding the most leases is
//! SIGSTOPped mid-run for longer than its lease; the other two finish the run and a newer
//! snapshot's run; only then is it SIGCONTed. It must send nothing after that (its leases
//! ran out long ago), and every endpoint must show the newest snapshot's values. The same
//! again with SIGKILL. The ×10 loop is `bulwark bench --workload w4` (the benchmarks).

#[test]
fn a_worker_resumed_after_its_lease_sends_nothing() {
    let Some(base) = bulwark_tests::pg_url() else {
        return;
    };
    let out = bulwark_tests::run_ok(bulwark_tests::bulwark().args([
        "bench",
        "--workload",
        "w4",
        "--db",
        &base,
        "--runs",
        "1",
        "--signals",
        "STOP,KILL",
        "--lease-ms",
        "1000",
        "--endpoints",
        "40",
    ]));
    println!("{out}");
    for line in [
        "rounds: 2 rounds",
        "writes_after_lease_deadline: 0 writes",
        "stale_items: 0 items",
        // Three workers committing, renewing and taking over concurrently: row locks are
        // taken in one order, so the database never has to break a deadlock.
        "deadlocks: 0 lines",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // The stopped worker held leases when it was stopped, and its leases were taken
    // over (a round that never stopped anybody proves nothing).
    for round in out.lines().filter(|l| l.starts_with("round 0 ")) {
        assert!(!round.contains("held at signal 0,"), "{round}");
        assert!(!round.contains("takeover n/a"), "{round}");
        assert!(round.contains("audit clean"), "{round}");
        let writes: u64 = round
            .split("writes ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(writes > 0, "the portal saw no write: {round}");
    }
}
