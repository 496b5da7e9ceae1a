//! The report of `gmemctl bench`: every figure with its statistics, the
//! machine it ran on, what was skipped and why, and the raw series the plots
//! draw; printed as one table or serialized as JSON (the same values).
//!
//! Invariants: every figure names a baseline figure of the same report
//! (itself for a baseline) and its `ratio` is its median over the
//! baseline's median; ids are unique; `p99` is present exactly for latency
//! figures (individually timed events).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// A unit of a figure's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Nanoseconds.
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Bytes.
    Bytes,
}

impl Unit {
    /// How many of the base unit (nanoseconds for times, bytes) one of
    /// this unit is, so figures in different units can be compared.
    pub fn scale(self) -> f64 {
        match self {
            Unit::Ns | Unit::Bytes => 1.0,
            Unit::Us => 1e3,
            Unit::Ms => 1e6,
        }
    }

    /// Whether values in `self` and `other` measure the same quantity.
    pub fn comparable(self, other: Unit) -> bool {
        (self == Unit::Bytes) == (other == Unit::Bytes)
    }

    /// The unit as the table prints it.
    pub fn symbol(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Us => "µs",
            Unit::Ms => "ms",
            Unit::Bytes => "B",
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// Stable identifier for scripts (`srcu.read.srcu_membarrier.1t`).
    pub id: String,
    /// What it measures, for a human.
    pub name: String,
    /// The unit of `median` and `p99`.
    pub unit: Unit,
    /// Median over the samples.
    pub median: f64,
    /// 99th percentile (nearest rank) for latencies; with fewer than 100
    /// samples it is the largest sample.
    pub p99: Option<f64>,
    /// How many samples the statistics summarise.
    pub samples: usize,
    /// Id of the figure this one is compared with (its own id for a
    /// baseline).
    pub baseline: String,
    /// `median` divided by the baseline's median (both in the same unit);
    /// `None` only when the baseline was skipped (it is in
    /// [`Report::skipped`]).
    pub ratio: Option<f64>,
}

/// A figure that could not be measured here, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The id the figure would have had.
    pub id: String,
    /// Why it was not measured.
    pub reason: String,
}

/// The machine and its state during the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cores: usize,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// The guest memory backend `Backend::auto_with_reason` chooses here.
    pub backend: String,
    /// Why it chose it.
    pub backend_reason: String,
    /// SRCU read side of this process (membarrier or fences).
    pub srcu_read_side: String,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// 1, 5 and 15 minute load averages when the run started.
    pub load_before: [f64; 3],
    /// The same when it ended.
    pub load_after: [f64; 3],
}

/// The parameters the run used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// `quick` or `full`.
    pub mode: String,
    /// N of the "N threads" figures (the cores, at least 2).
    pub threads: usize,
    /// Thread counts of the read-side throughput series.
    pub thread_counts: Vec<usize>,
    /// Rounds of the side-by-side measurements (each round measures every
    /// contender once, in alternating order).
    pub rounds: usize,
    /// Populated guest sizes of the handover figures, bytes.
    pub guest_sizes: Vec<u64>,
    /// Runs per handover configuration and per copy baseline.
    pub handover_runs: usize,
    /// Where the copy baseline wrote its snapshot.
    pub copy_directory: String,
    /// Inputs are deterministic (fixed page orders, no random source), so
    /// there is no seed to fix; recorded so scripts need not guess.
    pub random_inputs: bool,
}

/// One point of the read-side throughput series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadRatePoint {
    /// The contender's name.
    pub contender: String,
    /// Threads reading at once.
    pub threads: usize,
    /// Median aggregate rate over the rounds, millions of sections/s.
    pub million_per_second: f64,
}

/// One point of the blackout-versus-size series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HandoverPoint {
    /// `memfd` or `hugetlb`.
    pub backend: String,
    /// `exec`, `transfer`, `luod`, or `copy` for the baseline.
    pub transport: String,
    /// Populated guest size, bytes.
    pub size: u64,
    /// Median blackout (for `copy`: copy out + in), milliseconds.
    pub blackout_ms: f64,
}

