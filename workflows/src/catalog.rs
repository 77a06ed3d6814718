//! The catalog model: SKUs with a quantity and wholesale price tiers, and batches of them.

use std::collections::BTreeMap;

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
    /// Compare-and-set stock (an endpoint whose `stock_policy` is `compare_and_set`): per
    /// SKU, what the endpoint showed after Bulwark's last confirmed write there, and the
    /// quantity that write was made for. A SKU without an entry is written as it is (no
    /// earlier write to compare with). Not part of the payload hash: it says how to write
    /// the items, not what they are.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cas: BTreeMap<String, Cas>,
}

/// What Bulwark knows of one SKU's stock at a compare-and-set endpoint: the endpoint
/// showed `compare` after Bulwark's last confirmed write, which was made for the
/// quantity `basis` (the mapped ERP quantity). `compare < basis` when that write was
/// lowered by sales the shop made since the write before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cas {
    /// The endpoint's quantity after the last confirmed write.
    pub compare: i64,
    /// The quantity that write was made for.
    pub basis: i64,
}

impl Cas {
    /// Nothing known beyond the last confirmed quantity `qty` (written as it was).
    pub fn confirmed(qty: i64) -> Cas {
        Cas {
            compare: qty,
            basis: qty,
        }
    }

    /// What to write for the quantity `qty` when the endpoint shows `shown`: `qty` less
    /// what the shop sold since the last confirmed write (`compare - shown`), never below
    /// 0. When `qty` is still the quantity that write was made for, the sales it already
    /// took off are not taken off again (the write starts from `compare`). Stock the
    /// shop gained (`shown > compare`: a return, a manual correction) is not added.
    pub fn target(&self, qty: i64, shown: i64) -> i64 {
        let start = if qty == self.basis { self.compare } else { qty };
        let sold = self.compare.saturating_sub(shown).max(0);
        start.saturating_sub(sold).max(0)
    }
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
    fn compare_and_set_targets_take_off_what_the_shop_sold() {
        // Last write: 10 for an ERP quantity of 10.
        let c = Cas::confirmed(10);
        assert_eq!(c.target(12, 10), 12, "nothing sold: the new ERP quantity");
        assert_eq!(c.target(12, 7), 9, "3 sold since: 12 - 3");
        assert_eq!(c.target(2, 7), 0, "never below 0");
        assert_eq!(
            c.target(10, 6),
            6,
            "the ERP did not move: what the shop shows"
        );
        assert_eq!(c.target(12, 15), 12, "stock the shop gained is not added");
        // Last write was lowered: 7 for an ERP quantity of 10 (3 sold before it).
        let c = Cas {
            compare: 7,
            basis: 10,
        };
        assert_eq!(
            c.target(10, 7),
            7,
            "the 3 already taken off are not taken off again"
        );
        assert_eq!(c.target(10, 5), 5, "2 more sold");
        assert_eq!(
            c.target(20, 7),
            20,
            "a new ERP quantity: nothing sold since"
        );
        assert_eq!(c.target(20, 4), 17, "a new ERP quantity less 3 sold since");
    }

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
