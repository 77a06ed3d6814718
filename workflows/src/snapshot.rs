//! Snapshots: the one gentle read of the legacy source. Pages through it by key, validates
//! every row, writes accepted items to staging and seals the snapshot with a content hash.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::catalog::{Item, PriceTier};
use crate::error::Result;
use crate::staging::Staging;

/// A row as the source returned it, before validation (values as text so that bad data can
/// be reported rather than crash the read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    /// The paging key (usually the SKU).
    pub key: String,
    /// SKU code.
    pub sku: Option<String>,
    /// Quantity as text.
    pub qty: Option<String>,
    /// Prices per tier as text (decimal, major units), in tier order.
    pub prices: Vec<Option<String>>,
    /// Why the source could not read this row's values (e.g. "column qty: bytes are not
    /// valid UTF-8 …"): the row is rejected with it, whatever the other fields hold.
    pub unreadable: Option<String>,
}

/// Longest text quoted whole in a reject reason or a row key; longer text is shortened.
pub const EXCERPT_CHARS: usize = 64;

/// `text` as it may appear in a reason or a reject's row key: whole when short, otherwise
/// its first [`EXCERPT_CHARS`] characters, its size and a hash prefix (so two long values
/// stay apart), never the whole value a second time.
pub fn excerpt(text: &str) -> String {
    // Control characters (a NUL cannot even be stored in PostgreSQL text) are escaped.
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    };
    let long = text.chars().nth(EXCERPT_CHARS).is_some();
    if !long {
        return if text.chars().any(char::is_control) {
            clean(text)
        } else {
            text.to_string()
        };
    }
    use sha2::Digest;
    let head: String = text.chars().take(EXCERPT_CHARS).collect();
    let hash = hex::encode(&sha2::Sha256::digest(text.as_bytes())[..4]);
    format!("{}… ({} bytes, sha256 {hash}…)", clean(&head), text.len())
}

/// [`excerpt`], quoted as Rust's `{:?}` would quote the whole.
fn quoted(text: &str) -> String {
    if text.chars().nth(EXCERPT_CHARS).is_none() {
        format!("{text:?}")
    } else {
        let head: String = text.chars().take(EXCERPT_CHARS).collect();
        let full = excerpt(text);
        let tail = full.rfind("… (").map_or("", |i| &full[i..]);
        format!("{head:?}{tail}")
    }
}

/// A read-only legacy catalog, read in pages ordered by key.
#[async_trait]
pub trait LegacySource: Send + Sync {
    /// A description for logs and the snapshot row (no credentials).
    fn describe(&self) -> String;
    /// Rows with key greater than `after`, ordered by key, at most `limit`.
    async fn page(&self, after: Option<&str>, limit: u32) -> Result<Vec<RawRow>>;
    /// Queries sent to the source so far.
    fn queries(&self) -> u64;
}

/// Snapshot settings.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Rows per page.
    pub page_size: u32,
    /// Pause between pages (keeps the load on the source low).
    pub pause: Duration,
    /// Minimum quantities of the price tiers, in tier order.
    pub tier_min_qty: Vec<u32>,
    /// Abort (and never sync) if more than this share of rows is rejected.
    pub max_rejected_share: f64,
    /// Hold (sync nothing until approved) a snapshot that changes too much.
    pub guard: crate::staging::ChangeGuard,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            page_size: 1000,
            pause: Duration::from_millis(0),
            tier_min_qty: vec![1, 10, 100],
            max_rejected_share: 0.05,
            guard: crate::staging::ChangeGuard::default(),
        }
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Snapshot id.
    pub id: i64,
    /// Rows read.
    pub rows_read: i64,
    /// Rows accepted.
    pub accepted: i64,
    /// Rows rejected.
    pub rejected: i64,
    /// Queries sent to the source.
    pub queries: u64,
    /// Wall time.
    pub seconds: f64,
    /// Content hash (sealed snapshots only).
    pub content_hash: Option<String>,
    /// Sealed (false: aborted for too many rejected rows).
    pub sealed: bool,
    /// Sealed but held for an operator's approval, and why.
    pub held: Option<String>,
    /// Rejected rows that kept their SKU's last accepted value.
    pub carried: u32,
}

/// Parse a decimal price in major units ("12.34") into minor units (1234).
pub fn parse_price(text: &str) -> std::result::Result<i64, String> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return Err(format!("price {} is not a non-negative decimal", quoted(t)));
    }
    if frac.len() > 2 && frac[2..].chars().any(|c| c != '0') {
        return Err(format!("price {} has more than 2 decimals", quoted(t)));
    }
    let cents = format!("{:0<2}", &frac[..frac.len().min(2)]);
    whole
        .parse::<i64>()
        .ok()
        .and_then(|w| w.checked_mul(100))
        .and_then(|w| w.checked_add(cents.parse::<i64>().unwrap_or(0)))
        .ok_or_else(|| format!("price {} is out of range", quoted(t)))
}

