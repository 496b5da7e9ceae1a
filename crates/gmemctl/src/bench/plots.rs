//! SVG plots of a report (plotters' SVG backend only: text is written as
//! SVG `<text>` and laid out by the viewer, so no font library is needed at
//! build or run time):
//! - `read_side.svg`: read-side throughput of every contender versus the
//!   number of reader threads;
//! - `blackout.svg`: live-update blackout versus populated guest size per
//!   backend and transport, next to the copy-out/copy-in baseline;
//! - `freeze_latency.svg`: the distribution (CDF) of `freeze(true)`
//!   latencies on an idle file and while N threads fault.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::prelude::*;

use super::report::{Report, Series};

const SIZE: (u32, u32) = (900, 560);

/// Writes the three plots into `directory` (created if missing); returns
/// their paths. A plot without data (its figures all skipped) is not
/// written.
pub fn write_all(report: &Report, directory: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    let mut written = Vec::new();
    let series = &report.series;
    let subtitle = format!(
        "{} cores, kernel {}, {} run",
        report.machine.cores, report.machine.kernel, report.settings.mode
    );
    if !series.read_rates.is_empty() {
        let path = directory.join("read_side.svg");
        read_side(series, &subtitle, &path)?;
        written.push(path);
    }
    if !series.handover.is_empty() {
        let path = directory.join("blackout.svg");
        blackout(series, &subtitle, &path)?;
        written.push(path);
    }
    if !series.freeze_idle_us.is_empty() || !series.freeze_faulting_us.is_empty() {
        let path = directory.join("freeze_latency.svg");
        freeze_latency(series, report.settings.threads, &subtitle, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// plotters' errors borrow nothing but are not `Sync`; keep their text.
fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting: {error}")
}

/// Eight colours that stay apart on white and for most colour vision
/// (Tableau 10's first eight).
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn color(number: usize) -> RGBColor {
    COLORS[number % COLORS.len()]
}

/// The range `[low / below, high * above]` of the positive `values`, for
/// a log axis; the factors leave room for the legend.
fn log_range(values: impl Iterator<Item = f64>, below: f64, above: f64) -> std::ops::Range<f64> {
    let (low, high) = values
        .filter(|value| value.is_finite() && *value > 0.0)
        .fold((f64::INFINITY, 0f64), |(low, high), value| {
            (low.min(value), high.max(value))
        });
    if low > high {
        return 0.1..10.0;
    }
    low / below..high * above
}

fn read_side(series: &Series, subtitle: &str, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let max_threads = series
        .read_rates
        .iter()
        .map(|point| point.threads)
        .max()
        .unwrap_or(1) as f64;
    // Room below the lowest rate for the legend.
    let rates = log_range(
        series
            .read_rates
            .iter()
            .map(|point| point.million_per_second),
        12.0,
        2.0,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Read-side throughput vs threads ({subtitle})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8f64..max_threads * 1.25).log_scale(), rates.log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("reader threads")
        .y_desc("read sections per second, millions (all threads)")
        .x_label_formatter(&|threads| axis_number(*threads))
        .y_label_formatter(&|rate| axis_number(*rate))
        .draw()
        .map_err(plot_error)?;
    let mut contenders: Vec<&str> = Vec::new();
    for point in &series.read_rates {
        if !contenders.contains(&point.contender.as_str()) {
            contenders.push(&point.contender);
        }
    }
    for (number, contender) in contenders.iter().enumerate() {
        let points: Vec<(f64, f64)> = series
            .read_rates
            .iter()
            .filter(|point| point.contender == *contender)
            .map(|point| (point.threads as f64, point.million_per_second))
            .collect();
        draw_line(&mut chart, points, color(number), contender, true)?;
    }
    finish_legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present().map_err(plot_error)
}

fn blackout(series: &Series, subtitle: &str, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    const GIB: f64 = (1u64 << 30) as f64;
    let sizes = series.handover.iter().map(|point| point.size as f64 / GIB);
    let (smallest, largest) = sizes.fold((f64::INFINITY, 0f64), |(low, high), size| {
        (low.min(size), high.max(size))
    });
    // Room above the copy baseline for the legend.
    let times = log_range(
        series.handover.iter().map(|point| point.blackout_ms),
        2.0,
        100.0,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Live-update blackout vs guest size ({subtitle})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (smallest / 1.3..largest * 1.3).log_scale(),
            times.log_scale(),
        )
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("populated guest memory, GiB")
        .y_desc("blackout, ms (copy: out + in)")
        .x_label_formatter(&|size| axis_number(*size))
        .y_label_formatter(&|time| axis_number(*time))
        .draw()
        .map_err(plot_error)?;
    let mut lines: Vec<(&str, &str)> = Vec::new();
    for point in &series.handover {
        let key = (point.backend.as_str(), point.transport.as_str());
        if !lines.contains(&key) {
            lines.push(key);
        }
    }
    for (number, (backend, transport)) in lines.iter().enumerate() {
        let points: Vec<(f64, f64)> = series
            .handover
            .iter()
            .filter(|point| point.backend == *backend && point.transport == *transport)
            .map(|point| (point.size as f64 / GIB, point.blackout_ms))
            .collect();
        let label = if *transport == "copy" {
            format!("{backend}: copy out + in (baseline)")
        } else {
            format!("{backend}: {transport}")
        };
        draw_line(&mut chart, points, color(number), &label, true)?;
    }
    finish_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_error)
}

/// An axis label: whole numbers without decimals, others with up to three.
fn axis_number(value: f64) -> String {
    if (value - value.round()).abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// The empirical CDF of `samples`: (value, fraction at or below it).
fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = samples
        .iter()
        .copied()
        .filter(|value| value.is_finite() && *value > 0.0)
        .collect();
    sorted.sort_by(f64::total_cmp);
    let count = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .map(|(rank, value)| (*value, (rank + 1) as f64 / count))
        .collect()
}

fn freeze_latency(
    series: &Series,
    threads: usize,
    subtitle: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let latencies = log_range(
        series
            .freeze_idle_us
            .iter()
            .chain(&series.freeze_faulting_us)
            .copied(),
        2.0,
        2.0,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("freeze(true) latency distribution ({subtitle})"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(latencies.log_scale(), 0f64..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("freeze(true) latency, µs")
        .y_desc("fraction of freezes at or below")
        .x_label_formatter(&|latency| axis_number(*latency))
        .draw()
        .map_err(plot_error)?;
    draw_line(
        &mut chart,
        cdf(&series.freeze_idle_us),
        color(0),
        "idle file",
        false,
    )?;
    draw_line(
        &mut chart,
        cdf(&series.freeze_faulting_us),
        color(1),
        &format!("while {threads} threads fault"),
        false,
    )?;
    finish_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(plot_error)
}

type Chart<'a, X, Y> = ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>;

/// A labelled line through `points`, with a dot on each when `markers`.
fn draw_line<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    label: &str,
    markers: bool,
) -> anyhow::Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    let style = color.stroke_width(2);
    chart
        .draw_series(LineSeries::new(points.clone(), style))
        .map_err(plot_error)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    if markers {
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|point| Circle::new(point, 3, color.filled())),
            )
            .map_err(plot_error)?;
    }
    Ok(())
}

fn finish_legend<X, Y>(
    chart: &mut Chart<'_, X, Y>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cdf_rises_to_one_in_sorted_order() {
        let points = cdf(&[3.0, 1.0, 2.0, f64::NAN]);
        assert_eq!(points, vec![(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]);
    }

    #[test]
    fn axis_numbers_drop_needless_decimals() {
        assert_eq!(axis_number(8.0), "8");
        assert_eq!(axis_number(0.125), "0.125");
        assert_eq!(axis_number(0.25), "0.25");
    }

    #[test]
    fn a_log_range_brackets_the_positive_values() {
        let range = log_range([0.0, 2.0, 8.0].into_iter(), 2.0, 2.0);
        assert_eq!(range, 1.0..16.0);
    }
}
