//! Per-endpoint mapping: which SKUs an endpoint carries, under which codes, with which
//! price tiers, in which currency, with which markup and rounding.
//!
//! Configured as JSON in the endpoint's settings under the key `"mapping"`, e.g.
//!
//! ```json
//! { "sku_prefixes": ["TOOLS-"], "skus": ["SKU-000001"],
//!   "aliases": { "SKU-000001": "P-77" },
//!   "tiers": [0, 2], "currency": "CHF", "fx_rate_ppm": 950000,
//!   "markup_bp": 1500, "round_to_minor": 5, "qty_buffer": "10%", "max_qty": 500 }
//! ```
//!
//! - `skus` / `sku_prefixes`: the endpoint carries a SKU listed in `skus` or starting with
//!   one of `sku_prefixes`; with neither, it carries every SKU;
//! - `aliases`: the portal's own code for a SKU (sent instead of the SKU);
//! - `tiers`: indexes (0-based) of the snapshot's price tiers it shows (default: all);
//! - `currency` (informational label) and `fx_rate_ppm`: prices are multiplied by
//!   `fx_rate_ppm / 1_000_000` (default: 1);
//! - `markup_bp`: markup in basis points (1500 = +15 %), applied after the rate;
//! - `round_to_minor`: prices are rounded half-up to a multiple of this many minor units;
//! - `qty_buffer`: stock held back from the endpoint, so a snapshot that lags behind the
//!   orders errs toward under-selling: a number of units (`3`) or a share of the quantity
//!   (`"10%"`, rounded up); the quantity sent never goes below 0;
//! - `max_qty`: the most stock the endpoint is ever shown (after the buffer).
//!
//! Mapping is applied to both snapshots before diffing, so an endpoint receives exactly
//! the mapped values that changed; endpoints with identical mappings share one diff.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::catalog::{Item, PriceTier};
use crate::error::{Result, SyncError};

/// The settings key holding an endpoint's mapping (JSON).
pub const SETTINGS_KEY: &str = "mapping";

/// An endpoint's mapping. The default maps every SKU to itself unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointMapping {
    /// SKUs carried (in addition to `sku_prefixes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skus: Vec<String>,
    /// SKU prefixes carried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sku_prefixes: Vec<String>,
    /// SKU → the portal's own code.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aliases: BTreeMap<String, String>,
    /// Indexes of the price tiers shown (all if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<Vec<usize>>,
    /// Currency label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Exchange rate in millionths (1_000_000 = 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fx_rate_ppm: Option<i64>,
    /// Markup in basis points.
    #[serde(default)]
    pub markup_bp: i64,
    /// Round prices to a multiple of this many minor units (0 or 1: no rounding).
    #[serde(default)]
    pub round_to_minor: i64,
    /// Stock held back: units, or a share of the quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qty_buffer: Option<QtyBuffer>,
    /// The most stock shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_qty: Option<i64>,
}

/// Stock held back from an endpoint: `3` (units) or `"10%"` (a share, rounded up; up to
/// two decimals, `"2.5%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QtyBuffer {
    /// A number of units.
    Units(i64),
    /// A share in basis points (1000 = 10 %).
    ShareBp(i64),
}

impl QtyBuffer {
    /// Units held back from `qty`.
    fn held(self, qty: i64) -> i64 {
        match self {
            QtyBuffer::Units(u) => u,
            // Rounded up: the buffer errs toward under-selling.
            QtyBuffer::ShareBp(bp) => {
                let q = i128::from(qty.max(0)) * i128::from(bp);
                ((q + 9_999) / 10_000) as i64
            }
        }
    }
}

impl Serialize for QtyBuffer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            QtyBuffer::Units(u) => s.serialize_i64(*u),
            QtyBuffer::ShareBp(bp) => s.serialize_str(&format!("{}.{:02}%", bp / 100, bp % 100)),
        }
    }
}

impl<'de> Deserialize<'de> for QtyBuffer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => n
                .as_i64()
                .filter(|u| *u >= 0)
                .map(QtyBuffer::Units)
                .ok_or_else(|| {
                    D::Error::custom(format!(
                        "qty_buffer: {n} is not a whole number of units >= 0"
                    ))
                }),
            serde_json::Value::String(t) => {
                let bad = || {
                    D::Error::custom(format!(
                        "qty_buffer: {t:?} is not a share like \"10%\" (0 to 100 %, at most two decimals)"
                    ))
                };
                let num = t.trim().strip_suffix('%').ok_or_else(bad)?.trim();
                let (int, frac) = num.split_once('.').unwrap_or((num, ""));
                if int.is_empty()
                    || frac.len() > 2
                    || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
                {
                    return Err(bad());
                }
                let bp = int.parse::<i64>().map_err(|_| bad())? * 100
                    + format!("{frac:0<2}").parse::<i64>().map_err(|_| bad())?;
                if bp > 10_000 {
                    return Err(bad());
                }
                Ok(QtyBuffer::ShareBp(bp))
            }
            other => Err(D::Error::custom(format!(
                "qty_buffer: {other} is neither units (3) nor a share (\"10%\")"
            ))),
        }
    }
}

