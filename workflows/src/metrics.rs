//! Metrics expositions, encoded by `prometheus-client` in the OpenMetrics text format:
//! [`crate::app::Bulwark::metrics_text`] (what only the running process knows: journal
//! commits, adapter calls and their latency) and the dashboard's view of the database.
//! Values are gathered at scrape time (queries, the process's atomic counters) into an
//! [`Exposition`], which the registry encodes as one collector.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of one sample, in order.
pub type Labels = Vec<(&'static str, String)>;

/// A histogram's state: per-bucket (not cumulative) counts for `bounds` plus one for the
/// rest, the sum of the observations and their count.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Upper bounds of the buckets (the last, +Inf, is implied).
    pub bounds: Vec<f64>,
    /// Observations per bucket (one more than `bounds`).
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

#[derive(Debug, Clone)]
enum Samples {
    Counter(Vec<(Labels, f64)>),
    Gauge(Vec<(Labels, f64)>),
    Histogram(Vec<(Labels, Histogram)>),
    Info(Labels),
}

#[derive(Debug, Clone)]
struct Family {
    /// The name without the type's suffix (`_total`, `_info`): the encoder adds it.
    name: &'static str,
    help: &'static str,
    samples: Samples,
}

/// Metric families gathered for one scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// A counter family; `name` without `_total`.
    pub fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) {
        self.families.push(Family {
            name,
            help,
            samples: Samples::Counter(samples),
        });
    }

    /// A gauge family.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) {
        self.families.push(Family {
            name,
            help,
            samples: Samples::Gauge(samples),
        });
    }

    /// A gauge with one unlabelled sample.
    pub fn one_gauge(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.gauge(name, help, vec![(Vec::new(), value)]);
    }

    /// A histogram family.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: Vec<(Labels, Histogram)>,
    ) {
        self.families.push(Family {
            name,
            help,
            samples: Samples::Histogram(samples),
        });
    }

    /// An info metric (`name` without `_info`).
    pub fn info(&mut self, name: &'static str, help: &'static str, labels: Labels) {
        self.families.push(Family {
            name,
            help,
            samples: Samples::Info(labels),
        });
    }

    /// `bulwark_build_info{version}`, the same on every exposition.
    pub fn build_info(&mut self) {
        self.info(
            "bulwark_build",
            "The Bulwark build serving these metrics.",
            vec![("version", env!("CARGO_PKG_VERSION").to_string())],
        );
    }

    /// Counts by one label, in a stable order (every key of `keys` present, 0 if absent).
    pub fn by_label(
        label: &'static str,
        keys: &[&str],
        counts: &BTreeMap<String, i64>,
    ) -> Vec<(Labels, f64)> {
        let mut all: BTreeMap<String, i64> = keys.iter().map(|k| (k.to_string(), 0)).collect();
        for (k, n) in counts {
            *all.entry(k.clone()).or_default() += n;
        }
        all.into_iter()
            .map(|(k, n)| (vec![(label, k)], n as f64))
            .collect()
    }

    /// The OpenMetrics text of these families.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Encode one sample with `labels` (none: no braces at all).
fn labelled(
    metric: &mut MetricEncoder<'_>,
    labels: &Labels,
    f: impl FnOnce(&mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    if labels.is_empty() {
        f(metric)
    } else {
        f(&mut metric.encode_family(labels)?)
    }
}

/// `v` as an integer, if it is one (and small enough to be exact).
fn whole(v: f64) -> Option<i64> {
    (v.fract() == 0.0 && v.abs() < 9.0e15).then_some(v as i64)
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            // A family without samples is left out (some parsers refuse its bare header).
            let empty = match &f.samples {
                Samples::Counter(v) | Samples::Gauge(v) => v.is_empty(),
                Samples::Histogram(v) => v.is_empty(),
                Samples::Info(_) => false,
            };
            if empty {
                continue;
            }
            let kind = match &f.samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Histogram(_) => MetricType::Histogram,
                Samples::Info(_) => MetricType::Info,
            };
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, kind)?;
            match &f.samples {
                // Whole numbers are written as such (`12`, not `12.0`).
                Samples::Counter(samples) => {
                    for (labels, v) in samples {
                        labelled(&mut metric, labels, |m| match whole(*v) {
                            Some(n) if n >= 0 => {
                                m.encode_counter::<NoLabelSet, _, u64>(&(n as u64), None)
                            }
                            _ => m.encode_counter::<NoLabelSet, _, f64>(v, None),
                        })?;
                    }
                }
                Samples::Gauge(samples) => {
                    for (labels, v) in samples {
                        labelled(&mut metric, labels, |m| match whole(*v) {
                            Some(n) => m.encode_gauge(&n),
                            None => m.encode_gauge(v),
                        })?;
                    }
                }
                Samples::Histogram(samples) => {
                    for (labels, h) in samples {
                        let buckets: Vec<(f64, u64)> = h
                            .bounds
                            .iter()
                            .copied()
                            .chain([f64::MAX])
                            .zip(h.counts.iter().copied().chain(std::iter::repeat(0)))
                            .collect();
                        labelled(&mut metric, labels, |m| {
                            m.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
                        })?;
                    }
                }
                Samples::Info(labels) => metric.encode_info(labels)?,
            }
        }
        Ok(())
    }
}

