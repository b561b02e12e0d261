//! The SVG charts next to docs/benchmarks.md, all drawn by one bar chart.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::over_rounds;
use crate::{
    contenders::Contender,
    flood::{Attack, Phase},
    kernel_cost::CostRow,
    latency::Latency,
    stats::Spread,
};

/// One horizontal bar per row: the median, with a line over the range.
struct Bar {
    label: String,
    value: Spread,
    color: RGBColor,
}

fn bar_chart(title: &str, unit: &str, bars: &[Bar], path: &Path) -> Result<()> {
    let bars: Vec<&Bar> = bars.iter().filter(|b| b.value.runs > 0).collect();
    let max = bars.iter().map(|b| b.value.max).fold(1.0, f64::max) * 1.15;
    let height = 80 + 32 * bars.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, (0..bars.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.label.clone()),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (b.value.median, SegmentValue::Exact(i + 1)),
            ],
            b.color.mix(0.7).filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        PathElement::new(
            vec![
                (b.value.min, SegmentValue::CenterOf(i)),
                (b.value.max, SegmentValue::CenterOf(i)),
            ],
            BLACK.stroke_width(2),
        )
    }))?;
    root.present()?;
    Ok(())
}

const FLOOR_COLOR: RGBColor = RGBColor(60, 120, 200);
const PASS_COLOR: RGBColor = RGBColor(40, 160, 80);
const DROP_COLOR: RGBColor = RGBColor(210, 60, 50);
const CONTENDER_COLORS: [RGBColor; 5] = [
    RGBColor(120, 120, 120),
    RGBColor(230, 140, 30),
    RGBColor(60, 120, 200),
    RGBColor(40, 160, 80),
    RGBColor(150, 210, 160),
];

pub(super) fn cost_chart(rows: &[CostRow], path: &Path) -> Result<()> {
    let bars: Vec<Bar> = rows
        .iter()
        .map(|r| Bar {
            label: r.case.clone(),
            value: r.ns,
            color: match (r.case.starts_with("floor"), r.verdict) {
                (true, _) => FLOOR_COLOR,
                (false, "drop") => DROP_COLOR,
                _ => PASS_COLOR,
            },
        })
        .collect();
    bar_chart(
        "XDP cost per packet (BPF_PROG_TEST_RUN), median and range",
        "ns per packet",
        &bars,
        path,
    )
}

pub(super) fn flood_cpu_chart(phases: &[Phase], path: &Path) -> Result<()> {
    let bars: Vec<Bar> = Contender::ALL
        .iter()
        .zip(CONTENDER_COLORS)
        .map(|(&c, color)| Bar {
            label: c.name().to_string(),
            value: over_rounds(phases, c, Attack::SynFloodFullSpeed, |p| {
                p.softirq_ns_per_flood_packet()
            }),
            color,
        })
        .collect();
    bar_chart(
        "SYN flood at full speed: softirq CPU per flood packet, median and range",
        "ns per packet",
        &bars,
        path,
    )
}

pub(super) fn flood_chart(phases: &[Phase], path: &Path) -> Result<()> {
    let attacks = [Attack::Baseline, Attack::SynFlood, Attack::ByteFlood];
    // (At full speed each contender faces a different rate: not charted.)
    let colors = CONTENDER_COLORS;
    let width = 0.8 / Contender::ALL.len() as f64;
    let value = |c, a| over_rounds(phases, c, a, |p| p.rtt_p99_us / 1000.0);
    let max = attacks
        .iter()
        .flat_map(|&a| Contender::ALL.map(|c| value(c, a).max))
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Legitimate echo client p99 (ms), median and range over rounds",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..(attacks.len() as f64), 0.0..max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(attacks.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 1e-6 && i < attacks.len() {
                attacks[i].name().to_string()
            } else {
                String::new()
            }
        })
        .y_desc("p99 round trip, ms")
        .draw()?;
    for (k, c) in Contender::ALL.iter().enumerate() {
        let color = colors[k];
        let bars: Vec<_> = attacks
            .iter()
            .enumerate()
            .map(|(i, &a)| (i as f64 + 0.1 + width * k as f64, value(*c, a)))
            .collect();
        chart
            .draw_series(bars.iter().map(|(x, v)| {
                Rectangle::new(
                    [(*x, 0.0), (x + width * 0.9, v.median.max(0.0))],
                    color.mix(0.8).filled(),
                )
            }))?
            .label(c.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|(x, v)| {
            PathElement::new(
                vec![(x + width * 0.45, v.min), (x + width * 0.45, v.max)],
                BLACK.stroke_width(1),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

pub(super) fn latency_chart(latency: &Latency, path: &Path) -> Result<()> {
    let mut sorted = latency.samples_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let max = sorted.last().copied().unwrap_or(1.0).max(0.001) * 1.05;
    let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Rejected handshake: request to reset, cumulative share",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds")
        .y_desc("share of handshakes")
        .draw()?;
    let n = sorted.len().max(1) as f64;
    chart.draw_series(LineSeries::new(
        sorted
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, (i + 1) as f64 / n)),
        BLUE.stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}