/// The raw series behind the plots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Read-side throughput versus threads.
    pub read_rates: Vec<ReadRatePoint>,
    /// Blackout versus guest size, ours and the copy baseline.
    pub handover: Vec<HandoverPoint>,
    /// Every `freeze(true)` latency on an idle file, microseconds.
    pub freeze_idle_us: Vec<f64>,
    /// Every `freeze(true)` latency while N threads fault, microseconds.
    pub freeze_faulting_us: Vec<f64>,
}

/// Everything one run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// gmemctl's version.
    pub version: String,
    /// The machine.
    pub machine: Machine,
    /// The parameters.
    pub settings: Settings,
    /// Every figure, in table order.
    pub figures: Vec<Figure>,
    /// Figures not measured here, with the reason.
    pub skipped: Vec<Skipped>,
    /// The plots' data.
    pub series: Series,
}

/// Samples of one figure before the baseline is known.
#[derive(Clone, Debug)]
pub struct Measured {
    /// See [`Figure::id`].
    pub id: String,
    /// See [`Figure::name`].
    pub name: String,
    /// See [`Figure::unit`].
    pub unit: Unit,
    /// Every sample, in `unit`.
    pub samples: Vec<f64>,
    /// Whether the samples are individual latencies (then p99 is given).
    pub latency: bool,
    /// Id of the baseline figure; `None` for a baseline itself.
    pub baseline: Option<String>,
}

/// The median of `samples` (the upper middle for an even count); NaN for
/// none: the one the table examples use too.
pub use gmem::bench::median;

