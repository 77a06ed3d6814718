//! The catalog model: SKUs with a quantity and wholesale price tiers, and batches of them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// One wholesale price tier: the unit price (in minor units, e.g. cents) that applies from
/// `min_qty` units upwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct PriceTier {
    /// Smallest order quantity this tier applies to.
    pub min_qty: u32,
    /// Unit price in minor currency units (cents).
    pub price_minor: i64,
}

/// The absolute values an endpoint must show for one SKU. Batches always carry absolute
/// values, never deltas, so a repeated write is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct Item {
    /// The SKU code.
    pub sku: String,
    /// Units in stock.
    pub qty: i64,
    /// Price tiers, ordered by `min_qty`.
    pub tiers: Vec<PriceTier>,
}

/// A chunk of items for one endpoint, identified by its index in the run's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Endpoint this batch is for.
    pub endpoint: String,
    /// Sealed snapshot the values come from.
    pub snapshot: i64,
    /// Index of the batch within the endpoint's plan.
    pub index: u32,
    /// Stable idempotency key of this batch (see [`batch_key`]).
    pub key: Uuid,
    /// Items, sorted by SKU.
    pub items: Vec<Item>,
    /// Set when `items` is what remains of the batch after an earlier attempt settled
    /// some of its items (same `key`: per-item idempotency keys derived from it stay the
    /// same). A whole-request idempotency key must then come from
    /// [`Batch::request_key`], since the request carries other content than the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub remainder: bool,
}

impl Batch {
    /// The idempotency key of this request as a whole: `key` for a full batch; for a
    /// remainder, a key derived from `key` and the SKUs it carries (stable on replay).
    pub fn request_key(&self) -> Uuid {
        if !self.remainder {
            return self.key;
        }
        let mut name = String::from("remainder");
        for item in &self.items {
            name.push('\u{1f}');
            name.push_str(&item.sku);
        }
        Uuid::new_v5(&self.key, name.as_bytes())
    }
}

/// Namespace for Bulwark's uuid v5 idempotency keys.
pub const KEY_NAMESPACE: Uuid = Uuid::from_u128(0x6b75_6c77_6172_6b00_8000_0000_0000_0001);

/// Content hash of a batch payload (hex SHA-256 of its canonical JSON).
pub fn payload_hash(items: &[Item]) -> String {
    let json = serde_json::to_vec(items).expect("items serialise");
    hex::encode(Sha256::digest(&json))
}

/// The stable idempotency key of a batch: uuid v5 of endpoint, snapshot, batch index,
/// payload hash and resend generation. The same on every replay; different whenever the
/// payload differs, or when a failed validation forces a fresh resend (`generation`).
pub fn batch_key(endpoint: &str, snapshot: i64, index: u32, hash: &str, generation: u32) -> Uuid {
    let name = format!("{endpoint}\u{1f}{snapshot}\u{1f}{index}\u{1f}{hash}\u{1f}{generation}");
    Uuid::new_v5(&KEY_NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_stable_and_sensitive_to_every_part() {
        let k = batch_key("ep-1", 7, 0, "abc", 0);
        assert_eq!(k, batch_key("ep-1", 7, 0, "abc", 0));
        assert_ne!(k, batch_key("ep-2", 7, 0, "abc", 0));
        assert_ne!(k, batch_key("ep-1", 8, 0, "abc", 0));
        assert_ne!(k, batch_key("ep-1", 7, 1, "abc", 0));
        assert_ne!(k, batch_key("ep-1", 7, 0, "abd", 0));
        assert_ne!(k, batch_key("ep-1", 7, 0, "abc", 1));
        assert_eq!(k.get_version_num(), 5);
    }
}
