//! Charts drawn with plotters into self-contained SVG: the policy comparison (balancedness against
//! replica memory) and per-layer x per-GPU load heatmaps.

use plotters::prelude::*;

/// One line of a comparison chart: `(x, y)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

fn plot_err<E: std::fmt::Display>(e: E) -> String {
    format!("drawing the chart: {e}")
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A line chart as an SVG string.
pub fn line_chart_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let pts = series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let xpad = ((x1 - x0) * 0.05).max(1e-3);
        let ypad = ((y1 - y0) * 0.1).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(plot_err)?;
        for (i, s) in series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(plot_err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 4, c.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Colour for a load relative to the mean: white at the mean, red above, blue below.
fn heat(rel: f64) -> RGBColor {
    let t = (rel - 1.0).clamp(-1.0, 1.0);
    if t >= 0.0 {
        let k = (255.0 * (1.0 - t)) as u8;
        RGBColor(255, k, k)
    } else {
        let k = (255.0 * (1.0 + t)) as u8;
        RGBColor(k, k, 255)
    }
}

/// A heatmap panel: rows are layers, columns GPUs, values are loads relative to the row's mean.
pub struct Heatmap {
    pub title: String,
    pub row_labels: Vec<String>,
    /// `values[row][gpu]`, already divided by the row mean.
    pub values: Vec<Vec<f64>>,
}

/// Heatmaps stacked side by side in one SVG.
pub fn heatmaps_svg(panels: &[Heatmap]) -> Result<String, String> {
    let mut svg = String::new();
    let rows = panels
        .iter()
        .map(|p| p.values.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let height = (rows * 10 + 120).clamp(300, 1400) as u32;
    {
        let root = SVGBackend::with_string(&mut svg, (520 * panels.len().max(1) as u32, height))
            .into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, p) in areas.iter().zip(panels) {
            let cols = p.values.first().map_or(1, Vec::len).max(1);
            let nrows = p.values.len().max(1);
            let mut chart = ChartBuilder::on(area)
                .caption(&p.title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0..cols, 0..nrows)
                .map_err(plot_err)?;
            let labels = p.row_labels.clone();
            chart
                .configure_mesh()
                .disable_mesh()
                .x_desc("GPU")
                .y_desc("MoE layer")
                .y_label_formatter(&move |r| labels.get(*r).cloned().unwrap_or_default())
                .draw()
                .map_err(plot_err)?;
            chart
                .draw_series(p.values.iter().enumerate().flat_map(|(r, row)| {
                    row.iter().enumerate().map(move |(g, &v)| {
                        Rectangle::new([(g, r), (g + 1, r + 1)], heat(v).filled())
                    })
                }))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_render_to_svg() {
        let svg = line_chart_svg(
            "t",
            "x",
            "y",
            &[Series {
                name: "craft".into(),
                points: vec![(0.0, 0.5), (1.0, 0.8)],
            }],
        )
        .unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("craft"));
        let h = heatmaps_svg(&[Heatmap {
            title: "before".into(),
            row_labels: vec!["3".into()],
            values: vec![vec![0.5, 1.5]],
        }])
        .unwrap();
        assert!(h.contains("<rect"));
    }
}
