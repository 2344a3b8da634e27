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

    let root = SVGBackend::new(path, (1160, 900)).into_drawing_area();
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
    let font = TextStyle::from(("monospace", 13).into_font());
    for (i, line) in redis_panel(series).iter().enumerate() {
        panel.draw(&Text::new(
            line.as_str(),
            (24, 12 + 18 * i as i32),
            font.clone(),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// The Redis comparison as lines of text: ratios, CPU per cycle, uncontended latency.
fn redis_panel(series: &[Series]) -> Vec<String> {
    let redis: Vec<&Series> = series.iter().filter(|s| s.store == Store::Redis).collect();
    let Some(ours) = redis.iter().find(|s| s.client == Client::Leasehold) else {
        return Vec::new();
    };
    let cell = |v: Option<f64>, digits: usize| {
        v.map_or(format!("{:>12}", "-"), |v| format!("{v:>12.digits$}"))
    };
    let tasks: String = ours
        .points
        .iter()
        .map(|p| format!("{:>12}", p.tasks))
        .collect();
    let mut lines = vec![format!(
        "{:<44}{tasks}  (tasks; medians of the rounds, one run)",
        "Redis: leasehold against its peers"
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
        let row: String = ours.points.iter().map(|p| cell(ratio(p), 2)).collect();
        lines.push(format!("{name:<44}{row}"));
    }
    lines.push("CPU per cycle, µs: process + redis-server".to_owned());
    for s in &redis {
        let row: String = s
            .points
            .iter()
            .map(|p| {
                let server = p.server_cpu_us_per_cycle.unwrap_or(f64::NAN);
                format!(
                    "{:>12}",
                    format!("{:.1}+{server:.1}", p.client_cpu_us_per_cycle)
                )
            })
            .collect();
        lines.push(format!("  {:<42}{row}", s.name));
    }
    lines.push("uncontended cycle (1 task), µs".to_owned());
    for s in &redis {
        if let Some((p50, p99)) = s.points.iter().find_map(|p| p.p50_us.zip(p.p99_us)) {
            lines.push(format!(
                "  {:<42}{:>12}{:>12}",
                s.name,
                format!("p50 {p50:.0}"),
                format!("p99 {p99:.0}")
            ));
        }
    }
    lines
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
    }
}
