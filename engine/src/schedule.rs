//! Cron schedules, persisted so that every worker on a database agrees on when one last
//! fired: each tick fires once in all (the store's compare-and-set decides which worker
//! fires it), and ticks missed while no worker ran collapse into one run at start.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::Result;
use crate::store::{Store, now_ms};

/// Parse a cron expression as schedules and snapshot windows read them: UTC, 5 fields
/// (minute first) or 6 with seconds first.
pub fn parse_cron(expr: &str) -> std::result::Result<croner::Cron, String> {
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| format!("bad cron expression {expr:?}: {e}"))
}

/// A named cron schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    name: String,
    cron: croner::Cron,
}

/// A boxed future, as schedule actions return.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Schedule {
    /// A schedule called `name` (its key in the store) firing at `expr`.
    pub fn new(name: &str, expr: &str) -> std::result::Result<Self, String> {
        Ok(Self {
            name: name.to_string(),
            cron: parse_cron(expr)?,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first tick strictly after `ms` (ms since the epoch), if there is one.
    pub fn next_after(&self, ms: i64) -> Option<i64> {
        let t = chrono::DateTime::from_timestamp_millis(ms)?;
        self.cron
            .find_next_occurrence(&t, false)
            .ok()
            .map(|n| n.timestamp_millis())
    }

    /// Whether this schedule fires now (at `now` ms), claiming the tick if so: a tick
    /// has passed since the one it last fired at (however many passed, it fires once).
    /// The first time a schedule is seen, `now` becomes its baseline and nothing fires.
    pub async fn claim_due(&self, store: &dyn Store, now: i64) -> Result<bool> {
        match store.schedule_tick(&self.name).await? {
            None => {
                store.advance_schedule(&self.name, None, now).await?;
                Ok(false)
            }
            Some(last) => match self.next_after(last) {
                Some(next) if next <= now => {
                    store.advance_schedule(&self.name, Some(last), now).await
                }
                _ => Ok(false),
            },
        }
    }
}

/// Run `schedules` until `stop` is set: each due tick calls `fire(name)` in its own task.
/// A schedule whose previous run is still going skips the tick (and says so).
pub async fn run_schedules<F>(
    store: Arc<dyn Store>,
    schedules: Vec<Schedule>,
    fire: F,
    stop: Arc<AtomicBool>,
) where
    F: Fn(String) -> BoxFuture + Send + Sync + 'static,
{
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let now = now_ms();
        for s in &schedules {
            match s.claim_due(store.as_ref(), now).await {
                Ok(true) => {
                    if running.get(s.name()).is_some_and(|h| !h.is_finished()) {
                        tracing::warn!(
                            schedule = s.name(),
                            "tick skipped: the previous run is still going"
                        );
                        continue;
                    }
                    tracing::info!(schedule = s.name(), "schedule fired");
                    running.insert(
                        s.name().to_string(),
                        tokio::spawn(fire(s.name().to_string())),
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(schedule = s.name(), error = %e, "schedule check failed"),
            }
        }
        // Sleep until the next tick of any schedule, but look at the stop flag (and at
        // ticks claimed by other workers' clocks) at least every second.
        let next = schedules
            .iter()
            .filter_map(|s| s.next_after(now))
            .min()
            .unwrap_or(now + 1_000);
        let wait = (next - now_ms()).clamp(10, 1_000);
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    for (_, h) in running {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_expressions_are_refused_and_seconds_are_optional() {
        assert!(parse_cron("every tuesday").is_err());
        assert!(parse_cron("0 2 * * *").is_ok());
        let s = Schedule::new("x", "*/10 * * * * *").unwrap();
        // 2026-01-01T00:00:03Z → the next tick is at :10.
        let t = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:03Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(s.next_after(t), Some(t + 7_000));
    }

    #[tokio::test]
    async fn missed_ticks_fire_once_and_the_first_sight_is_a_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::SqliteStore::open(dir.path().join("s.db"))
            .await
            .unwrap();
        let s = Schedule::new("sync", "0 * * * *").unwrap(); // hourly
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:30:00Z")
            .unwrap()
            .timestamp_millis();
        let hour = 3_600_000;
        assert!(!s.claim_due(&store, t0).await.unwrap(), "baseline only");
        assert!(
            !s.claim_due(&store, t0 + 60_000).await.unwrap(),
            "no tick passed"
        );
        // Down for five hours: five ticks missed, one run.
        let later = t0 + 5 * hour;
        assert!(s.claim_due(&store, later).await.unwrap());
        assert!(!s.claim_due(&store, later).await.unwrap());
        assert!(!s.claim_due(&store, later + 1_000).await.unwrap());
        // The next tick fires again.
        assert!(s.claim_due(&store, later + hour).await.unwrap());
    }
}