/// Validate one raw row.
pub fn validate(row: &RawRow, tier_min_qty: &[u32]) -> std::result::Result<Item, String> {
    if let Some(why) = &row.unreadable {
        return Err(why.clone());
    }
    let sku = row.sku.as_deref().map(str::trim).unwrap_or("");
    if sku.is_empty() {
        return Err("missing SKU".into());
    }
    if sku.chars().any(|c| c.is_control()) || sku.len() > 128 {
        return Err(format!(
            "invalid SKU text {} (control characters, or longer than 128 bytes)",
            quoted(sku)
        ));
    }
    let qty_text = row
        .qty
        .as_deref()
        .map(str::trim)
        .ok_or("missing quantity")?;
    let qty: i64 = qty_text
        .parse()
        .map_err(|_| format!("quantity {} is not an integer", quoted(qty_text)))?;
    if qty < 0 {
        return Err(format!("negative quantity {qty}"));
    }
    if row.prices.len() != tier_min_qty.len() {
        return Err(format!(
            "{} price tiers, expected {}",
            row.prices.len(),
            tier_min_qty.len()
        ));
    }
    let mut tiers = Vec::with_capacity(tier_min_qty.len());
    for (i, (p, min_qty)) in row.prices.iter().zip(tier_min_qty).enumerate() {
        let text = p
            .as_deref()
            .ok_or_else(|| format!("missing price for tier {}", i + 1))?;
        let price_minor = parse_price(text).map_err(|e| format!("tier {}: {e}", i + 1))?;
        tiers.push(PriceTier {
            min_qty: *min_qty,
            price_minor,
        });
    }
    Ok(Item {
        sku: sku.to_string(),
        qty,
        tiers,
    })
}

/// Take a snapshot of `source` into `staging`: page by key, validate, write, seal. A thin
/// wrapper over the journaled [`crate::snapshot_flow`] workflow with an always-open window:
/// it resumes this source's unfinished snapshot (after a crash) or starts a new one.
pub async fn take_snapshot(
    source: &dyn LegacySource,
    staging: &Staging,
    options: &SnapshotOptions,
) -> Result<SnapshotReport> {
    crate::snapshot_flow::run_snapshot(
        source,
        staging,
        options,
        &crate::snapshot_flow::FlowOptions::default(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(sku: &str, qty: &str, p: [&str; 3]) -> RawRow {
        RawRow {
            key: sku.into(),
            sku: Some(sku.into()),
            qty: Some(qty.into()),
            prices: p.iter().map(|s| Some(s.to_string())).collect(),
            unreadable: None,
        }
    }

    #[test]
    fn huge_values_are_quoted_as_excerpts() {
        let huge = "9".repeat(10 << 20);
        let r = validate(&raw("A", &huge, ["1", "1", "1"]), &[1, 10, 100]).unwrap_err();
        assert!(r.len() < 200, "{}", r.len());
        assert!(
            r.starts_with("quantity \"9999") && r.contains("10485760 bytes"),
            "{r}"
        );
        let r = validate(&raw(&huge, "1", ["1", "1", "1"]), &[1, 10, 100]).unwrap_err();
        assert!(r.len() < 250 && r.contains("invalid SKU text"), "{r}");
        assert_ne!(excerpt(&huge), excerpt(&format!("{huge}8")));
        assert_eq!(excerpt("SKU-1"), "SKU-1");
        assert_eq!(excerpt("A\u{0}B"), "A\\u{0}B");
        let mut row = raw("A", "1", ["1", "1", "1"]);
        row.unreadable = Some("column qty: bytes are not valid UTF-8".into());
        assert_eq!(
            validate(&row, &[1, 10, 100]).unwrap_err(),
            "column qty: bytes are not valid UTF-8"
        );
    }

    #[test]
    fn prices_parse_to_minor_units() {
        assert_eq!(parse_price("12.34"), Ok(1234));
        assert_eq!(parse_price("12.3"), Ok(1230));
        assert_eq!(parse_price("12"), Ok(1200));
        assert_eq!(parse_price("12.340"), Ok(1234));
        assert!(parse_price("-1").is_err());
        assert!(parse_price("abc").is_err());
        assert!(parse_price("1.234").is_err());
    }

    #[test]
    fn bad_rows_are_rejected_with_a_reason() {
        let tiers = [1, 10, 100];
        assert!(validate(&raw("A", "5", ["1.00", "0.90", "0.80"]), &tiers).is_ok());
        assert!(
            validate(&raw("A", "-5", ["1.00", "0.90", "0.80"]), &tiers)
                .unwrap_err()
                .contains("negative")
        );
        assert!(
            validate(&raw("A", "x", ["1.00", "0.90", "0.80"]), &tiers)
                .unwrap_err()
                .contains("not an integer")
        );
        assert!(
            validate(&raw("", "1", ["1.00", "0.90", "0.80"]), &tiers)
                .unwrap_err()
                .contains("SKU")
        );
        let mut r = raw("A", "1", ["1.00", "0.90", "0.80"]);
        r.prices[1] = None;
        assert!(validate(&r, &tiers).unwrap_err().contains("tier 2"));
    }
}