/// `value * num / den`, rounded half-up (non-negative values).
fn scale(value: i64, num: i64, den: i64) -> i64 {
    let v = i128::from(value) * i128::from(num);
    let d = i128::from(den);
    ((v + d / 2) / d) as i64
}

impl EndpointMapping {
    /// The mapping in an endpoint's settings, if any (`None` is the identity).
    pub fn from_settings(settings: &HashMap<String, String>) -> Result<Option<Self>> {
        let Some(json) = settings.get(SETTINGS_KEY) else {
            return Ok(None);
        };
        let m: Self = serde_json::from_str(json)
            .map_err(|e| SyncError::Config(format!("endpoint mapping: {e}")))?;
        m.validate()?;
        Ok(Some(m))
    }

    /// Check the values.
    pub fn validate(&self) -> Result<()> {
        if self.markup_bp < -10_000 {
            return Err(SyncError::Config("mapping: markup_bp below -100 %".into()));
        }
        if self.fx_rate_ppm.is_some_and(|r| r <= 0) {
            return Err(SyncError::Config(
                "mapping: fx_rate_ppm must be positive".into(),
            ));
        }
        if self.round_to_minor < 0 {
            return Err(SyncError::Config(
                "mapping: round_to_minor must be >= 0".into(),
            ));
        }
        if self.max_qty.is_some_and(|m| m < 0) {
            return Err(SyncError::Config("mapping: max_qty must be >= 0".into()));
        }
        let mut codes = std::collections::HashSet::new();
        for a in self.aliases.values() {
            if !codes.insert(a) {
                return Err(SyncError::Config(format!(
                    "mapping: alias {a:?} used twice"
                )));
            }
        }
        Ok(())
    }

    /// A canonical key: equal mappings give equal keys (they share a diff).
    pub fn cache_key(&self) -> String {
        serde_json::to_string(self).expect("mapping serialises")
    }

    fn carries(&self, sku: &str) -> bool {
        (self.skus.is_empty() && self.sku_prefixes.is_empty())
            || self.skus.iter().any(|s| s == sku)
            || self
                .sku_prefixes
                .iter()
                .any(|p| sku.starts_with(p.as_str()))
    }

    fn price(&self, minor: i64) -> i64 {
        let mut p = minor;
        if let Some(rate) = self.fx_rate_ppm {
            p = scale(p, rate, 1_000_000);
        }
        if self.markup_bp != 0 {
            p = scale(p, 10_000 + self.markup_bp, 10_000);
        }
        if self.round_to_minor > 1 {
            p = scale(p, 1, self.round_to_minor) * self.round_to_minor;
        }
        p
    }

    /// The stock shown: less the buffer (never below 0), at most `max_qty`.
    fn qty(&self, qty: i64) -> i64 {
        let mut q = qty;
        if let Some(b) = self.qty_buffer {
            q = q.saturating_sub(b.held(q)).max(0);
        }
        if let Some(m) = self.max_qty {
            q = q.min(m);
        }
        q
    }

    /// Map one item, or `None` if the endpoint does not carry it.
    pub fn map_item(&self, item: &Item) -> Option<Item> {
        if !self.carries(&item.sku) {
            return None;
        }
        let tiers: Vec<PriceTier> = match &self.tiers {
            Some(idx) => idx
                .iter()
                .filter_map(|i| item.tiers.get(*i))
                .cloned()
                .collect(),
            None => item.tiers.clone(),
        };
        Some(Item {
            sku: self
                .aliases
                .get(&item.sku)
                .cloned()
                .unwrap_or_else(|| item.sku.clone()),
            qty: self.qty(item.qty),
            tiers: tiers
                .into_iter()
                .map(|t| PriceTier {
                    min_qty: t.min_qty,
                    price_minor: self.price(t.price_minor),
                })
                .collect(),
        })
    }

