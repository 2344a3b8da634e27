//! The plot: throughput against concurrency, one line per client, both axes logarithmic (the
//! stores differ by two orders of magnitude). leasehold's lines are solid; its peers on the
//! same store are dashed, in the same colour; the legend is a column to the right.

use std::error::Error;
use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{thousands, Client, Report, Series, Store};

pub fn draw(path: &Path, report: &Report) -> Result<(), Box<dyn Error>> {
    let series = &report.throughput;
    let points = || series.iter().flat_map(|s| &s.points);
    let tasks: Vec<f64> = series
        .first()
        .map(|s| s.points.iter().map(|p| p.tasks as f64).collect())
        .unwrap_or_default();
    let (x_min, x_max) = (tasks.first().copied(), tasks.last().copied());
    let (x_min, x_max) = (x_min.unwrap_or(1.0), x_max.unwrap_or(1.0));
    let y_min = points().map(|p| p.cycles_per_sec).fold(f64::MAX, f64::min);
    let y_max = points().map(|p| p.cycles_per_sec).fold(1.0, f64::max);

    let root = SVGBackend::new(path, (1160, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "leasehold: lock+release cycles/s against concurrency ({} run, {} cores)",
        report.mode, report.cores
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    // The legend gets a column of its own: inside the chart it would hide some line.
    let (plot_area, legend_area) = root.split_horizontally(880);
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x_min * 0.8..x_max * 1.25)
                .log_scale()
                .with_key_points(tasks),
            (y_min * 0.6..y_max * 1.6).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("concurrent tasks, each on a key of its own")
        .y_desc("lock+release cycles/s")
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| thousands(*y))
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let color = color(s);
        let style = color.stroke_width(2);
        let line: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|p| (p.tasks as f64, p.cycles_per_sec))
            .collect();
        let sample = [(0, 0), (28, 0)];
        let row = |x: i32| (x, 40 + 26 * i as i32);
        let label_at = row(48);
        if s.client == Client::Leasehold {
            chart.draw_series(LineSeries::new(line.clone(), style))?;
            legend_area.draw(&(EmptyElement::at(row(10)) + PathElement::new(sample, style)))?;
        } else {
            chart.draw_series(DashedLineSeries::new(line.clone(), 8, 5, style))?;
            let dashes = DashedPathElement::new(sample, 6, 3, style);
            legend_area.draw(&(EmptyElement::at(row(10)) + dashes))?;
        }
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        let font =
            TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        legend_area.draw(&Text::new(s.name.as_str(), label_at, font))?;
    }
    root.present()?;
    Ok(())
}

/// One colour per store; rslock, the other Redis client, in its own.
fn color(series: &Series) -> RGBColor {
    match (series.client, series.store) {
        (Client::Rslock, _) => RGBColor(230, 140, 0),
        (_, Store::Memory) => RGBColor(40, 40, 40),
        (_, Store::Redis) => RGBColor(200, 30, 40),
        (_, Store::EtcdTxn) => RGBColor(30, 90, 200),
        (_, Store::EtcdLock) => RGBColor(20, 150, 80),
    }
}
