//! The plot: throughput against concurrency, one line per client, both axes logarithmic (the
//! stores differ by two orders of magnitude). leasehold's lines are solid; its peers on the
//! same store are dashed, in the same colour; the legend is a column to the right. Below, a
//! panel gives the Redis comparison in figures: leasehold's ratios to rslock, to the plain raw
//! lock and to its own scripts without actors; CPU per cycle of the process and of
//! redis-server; and the uncontended cycle's p50/p99.

use std::error::Error;
use std::path::Path;

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{thousands, Client, Point, Report, Series, Store};

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

    let root = SVGBackend::new(path, (1160, 940)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "leasehold: lock+release cycles/s against concurrency ({} run, {} cores)",
        report.mode, report.cores
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (top, panel) = root.split_vertically(610);
    // The legend gets a column of its own: inside the chart it would hide some line.
    let (plot_area, legend_area) = top.split_horizontally(880);
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
    // One text element per cell: SVG collapses runs of spaces, so columns are placed, not
    // padded. The first column is left-aligned, the figures right-aligned.
    let left = TextStyle::from(("sans-serif", 13).into_font());
    let right = left.pos(Pos::new(HPos::Right, VPos::Top));
    for (i, row) in redis_panel(series).iter().enumerate() {
        let y = 8 + 18 * i as i32;
        for (j, cell) in row.iter().enumerate() {
            if j == 0 {
                // A label under a heading is indented (leading spaces would collapse).
                let x = if cell.starts_with(' ') { 40 } else { 24 };
                panel.draw(&Text::new(cell.trim_start(), (x, y), left.clone()))?;
            } else {
                let x = 380 + 120 * j as i32;
                panel.draw(&Text::new(cell.as_str(), (x, y), right.clone()))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// The Redis comparison as rows of cells: a label, then one figure per concurrency.
fn redis_panel(series: &[Series]) -> Vec<Vec<String>> {
    let redis: Vec<&Series> = series.iter().filter(|s| s.store == Store::Redis).collect();
    let Some(ours) = redis.iter().find(|s| s.client == Client::Leasehold) else {
        return Vec::new();
    };
    let row = |label: String, cells: Vec<String>| [vec![label], cells].concat();
    let mut rows = vec![row(
        "Redis, medians of the rounds of one run:  tasks".to_owned(),
        ours.points.iter().map(|p| p.tasks.to_string()).collect(),
    )];
    type Ratio = fn(&Point) -> Option<f64>;
    let ratios: [(&str, Ratio); 3] = [
        ("throughput leasehold / rslock", |p| p.vs_rslock),
        ("throughput leasehold / plain raw lock", |p| p.vs_plain_raw),
        ("throughput leasehold / its scripts, no actors", |p| {
            p.vs_raw
        }),
    ];
    for (name, ratio) in ratios {
        let cells = ours
            .points
            .iter()
            .map(|p| ratio(p).map_or("-".to_owned(), |r| format!("{r:.2}")))
            .collect();
        rows.push(row(name.to_owned(), cells));
    }
    rows.push(vec!["CPU per cycle, µs: process + redis-server".to_owned()]);
    for s in &redis {
        let cells = s
            .points
            .iter()
            .map(|p| match p.server_cpu_us_per_cycle {
                Some(server) => format!("{:.1} + {server:.1}", p.client_cpu_us_per_cycle),
                None => format!("{:.1}", p.client_cpu_us_per_cycle),
            })
            .collect();
        rows.push(row(format!("    {}", s.name), cells));
    }
    rows.push(vec!["uncontended cycle (1 task), µs".to_owned()]);
    for s in &redis {
        if let Some((p50, p99)) = s.points.iter().find_map(|p| p.p50_us.zip(p.p99_us)) {
            let cells = vec![format!("p50 {p50:.0}"), format!("p99 {p99:.0}")];
            rows.push(row(format!("    {}", s.name), cells));
        }
    }
    rows
}

/// One colour per store; rslock, the other Redis client, in its own.
fn color(series: &Series) -> RGBColor {
    match (series.client, series.store) {
        (Client::Rslock, _) => RGBColor(230, 140, 0),
        (Client::PlainRaw, _) => RGBColor(140, 60, 180),
        (_, Store::Memory) => RGBColor(40, 40, 40),
        (_, Store::Redis) => RGBColor(200, 30, 40),
        (_, Store::EtcdTxn) => RGBColor(30, 90, 200),
        (_, Store::EtcdLock) => RGBColor(20, 150, 80),
        (_, Store::EtcdSession) => RGBColor(0, 170, 190),
    }
}