/// The 99th percentile by nearest rank: the smallest sample with at least
/// 99% of the samples at or below it; NaN for none.
pub fn p99(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (0.99 * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Turns measured samples into figures, resolving each baseline by id. A
/// baseline missing from `measured` (skipped) leaves the ratio `None`; one
/// in a unit of another quantity makes it NaN, which
/// [`Report::problems`] reports.
pub fn figures(measured: &[Measured]) -> Vec<Figure> {
    measured
        .iter()
        .map(|figure| {
            let value = median(&figure.samples);
            let baseline = figure.baseline.clone().unwrap_or_else(|| figure.id.clone());
            let ratio = measured
                .iter()
                .find(|other| other.id == baseline)
                .map(|other| {
                    if !figure.unit.comparable(other.unit) {
                        return f64::NAN;
                    }
                    value * figure.unit.scale() / (median(&other.samples) * other.unit.scale())
                });
            Figure {
                id: figure.id.clone(),
                name: figure.name.clone(),
                unit: figure.unit,
                median: value,
                p99: figure.latency.then(|| p99(&figure.samples)),
                samples: figure.samples.len(),
                baseline,
                ratio,
            }
        })
        .collect()
}

/// A number with four significant digits, without exponent for the
/// magnitudes these figures have (`2.913`, `1452`, `0.0005589`).
pub fn significant(value: f64) -> String {
    if !value.is_finite() || value == 0.0 {
        return format!("{value}");
    }
    let digits_before_point = value.abs().log10().floor() as i32 + 1;
    let decimals = (4 - digits_before_point).max(0) as usize;
    format!("{value:.decimals$}")
}

impl Report {
    /// The table: a header naming the machine and the run, then one row per
    /// figure, then the skipped figures.
    pub fn table(&self) -> String {
        let machine = &self.machine;
        let mut text = String::new();
        let _ = writeln!(
            text,
            "gmemctl bench ({} run): {} cores, kernel {}, backend {} ({}), srcu read side {}, load average {:.2} {:.2} {:.2} at start, {:.2} {:.2} {:.2} at end",
            self.settings.mode,
            machine.cores,
            machine.kernel,
            machine.backend,
            machine.backend_reason,
            machine.srcu_read_side,
            machine.load_before[0],
            machine.load_before[1],
            machine.load_before[2],
            machine.load_after[0],
            machine.load_after[1],
            machine.load_after[2],
        );
        let _ = writeln!(text);
        let _ = writeln!(
            text,
            "| figure | id | median | p99 | unit | ratio | baseline |"
        );
        let _ = writeln!(text, "|---|---|---|---|---|---|---|");
        for figure in &self.figures {
            let baseline = if figure.baseline == figure.id {
                "(baseline)".to_owned()
            } else {
                figure.baseline.clone()
            };
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} | {} | {} | {} |",
                figure.name,
                figure.id,
                significant(figure.median),
                figure.p99.map_or_else(|| "-".to_owned(), significant),
                figure.unit.symbol(),
                figure.ratio.map_or_else(|| "-".to_owned(), significant),
                baseline,
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(text);
            let _ = writeln!(text, "Not measured here:");
            for skipped in &self.skipped {
                let _ = writeln!(text, "- {}: {}", skipped.id, skipped.reason);
            }
        }
        text
    }

    /// Figures whose values are not finite and positive (a broken
    /// measurement), or without a ratio although their baseline was not
    /// skipped, one line each; empty when all are sound.
    pub fn problems(&self) -> Vec<String> {
        self.figures
            .iter()
            .filter_map(|figure| {
                let baseline_skipped = self
                    .skipped
                    .iter()
                    .any(|skipped| skipped.id == figure.baseline);
                let ratio = match figure.ratio {
                    None if baseline_skipped => None,
                    None => Some(f64::NAN),
                    Some(ratio) => Some(ratio),
                };
                let values = [Some(figure.median), figure.p99, ratio];
                let sound = values
                    .iter()
                    .flatten()
                    .all(|value| value.is_finite() && *value > 0.0);
                (!sound).then(|| {
                    format!(
                        "{}: median {} p99 {:?} ratio {:?}",
                        figure.id, figure.median, figure.p99, figure.ratio
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p99_follow_nearest_rank() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(median(&samples), 101.0);
        assert_eq!(p99(&samples), 198.0);
        assert_eq!(p99(&[3.0, 1.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn significant_keeps_four_digits() {
        assert_eq!(significant(2.91349), "2.913");
        assert_eq!(significant(1452.6), "1453");
        assert_eq!(significant(0.000558912), "0.0005589");
        assert_eq!(significant(12.5), "12.50");
    }

    #[test]
    fn ratios_divide_by_the_named_baseline_and_baselines_are_one() {
        let measured = vec![
            Measured {
                id: "floor".into(),
                name: "floor".into(),
                unit: Unit::Ns,
                samples: vec![2.0, 2.0, 4.0],
                latency: false,
                baseline: None,
            },
            Measured {
                id: "ours".into(),
                name: "ours".into(),
                unit: Unit::Ns,
                samples: vec![5.0, 6.0, 7.0],
                latency: true,
                baseline: Some("floor".into()),
            },
        ];
        let figures = figures(&measured);
        assert_eq!(figures[0].ratio, Some(1.0));
        assert_eq!(figures[0].p99, None);
        assert_eq!(figures[1].ratio, Some(3.0));
        assert_eq!(figures[1].p99, Some(7.0));
        assert_eq!(figures[1].baseline, "floor");
    }

    #[test]
    fn ratios_convert_units_and_refuse_other_quantities() {
        let figure = |id: &str, unit, baseline: Option<&str>| Measured {
            id: id.into(),
            name: id.into(),
            unit,
            samples: vec![2.0],
            latency: false,
            baseline: baseline.map(Into::into),
        };
        let figures = figures(&[
            figure("fault", Unit::Us, None),
            figure("check", Unit::Ns, Some("fault")),
            figure("bytes", Unit::Bytes, Some("fault")),
            figure("orphan", Unit::Ns, Some("skipped")),
        ]);
        assert_eq!(figures[1].ratio, Some(0.001));
        assert!(figures[2].ratio.is_some_and(f64::is_nan));
        assert_eq!(figures[3].ratio, None);
    }
}
