//! Alert delivery: the `alerts` table is an outbox. Every alert is committed with what
//! raised it; a delivery task hands undelivered ones to an [`AlertSink`] (a webhook),
//! retrying with doubling delays, so a receiver that is down delays nothing but its own
//! alerts, and a crash loses none (a claimed alert is leased until its next attempt).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use crate::store::{AlertRow, Store, now_ms};

/// Where alerts go.
#[async_trait]
pub trait AlertSink: Send + Sync + 'static {
    /// Deliver one alert; `Err` (no secrets in it) means try again later.
    async fn deliver(&self, alert: &AlertRow) -> std::result::Result<(), String>;
}

/// How alerts are delivered.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// First retry delay; it doubles with each attempt (at most ten minutes).
    pub retry: Duration,
    /// Attempts per alert before it is given up.
    pub max_attempts: u32,
    /// Only alerts raised at or after this time (ms) are delivered: configuring a webhook
    /// does not replay years of history.
    pub since_ms: i64,
    /// How often to look for new alerts when there were none.
    pub poll: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            retry: Duration::from_secs(1),
            max_attempts: 10,
            since_ms: now_ms() - 24 * 3_600_000,
            poll: Duration::from_millis(500),
        }
    }
}

/// Deliver alerts until `stop` is set. Errors of the store are logged and retried.
pub async fn deliver_alerts(
    store: Arc<dyn Store>,
    sink: Arc<dyn AlertSink>,
    options: DeliveryOptions,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        // A claim holds its deliveries for `retry`; past that (less a quarter to spare)
        // another worker may claim them, so this one sends none of them any more: effect
        // fencing on the monotonic clock, as for workflows (a process resumed after a
        // pause stops at once).
        let claimed_at = std::time::Instant::now();
        let batch = store
            .claim_alert_deliveries(
                options.since_ms,
                options.retry.as_millis().max(1) as i64,
                i64::from(options.max_attempts),
                32,
            )
            .await;
        let alerts = match batch {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "reading alerts to deliver failed");
                Vec::new()
            }
        };
        if alerts.is_empty() {
            tokio::time::sleep(options.poll).await;
            continue;
        }
        for alert in alerts {
            // The store held it for min(10 min, retry × 2^(attempts − 1)).
            let shift = (alert.delivery_attempts - 1).clamp(0, 20) as u32;
            let held = (options.retry * (1u32 << shift)).min(Duration::from_secs(600));
            if claimed_at.elapsed() >= held - held / 4 {
                tracing::warn!(
                    alert = alert.id,
                    "alert claim ran out before delivery; leaving it to the next claim"
                );
                break;
            }
            let outcome = sink.deliver(&alert).await;
            match &outcome {
                Ok(()) => tracing::debug!(alert = alert.id, "alert delivered"),
                Err(e) if alert.delivery_attempts >= i64::from(options.max_attempts) => {
                    tracing::error!(alert = alert.id, attempts = alert.delivery_attempts, error = %e, "alert delivery given up")
                }
                Err(e) => {
                    tracing::warn!(alert = alert.id, attempt = alert.delivery_attempts, error = %e, "alert delivery failed; will retry")
                }
            }
            if let Err(e) = store.record_alert_delivery(alert.id, outcome).await {
                tracing::warn!(alert = alert.id, error = %e, "recording an alert delivery failed");
            }
        }
    }
}
