//! Dry runs: what a sync (or a reconcile's repairing sync) would send, planned exactly as
//! the real run plans it ([`crate::sync::plan_endpoints`]), with nothing sent and nothing
//! journaled. Per endpoint: counts, a sample of items with their old → new values (old:
//! what the endpoint last confirmed, under its current mapping), and the largest changes.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::adapter::EndpointConfig;
use crate::catalog::Item;
use crate::error::Result;
use crate::mapping::EndpointMapping;
use crate::staging::{OnRemoved, Staging};
use crate::sync::{DiffCache, EndpointPlan, StaleSnapshot, SyncOptions, plan_endpoints};
use bulwark_engine::Store;

/// Items shown per endpoint in [`EndpointPreview::sample`] and in each largest-changes list.
pub const SHOWN: usize = 5;

/// What a dry run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DryRun {
    /// Target snapshot.
    pub snapshot: i64,
    /// Set when the target is too old to push (`max_snapshot_age`): nothing would be sent.
    pub stale: Option<StaleSnapshot>,
    /// Endpoints that would be sent something.
    pub send: usize,
    /// Endpoints already showing the target.
    pub up_to_date: usize,
    /// Endpoints left out because a sync of theirs is still running.
    pub busy: usize,
    /// Endpoints left out because an operator paused them.
    pub paused: usize,
    /// Endpoints that would be planned but skipped, their circuit being open (their
    /// counts say what they will be sent once it closes).
    pub circuit_open: usize,
    /// Batches that would be sent.
    pub batches: u64,
    /// Items that would be sent.
    pub items: u64,
    /// Every endpoint, in configuration order.
    pub endpoints: Vec<EndpointPreview>,
}

/// What one endpoint would be sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointPreview {
    /// Endpoint id.
    pub endpoint: String,
    /// `send`, `up_to_date`, `busy`, `paused` or `circuit_open` (skipped when the run
    /// begins; `circuit_until` says until when).
    pub action: &'static str,
    /// The snapshot it confirmed under its current mapping (`None`: a full send).
    pub base: Option<i64>,
    /// With `circuit_open`: when the circuit turns half-open (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_until: Option<i64>,
    /// Batches.
    pub batches: u64,
    /// Items.
    pub items: u64,
    /// Items it has not confirmed before (new SKUs, or every item of a full send).
    pub new_items: u64,
    /// Items whose quantity changes.
    pub qty_changes: u64,
    /// Items whose price tiers change.
    pub price_changes: u64,
    /// Items sent at their confirmed values (quarantine retries, drift repairs).
    pub unchanged: u64,
    /// Quarantined SKUs retried.
    pub retries: u64,
    /// Drifted SKUs repaired (a reconcile).
    pub repairs: u64,
    /// The first items, by SKU.
    pub sample: Vec<ItemChange>,
    /// The largest quantity changes (by units).
    pub largest_qty: Vec<ItemChange>,
    /// The largest price changes (by relative change of a tier).
    pub largest_price: Vec<ItemChange>,
}

/// One item: what the endpoint confirmed and what would be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemChange {
    /// SKU, as sent.
    pub sku: String,
    /// Confirmed quantity (`None`: not confirmed before).
    pub old_qty: Option<i64>,
    /// Quantity sent.
    pub new_qty: i64,
    /// Confirmed tiers as (min qty, price minor).
    pub old_tiers: Option<Vec<(u32, i64)>>,
    /// Tiers sent.
    pub new_tiers: Vec<(u32, i64)>,
}

impl ItemChange {
    fn new(old: Option<&Item>, new: &Item) -> Self {
        let tiers = |i: &Item| i.tiers.iter().map(|t| (t.min_qty, t.price_minor)).collect();
        Self {
            sku: new.sku.clone(),
            old_qty: old.map(|o| o.qty),
            new_qty: new.qty,
            old_tiers: old.map(tiers),
            new_tiers: tiers(new),
        }
    }

    /// Units the quantity moves by (0 for a new item).
    pub fn qty_delta(&self) -> i64 {
        self.old_qty.map_or(0, |o| (self.new_qty - o).abs())
    }