    /// Map a snapshot's items; the result is sorted by (mapped) SKU, as diffs need.
    /// Two SKUs mapped onto one code keep the first by source SKU.
    pub fn apply(&self, items: &[Item]) -> Vec<Item> {
        let mut out: Vec<Item> = items.iter().filter_map(|i| self.map_item(i)).collect();
        out.sort_by(|a, b| a.sku.cmp(&b.sku));
        out.dedup_by(|b, a| a.sku == b.sku);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, qty: i64, prices: &[i64]) -> Item {
        Item {
            sku: sku.into(),
            qty,
            tiers: prices
                .iter()
                .enumerate()
                .map(|(i, p)| PriceTier {
                    min_qty: 10u32.pow(i as u32),
                    price_minor: *p,
                })
                .collect(),
        }
    }

    #[test]
    fn mapping_filters_aliases_picks_tiers_and_prices() {
        let settings: HashMap<String, String> = [(
            SETTINGS_KEY.to_string(),
            r#"{"sku_prefixes":["T-"],"skus":["X"],"aliases":{"T-2":"P2"},"tiers":[0,2],
                "fx_rate_ppm":500000,"markup_bp":1000,"round_to_minor":5}"#
                .to_string(),
        )]
        .into();
        let m = EndpointMapping::from_settings(&settings).unwrap().unwrap();
        let out = m.apply(&[
            item("T-1", 3, &[1000, 900, 801]),
            item("T-2", 4, &[2000, 1800, 1600]),
            item("U-1", 5, &[1, 1, 1]),
            item("X", 6, &[100, 90, 80]),
        ]);
        // 1000 * 0.5 = 500, +10 % = 550; 801 * 0.5 = 400.5 → 401, +10 % = 441.1 → 441 → 440.
        assert_eq!(
            out,
            vec![
                item("P2", 4, &[1100, 0]).with_tiers(&[(1, 1100), (100, 880)]),
                item("T-1", 3, &[]).with_tiers(&[(1, 550), (100, 440)]),
                item("X", 6, &[]).with_tiers(&[(1, 55), (100, 45)]),
            ]
        );
        assert!(
            EndpointMapping::from_settings(&HashMap::new())
                .unwrap()
                .is_none()
        );
        let bad: HashMap<String, String> =
            [(SETTINGS_KEY.to_string(), r#"{"nope":1}"#.to_string())].into();
        assert!(EndpointMapping::from_settings(&bad).is_err());
        assert_eq!(
            EndpointMapping::default().apply(&[item("A", 1, &[5])]),
            vec![item("A", 1, &[5])]
        );
    }

    #[test]
    fn a_stock_buffer_and_cap_err_toward_under_selling() {
        let m = |json: &str| {
            let settings: HashMap<String, String> =
                [(SETTINGS_KEY.to_string(), json.to_string())].into();
            EndpointMapping::from_settings(&settings)
        };
        let qtys = |m: &EndpointMapping| -> Vec<i64> {
            [0, 1, 5, 10, 11, 1000]
                .iter()
                .map(|q| m.map_item(&item("A", *q, &[5])).unwrap().qty)
                .collect()
        };
        assert_eq!(
            qtys(&m(r#"{"qty_buffer": 3}"#).unwrap().unwrap()),
            [0, 0, 2, 7, 8, 997]
        );
        // 10 % rounded up: 11 → 1.1 → 2 held.
        assert_eq!(
            qtys(&m(r#"{"qty_buffer": "10%"}"#).unwrap().unwrap()),
            [0, 0, 4, 9, 9, 900]
        );
        assert_eq!(
            qtys(
                &m(r#"{"qty_buffer": "2.5%", "max_qty": 50}"#)
                    .unwrap()
                    .unwrap()
            ),
            [0, 0, 4, 9, 10, 50]
        );
        assert_eq!(qtys(&m(r#"{"max_qty": 0}"#).unwrap().unwrap()), [0; 6]);
        // Equal mappings written differently share a key.
        assert_eq!(
            m(r#"{"qty_buffer": "10%"}"#).unwrap().unwrap().cache_key(),
            m(r#"{"qty_buffer": "10.0%"}"#)
                .unwrap()
                .unwrap()
                .cache_key()
        );
        for (bad, says) in [
            (r#"{"qty_buffer": -1}"#, "not a whole number"),
            (r#"{"qty_buffer": "150%"}"#, "is not a share"),
            (r#"{"qty_buffer": "ten"}"#, "is not a share"),
            (r#"{"qty_buffer": 1.5}"#, "not a whole number"),
            (r#"{"max_qty": -4}"#, "max_qty must be >= 0"),
        ] {
            let err = m(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    trait WithTiers {
        fn with_tiers(self, t: &[(u32, i64)]) -> Self;
    }
    impl WithTiers for Item {
        fn with_tiers(mut self, t: &[(u32, i64)]) -> Self {
            self.tiers = t
                .iter()
                .map(|(m, p)| PriceTier {
                    min_qty: *m,
                    price_minor: *p,
                })
                .collect();
            self
        }
    }
}
