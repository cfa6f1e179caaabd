//! Line charts as standalone SVG for `temper report`: no plotting dependency, and the output
//! renders inline in the HTML report and in any browser.

use std::fmt::Write;

pub struct Series {
    pub label: String,
    pub color: &'static str,
    /// (step, value) pairs; non-finite values are left out (a gap, not a crash).
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 300.0;
const H: f64 = 180.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 26.0;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A short label for an axis value: 3 significant digits, k/M for large, e-notation for tiny.
fn label(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.3}M", x / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}

fn step_label(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        label(x)
    }
}

/// The range of `values`, widened when flat so a constant series still draws mid-chart.
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return None;
    }
    if hi - lo < 1e-12 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.05 };
        return Some((lo - pad, hi + pad));
    }
    Some((lo, hi))
}

/// One chart: `title` on top, a line per series (dots where a series has few points), the
/// y-axis labelled at min, middle and max, the x-axis (step) at its ends. None when no series
/// has a finite point.
/// One series: its line, its points when there are few, and its label (the `label`-th in the
/// legend) when the chart has several.
fn draw_series(
    svg: &mut String,
    s: &Series,
    pts: &[(f64, f64)],
    label: Option<usize>,
    px: &dyn Fn(f64) -> f64,
    py: &dyn Fn(f64) -> f64,
) {
    if pts.is_empty() {
        return;
    }
    if pts.len() > 1 {
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"##,
            s.color,
            path.join(" ")
        );
    }
    if pts.len() <= 24 {
        for &(x, y) in pts {
            let _ = write!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"##,
                px(x),
                py(y),
                s.color
            );
        }
    }
    if let Some(i) = label {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end" fill="{}">{}</text>"##,
            W - RIGHT,
            14.0 + 11.0 * i as f64,
            s.color,
            escape(&s.label)
        );
    }
}

/// A chart of one metric against another (not against steps): points joined in order.
pub fn xy_chart(title: &str, x_label: &str, series: &[Series]) -> Option<String> {
    let svg = line_chart(title, series)?;
    // Same drawing; the x axis names its metric instead of "step".
    Some(svg.replace(">step ", &format!(">{} ", escape(x_label))))
}

pub fn line_chart(title: &str, series: &[Series]) -> Option<String> {
    let finite = |s: &Series| -> Vec<(f64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    };
    let clean: Vec<Vec<(f64, f64)>> = series.iter().map(finite).collect();
    let all = || clean.iter().flatten();
    let (x0, x1) = range(all().map(|p| p.0))?;
    let (y0, y1) = range(all().map(|p| p.1))?;
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="10">"##
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="14" font-size="12" font-weight="bold">{}</text>"##,
        escape(title)
    );
    // Axes and the three y gridlines.
    for y in [y0, (y0 + y1) / 2.0, y1] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            py(y) + 3.0,
            label(y),
            py = py(y)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="{}" text-anchor="start">{}</text><text x="{}" y="{}" text-anchor="end">step {}</text>"##,
        H - 8.0,
        step_label(x0),
        W - RIGHT,
        H - 8.0,
        step_label(x1)
    );
    for (i, (s, pts)) in series.iter().zip(&clean).enumerate() {
        let label = (series.len() > 1).then_some(i);
        draw_series(&mut svg, s, pts, label, &px, &py);
    }
    svg.push_str("</svg>");
    Some(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: Vec<(f64, f64)>) -> Series {
        Series {
            label: "eval".into(),
            color: "#c00",
            points,
        }
    }

    #[test]
    fn a_chart_maps_the_extremes_to_the_plot_corners() {
        let svg = line_chart("loss", &[series(vec![(0.0, 2.0), (10.0, 1.0)])]).unwrap();
        // (0, 2) is top-left of the plot area, (10, 1) bottom-right.
        let top_left = format!("{LEFT:.1},{TOP:.1}");
        let bottom_right = format!("{:.1},{:.1}", W - RIGHT, H - BOTTOM);
        assert!(
            svg.contains(&format!("points=\"{top_left} {bottom_right}\"")),
            "{svg}"
        );
        assert!(svg.contains(">loss</text>") && svg.contains(">step 10</text>"));
    }

    #[test]
    fn non_finite_points_are_skipped_and_empty_charts_are_none() {
        let svg = line_chart("kl", &[series(vec![(0.0, f64::NAN), (1.0, 0.5)])]).unwrap();
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(!svg.contains("NaN"));
        assert!(line_chart("kl", &[series(vec![(0.0, f64::INFINITY)])]).is_none());
        assert!(line_chart("<b>", &[series(vec![(0.0, 1.0)])])
            .unwrap()
            .contains("&lt;b&gt;"));
    }
}