    /// The largest relative change of a tier's price present before and after, in basis
    /// points (0 for a new item); a tier added or removed counts as 10,000 (100 %).
    pub fn price_delta_bp(&self) -> i64 {
        let Some(old) = &self.old_tiers else {
            return 0;
        };
        let mut worst = 0i64;
        for (q, p) in &self.new_tiers {
            let bp = match old.iter().find(|(oq, _)| oq == q) {
                Some((_, op)) if *op != 0 => ((p - op).abs() as i128 * 10_000 / op.abs() as i128)
                    .min(i64::MAX as i128) as i64,
                Some((_, op)) if op == p => 0,
                _ => 10_000,
            };
            worst = worst.max(bp);
        }
        if old
            .iter()
            .any(|(oq, _)| !self.new_tiers.iter().any(|(q, _)| q == oq))
        {
            worst = worst.max(10_000);
        }
        worst
    }
}

/// Preview of a list of items against a base, shared by endpoints with the same list and
/// base (one computation per shared diff, as planning shares the diff).
#[derive(Debug, Clone, Default)]
struct ItemsPreview {
    new_items: u64,
    qty_changes: u64,
    price_changes: u64,
    unchanged: u64,
    sample: Vec<ItemChange>,
    largest_qty: Vec<ItemChange>,
    largest_price: Vec<ItemChange>,
}

fn preview_items(base: Option<&[Item]>, items: &[Item]) -> ItemsPreview {
    let mut p = ItemsPreview::default();
    let mut by_qty: Vec<(i64, &Item, Option<&Item>)> = Vec::new();
    let mut by_price: Vec<(i64, &Item, Option<&Item>)> = Vec::new();
    for it in items {
        let old = base.and_then(|b| {
            b.binary_search_by(|o| o.sku.cmp(&it.sku))
                .ok()
                .map(|i| &b[i])
        });
        match old {
            None => p.new_items += 1,
            Some(o) => {
                let q = o.qty != it.qty;
                let t = o.tiers != it.tiers;
                p.qty_changes += u64::from(q);
                p.price_changes += u64::from(t);
                p.unchanged += u64::from(!q && !t);
                if q {
                    by_qty.push(((it.qty - o.qty).abs(), it, old));
                }
                if t {
                    let c = ItemChange::new(old, it);
                    by_price.push((c.price_delta_bp(), it, old));
                }
            }
        }
        if p.sample.len() < SHOWN {
            p.sample.push(ItemChange::new(old, it));
        }
    }
    let top = |mut v: Vec<(i64, &Item, Option<&Item>)>| -> Vec<ItemChange> {
        // Largest first; ties by SKU, so the list is stable.
        v.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.sku.cmp(&b.1.sku)));
        v.into_iter()
            .take(SHOWN)
            .map(|(_, it, old)| ItemChange::new(old, it))
            .collect()
    };
    p.largest_qty = top(by_qty);
    p.largest_price = top(by_price);
    p
}

