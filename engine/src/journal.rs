//! The group-commit writer: many workflows' appends share one durable transaction.
//!
//! One fsync costs hundreds of microseconds; one transaction per transition would cap a
//! run at a few thousand transitions per second. The writer takes whatever appends are
//! queued (up to `max_batch`), commits them in one transaction, then acknowledges each
//! caller. Under load the queue refills while a commit is in flight, so batches grow with
//! concurrency and no timer is needed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::error::{EngineError, Result};
use crate::store::{Append, AppendOutcome, Store};

/// Group-commit settings.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Most appends in one transaction.
    pub max_batch: usize,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self { max_batch: 4096 }
    }
}

type Pending = (
    Append,
    oneshot::Sender<Result<AppendOutcome, Arc<EngineError>>>,
);

/// Counters kept by the writer.
#[derive(Debug, Default)]
pub struct JournalStats {
    /// Appends committed.
    pub committed: AtomicU64,
    /// Appends refused by fencing.
    pub fenced: AtomicU64,
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Time spent in commits, in microseconds.
    pub commit_micros: AtomicU64,
    /// Transactions that failed (their appends were refused with the error).
    pub failed_commits: AtomicU64,
    /// Workflows this process took over from a worker whose lease ran out (counted by the
    /// runtimes writing through this journal).
    pub takeovers: AtomicU64,
    /// Commits by latency: `commit_buckets[i]` counts the commits that took at most
    /// [`JournalStats::COMMIT_BUCKETS_MICROS`]`[i]` (not cumulative; the last counts the rest).
    pub commit_buckets: [AtomicU64; JournalStats::COMMIT_BUCKETS_MICROS.len() + 1],
}

impl JournalStats {
    /// Upper bounds of the commit-latency buckets, in microseconds.
    pub const COMMIT_BUCKETS_MICROS: [u64; 10] = [
        250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
    ];

    fn observe_commit(&self, micros: u64) {
        self.commit_micros.fetch_add(micros, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        let i = Self::COMMIT_BUCKETS_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(Self::COMMIT_BUCKETS_MICROS.len());
        self.commit_buckets[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Handle to the group-commit writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: mpsc::UnboundedSender<Pending>,
    stats: Arc<JournalStats>,
}

impl Journal {
    /// Start the writer task on the current tokio runtime.
    pub fn start(store: Arc<dyn Store>, config: JournalConfig) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Pending>();
        let stats = Arc::new(JournalStats::default());
        let st = stats.clone();
        tokio::spawn(async move {
            let mut batch: Vec<Pending> = Vec::with_capacity(config.max_batch);
            while rx.recv_many(&mut batch, config.max_batch).await > 0 {
                let appends: Vec<Append> = batch.iter().map(|(a, _)| a.clone()).collect();
                let t0 = std::time::Instant::now();
                let result = store.append_batch(&appends).await;
                st.observe_commit(t0.elapsed().as_micros() as u64);
                match result {
                    Ok(outcomes) => {
                        for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
                            match outcome {
                                AppendOutcome::Committed => {
                                    st.committed.fetch_add(1, Ordering::Relaxed)
                                }
                                AppendOutcome::Fenced => st.fenced.fetch_add(1, Ordering::Relaxed),
                            };
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                    Err(e) => {
                        st.failed_commits.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, appends = batch.len(), "journal commit failed");
                        let e = Arc::new(e);
                        for (_, reply) in batch.drain(..) {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx, stats }
    }

    /// Append durably; returns once committed (or refused).
    pub async fn append(&self, append: Append) -> Result<AppendOutcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((append, reply))
            .map_err(|_| EngineError::WriterGone)?;
        match rx.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(e)) => Err(EngineError::Other(format!("journal commit failed: {e}"))),
            Err(_) => Err(EngineError::WriterGone),
        }
    }

    /// Writer counters.
    pub fn stats(&self) -> &JournalStats {
        &self.stats
    }
}
