//! Plots as PNG and SVG (plotters, with an embedded DejaVu Sans so nothing depends on the
//! machine's fonts): line charts, reliability diagrams, the focal-loss curve.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::fsutil::atomic_write;
use crate::metrics::Diagram;

const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
const SIZE: (u32, u32) = (900, 560);

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // the embedded font parses; a failure would only lose the text
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// A named line of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn colour(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

/// Renders `draw` to `<stem>.png` and `<stem>.svg`, each written atomically.
fn render(
    stem: &Path,
    size: (u32, u32),
    draw: impl Fn(DrawingArea<SVGBackend, Shift>) -> Result<()>,
    draw_png: impl Fn(DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    register();
    let mut svg = String::new();
    draw(SVGBackend::with_string(&mut svg, size).into_drawing_area())?;
    atomic_write(&stem.with_extension("svg"), svg.as_bytes())?;
    let mut pixels = vec![0u8; (size.0 * size.1 * 3) as usize];
    draw_png(BitMapBackend::with_buffer(&mut pixels, size).into_drawing_area())?;
    let img =
        image::RgbImage::from_raw(size.0, size.1, pixels).ok_or_else(|| anyhow!("plot buffer"))?;
    let mut png = std::io::Cursor::new(vec![]);
    img.write_to(&mut png, image::ImageFormat::Png)?;
    atomic_write(&stem.with_extension("png"), png.get_ref())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// One line chart: a title, axis labels, its series and an optional fixed y range.
#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub labels: (String, String),
    pub series: Vec<Series>,
    pub y_range: Option<(f64, f64)>,
}

fn draw_chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &Chart) -> Result<()> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = c.y_range.unwrap_or_else(|| {
        let (a, b) = all
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let pad = ((b - a) * 0.05).max(1e-6);
        (a - pad, b + pad)
    });
    let (x0, x1, y0, y1) = if all.is_empty() {
        (0.0, 1.0, 0.0, 1.0)
    } else if x0 == x1 {
        (x0 - 1.0, x1 + 1.0, y0, y1)
    } else {
        (x0, x1, y0, y1)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&c.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(c.labels.0.as_str())
        .y_desc(c.labels.1.as_str())
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, s) in c.series.iter().enumerate() {
        let colour = colour(i);
        chart
            .draw_series(LineSeries::new(
                s.points.iter().filter(finite).copied(),
                colour.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn draw_charts<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    charts: &[Chart],
    columns: usize,
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let rows = charts.len().div_ceil(columns).max(1);
    for (cell, chart) in root.split_evenly((rows, columns)).iter().zip(charts) {
        draw_chart(cell, chart)?;
    }
    root.present().map_err(err)
}

/// Line charts on a grid of `columns`, as `<stem>.png` and `<stem>.svg`.
pub fn charts(stem: &Path, charts: &[Chart], columns: usize) -> Result<()> {
    let columns = columns.clamp(1, charts.len().max(1));
    let rows = charts.len().div_ceil(columns).max(1) as u32;
    let size = if charts.len() <= 1 {
        SIZE
    } else {
        (560 * columns as u32, 400 * rows)
    };
    render(
        stem,
        size,
        |a| draw_charts(a, charts, columns),
        |a| draw_charts(a, charts, columns),
    )
}

/// A line chart with a legend, as `<stem>.png` and `<stem>.svg`.
pub fn lines(
    stem: &Path,
    title: &str,
    labels: (&str, &str),
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let chart = Chart {
        title: title.into(),
        labels: (labels.0.into(), labels.1.into()),
        series: series.to_vec(),
        y_range,
    };
    charts(stem, &[chart], 1)
}

/// A panel on the unit square with its diagonal: bars `[x0, x1] × [0, y]` and points.
struct UnitPanel {
    title: String,
    bars: Vec<(f64, f64, f64)>,
    points: Vec<(f64, f64)>,
}

fn draw_unit_panels<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    panels: &[UnitPanel],
    labels: (&str, &str),
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let cells = root.split_evenly((1, panels.len().max(1)));
    for (i, (cell, panel)) in cells.iter().zip(panels).enumerate() {
        let mut chart = ChartBuilder::on(cell)
            .caption(&panel.title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(labels.0)
            .y_desc(if i == 0 { labels.1 } else { "" })
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                vec![(0.0, 0.0), (1.0, 1.0)],
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(err)?;
        let c = colour(i);
        chart
            .draw_series(
                panel
                    .bars
                    .iter()
                    .map(|&(x0, x1, y)| Rectangle::new([(x0, 0.0), (x1, y)], c.mix(0.7).filled())),
            )
            .map_err(err)?;
        // points over bars in black, alone in the panel's colour
        let dot = if panel.bars.is_empty() { c } else { BLACK };
        chart
            .draw_series(
                panel
                    .points
                    .iter()
                    .map(|&p| Circle::new(p, 3, dot.filled())),
            )
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// Renders unit-square panels side by side as `<stem>.png` and `<stem>.svg`.
fn unit_panels(stem: &Path, panels: &[UnitPanel], labels: (&str, &str)) -> Result<()> {
    let size = (320 * panels.len().max(1) as u32, 340);
    render(
        stem,
        size,
        |a| draw_unit_panels(a, panels, labels),
        |a| draw_unit_panels(a, panels, labels),
    )
}

/// Reliability diagrams side by side (accuracy per confidence bin; the diagonal is perfect
/// calibration), as `<stem>.png` and `<stem>.svg`.
pub fn reliability(stem: &Path, panels: &[(String, Diagram)]) -> Result<()> {
    let panels: Vec<UnitPanel> = panels
        .iter()
        .map(|(name, bins)| UnitPanel {
            title: name.clone(),
            // one bar per bin of 1/15, at the bin's accuracy
            bars: bins
                .iter()
                .map(|&(conf, acc, _)| {
                    let b = (conf * 15.0).floor().min(14.0) / 15.0;
                    (b + 0.005, b + 1.0 / 15.0 - 0.005, acc)
                })
                .collect(),
            points: bins.iter().map(|&(conf, acc, _)| (conf, acc)).collect(),
        })
        .collect();
    unit_panels(stem, &panels, ("confidence", "accuracy"))
}

/// Paired per-image scores: one panel per (title, points (x: the reference's score, y: the
/// other's)); points under the diagonal are images where the reference scores higher.
pub fn paired(
    stem: &Path,
    panels: &[(String, Vec<(f64, f64)>)],
    labels: (&str, &str),
) -> Result<()> {
    let panels: Vec<UnitPanel> = panels
        .iter()
        .map(|(title, points)| UnitPanel {
            title: title.clone(),
            bars: vec![],
            points: points.clone(),
        })
        .collect();
    unit_panels(stem, &panels, labels)
}

/// The focal-loss paper's figure: `FL(p_t) = −(1 − p_t)^γ log p_t` against p_t for each γ
/// (γ = 0 is cross-entropy).
pub fn focal_curve(stem: &Path, gammas: &[f64]) -> Result<()> {
    let series: Vec<Series> = gammas
        .iter()
        .map(|&g| Series {
            name: if g == 0.0 {
                "γ = 0 (cross-entropy)".into()
            } else {
                format!("γ = {g}")
            },
            points: (1..=200)
                .map(|i| {
                    let p = i as f64 / 200.0;
                    (p, -(1.0 - p).powf(g) * p.ln())
                })
                .collect(),
        })
        .collect();
    lines(
        stem,
        "Focal loss FL(p_t) = −(1 − p_t)^γ log p_t",
        ("probability of the true class p_t", "loss"),
        &series,
        Some((0.0, 5.0)),
    )
}