/// Plan a sync of `endpoints` towards `snapshot` (with a reconcile's `repair`, endpoint →
/// drifted SKUs) the way [`crate::sync::plan_run_with`] does, and describe it instead of
/// storing it.
pub async fn dry_run(
    store: &dyn Store,
    staging: &Staging,
    diffs: &DiffCache,
    endpoints: &[EndpointConfig],
    snapshot: i64,
    options: &SyncOptions,
    repair: Option<&HashMap<String, Vec<String>>>,
) -> Result<DryRun> {
    let planned =
        plan_endpoints(store, staging, diffs, endpoints, snapshot, options, repair).await?;
    let mut out = DryRun {
        snapshot,
        stale: planned.stale,
        ..DryRun::default()
    };
    let now = bulwark_engine::now_ms();
    let open: HashMap<String, i64> = store
        .circuits()
        .await?
        .into_iter()
        .filter_map(|c| match c.admission(now) {
            bulwark_engine::Admission::Open { until } => Some((c.subject, until)),
            _ => None,
        })
        .collect();
    type Key = (usize, Option<i64>, Option<String>, OnRemoved);
    // The value keeps its item list alive, so its address names it for the whole loop.
    let mut shared: HashMap<Key, (Arc<Vec<Item>>, Arc<ItemsPreview>)> = HashMap::new();
    for (ep, plan) in planned.endpoints {
        let mut e = EndpointPreview {
            endpoint: ep.id.clone(),
            ..EndpointPreview::default()
        };
        match plan {
            EndpointPlan::Busy => {
                e.action = "busy";
                out.busy += 1;
            }
            EndpointPlan::Paused => {
                e.action = "paused";
                out.paused += 1;
            }
            EndpointPlan::UpToDate { base } => {
                e.action = "up_to_date";
                e.base = base;
                out.up_to_date += 1;
            }
            EndpointPlan::Send { input, items } => {
                e.action = "send";
                e.base = input.base;
                e.batches = input.batches.len() as u64;
                e.items = items.len() as u64;
                e.retries = input.retry.len() as u64;
                e.repairs = input.repair.len() as u64;
                // The same item list (by identity) against the same base under the same
                // mapping previews the same.
                let key = (
                    Arc::as_ptr(&items) as usize,
                    input.base,
                    input.mapping.as_ref().map(EndpointMapping::cache_key),
                    input.on_removed,
                );
                let p = match shared.get(&key) {
                    Some((_, p)) => p.clone(),
                    None => {
                        let base = match input.base {
                            Some(b) => Some(
                                diffs
                                    .diff_mapped(None, b, input.mapping.as_ref(), input.on_removed)
                                    .await?,
                            ),
                            None => None,
                        };
                        let p = Arc::new(preview_items(base.as_deref().map(Vec::as_slice), &items));
                        shared.insert(key, (items.clone(), p.clone()));
                        p
                    }
                };
                e.new_items = p.new_items;
                e.qty_changes = p.qty_changes;
                e.price_changes = p.price_changes;
                e.unchanged = p.unchanged;
                e.sample = p.sample.clone();
                e.largest_qty = p.largest_qty.clone();
                e.largest_price = p.largest_price.clone();
                if let Some(until) = open.get(&ep.id) {
                    e.action = "circuit_open";
                    e.circuit_until = Some(*until);
                    out.circuit_open += 1;
                } else {
                    out.send += 1;
                    out.batches += e.batches;
                    out.items += e.items;
                }
            }
        }
        out.endpoints.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::PriceTier;

    fn item(sku: &str, qty: i64, prices: &[(u32, i64)]) -> Item {
        Item {
            sku: sku.into(),
            qty,
            tiers: prices
                .iter()
                .map(|&(min_qty, price_minor)| PriceTier {
                    min_qty,
                    price_minor,
                })
                .collect(),
        }
    }

    #[test]
    fn counts_and_ranks_changes_against_the_base() {
        let base = vec![
            item("A", 10, &[(1, 1000)]),
            item("B", 5, &[(1, 200), (10, 180)]),
            item("C", 7, &[(1, 50)]),
            item("D", 1, &[(1, 100)]),
        ];
        let items = vec![
            item("A", 0, &[(1, 1000)]),           // qty -10
            item("B", 6, &[(1, 300), (10, 180)]), // qty +1, price +50 %
            item("C", 7, &[(1, 50)]),             // unchanged (a retry)
            item("D", 1, &[(1, 101)]),            // price +1 %
            item("E", 3, &[(1, 10)]),             // new
        ];
        let p = preview_items(Some(&base), &items);
        assert_eq!(
            (p.new_items, p.qty_changes, p.price_changes, p.unchanged),
            (1, 2, 2, 1)
        );
        let skus = |v: &[ItemChange]| v.iter().map(|c| c.sku.clone()).collect::<Vec<_>>();
        assert_eq!(skus(&p.largest_qty), ["A", "B"]);
        assert_eq!(skus(&p.largest_price), ["B", "D"]);
        assert_eq!(p.largest_price[0].price_delta_bp(), 5_000);
        assert_eq!(p.largest_price[1].price_delta_bp(), 100);
        assert_eq!(p.largest_qty[0].old_qty, Some(10));
        assert_eq!(p.largest_qty[0].new_qty, 0);
        assert_eq!(skus(&p.sample), ["A", "B", "C", "D", "E"]);
        assert_eq!(p.sample[4].old_qty, None);

        let full = preview_items(None, &items);
        assert_eq!((full.new_items, full.qty_changes), (5, 0));
        assert!(full.largest_qty.is_empty());
    }

    #[test]
    fn a_tier_added_or_removed_is_a_full_change() {
        let c = ItemChange::new(
            Some(&item("A", 1, &[(1, 100), (10, 90)])),
            &item("A", 1, &[(1, 100)]),
        );
        assert_eq!(c.price_delta_bp(), 10_000);
        let c = ItemChange::new(Some(&item("A", 1, &[(1, 0)])), &item("A", 1, &[(1, 5)]));
        assert_eq!(c.price_delta_bp(), 10_000);
    }
}