/// What only this process knows: its journal writer (appends, commits and their latency,
/// lease takeovers) and its adapter calls (by kind, batches by outcome, calls in flight,
/// latency by adapter and outcome).
pub fn process(
    journal: &bulwark_engine::journal::JournalStats,
    effects: &crate::sync::EffectStats,
) -> Exposition {
    use std::sync::atomic::{AtomicU64, Ordering};
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut x = Exposition::default();
    x.build_info();
    x.counter(
        "bulwark_journal_appends",
        "Journal appends by outcome (this process).",
        vec![
            (
                vec![("outcome", "committed".into())],
                get(&journal.committed),
            ),
            (vec![("outcome", "fenced".into())], get(&journal.fenced)),
        ],
    );
    x.counter(
        "bulwark_journal_failed_commits",
        "Group commits that failed (this process).",
        vec![(Vec::new(), get(&journal.failed_commits))],
    );
    x.histogram(
        "bulwark_journal_commit_seconds",
        "Latency of one group commit (one durable transaction).",
        vec![(
            Vec::new(),
            Histogram {
                bounds: bulwark_engine::journal::JournalStats::COMMIT_BUCKETS_MICROS
                    .iter()
                    .map(|b| *b as f64 / 1e6)
                    .collect(),
                counts: journal
                    .commit_buckets
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect(),
                sum: get(&journal.commit_micros) / 1e6,
                count: journal.commits.load(Ordering::Relaxed),
            },
        )],
    );
    x.counter(
        "bulwark_lease_takeovers",
        "Workflows this process took over from a worker whose lease ran out.",
        vec![(Vec::new(), get(&journal.takeovers))],
    );
    x.counter(
        "bulwark_adapter_calls",
        "Portal adapter calls by kind (this process).",
        [
            ("upload", &effects.uploads),
            ("verify", &effects.verifies),
            ("probe", &effects.probes),
            ("read_back", &effects.reads),
        ]
        .into_iter()
        .map(|(call, n)| (vec![("call", call.to_string())], get(n)))
        .collect(),
    );
    x.counter(
        "bulwark_probe_hits",
        "Probes that found the batch already landed (a re-send avoided).",
        vec![(Vec::new(), get(&effects.probe_hits))],
    );
    x.counter(
        "bulwark_adapter_timeouts",
        "Calls given up after the per-attempt timeout.",
        vec![(Vec::new(), get(&effects.timeouts))],
    );
    x.counter(
        "bulwark_batches",
        "Batch attempts by outcome (this process).",
        [
            ("verified", &effects.verified),
            ("mismatch", &effects.mismatches),
            ("upload_failed", &effects.upload_failures),
            ("upload_partial", &effects.partial_uploads),
            ("verify_failed", &effects.verify_failures),
        ]
        .into_iter()
        .map(|(o, n)| (vec![("outcome", o.to_string())], get(n)))
        .collect(),
    );
    x.one_gauge(
        "bulwark_effects_in_flight",
        "Adapter calls in flight now (this process).",
        get(&effects.in_flight),
    );
    let latency = effects
        .latency
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    x.histogram(
        "bulwark_adapter_call_seconds",
        "Latency of adapter calls by adapter and outcome (this process).",
        latency
            .into_iter()
            .map(|((adapter, outcome), l)| {
                (
                    vec![
                        ("adapter", adapter.to_string()),
                        ("outcome", outcome.to_string()),
                    ],
                    Histogram {
                        bounds: crate::sync::CallLatency::BOUNDS_SECONDS.to_vec(),
                        counts: l.counts.to_vec(),
                        sum: l.sum_micros as f64 / 1e6,
                        count: l.count,
                    },
                )
            })
            .collect(),
    );
    x
}
