//! [`WebhookSink`]: alerts POSTed as JSON to a URL (an [`AlertSink`] for the engine's
//! delivery task).
//!
//! The body is one alert:
//!
//! ```json
//! {"id": 12, "at_ms": 1764614400000, "at": "2025-12-01T18:40:00Z", "kind": "circuit_opened",
//!  "level": "error", "subject": "ep-00042", "workflow": 815, "message": "…", "attempt": 1}
//! ```
//!
//! Any 2xx answer is a delivery; anything else (or no answer within the timeout) is
//! retried later. Receivers should de-duplicate by `id`: delivery is at-least-once.
//! The URL may carry a token, so it never appears in errors or logs.

use std::time::Duration;

use async_trait::async_trait;
use bulwark_engine::AlertRow;
use bulwark_engine::alerts::AlertSink;

use crate::transport::TransportSettings;

/// POSTs alerts to a webhook URL.
pub struct WebhookSink {
    client: reqwest::Client,
    url: String,
}

impl std::fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &"<redacted>")
            .finish()
    }
}

impl WebhookSink {
    /// A sink posting to `url`, giving up on each request after `timeout`; https is
    /// verified against the platform's roots (or `SSL_CERT_FILE`).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Self::with_transport(url, timeout, &TransportSettings::default())
    }

    /// Like [`WebhookSink::new`], reaching the receiver with `transport` (an extra
    /// `ca_file`, a client certificate, a proxy). Certificate files are read now: a bad
    /// one fails here, not at the first alert.
    pub fn with_transport(
        url: &str,
        timeout: Duration,
        transport: &TransportSettings,
    ) -> Result<Self, String> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err("the webhook URL must start with http:// or https://".into());
        }
        let client = crate::transport::build_client(transport, Some(timeout))
            .map_err(|e| format!("webhook: {e}"))?;
        Ok(Self {
            client,
            url: url.to_string(),
        })
    }
}

#[async_trait]
impl AlertSink for WebhookSink {
    async fn deliver(&self, alert: &AlertRow) -> Result<(), String> {
        let body = serde_json::json!({
            "id": alert.id,
            "at_ms": alert.at,
            "at": rfc3339(alert.at),
            "kind": alert.kind,
            "level": alert.level,
            "subject": alert.subject,
            "workflow": alert.workflow,
            "message": alert.message,
            "attempt": alert.delivery_attempts,
        });
        let resp = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                let e = e.without_url();
                let failure = crate::transport::describe_send_error(&e);
                if failure.certificate {
                    format!("webhook TLS certificate problem: {}", failure.detail)
                } else if e.is_timeout() {
                    "webhook timed out".to_string()
                } else if e.is_connect() {
                    "webhook unreachable (connection failed)".to_string()
                } else {
                    format!("webhook request failed: {e}")
                }
            })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered HTTP {}", resp.status().as_u16()))
        }
    }
}

/// RFC 3339 (UTC, seconds) of a millisecond timestamp.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_764_614_400_000), "2025-12-01T18:40:00Z");
    }
}
