//! Line charts as standalone SVG for `temper report`: no plotting dependency, and the output
//! renders inline in the HTML report and in any browser.

use std::collections::BTreeMap;
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

/// The mapping from data to pixels of one chart's plot area.
struct Axes {
    x: (f64, f64),
    y: (f64, f64),
}

impl Axes {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y.0) / (self.y.1 - self.y.0) * (H - TOP - BOTTOM)
    }
    fn point(&self, (x, y): (f64, f64)) -> String {
        format!("{:.1},{:.1}", self.px(x), self.py(y))
    }
}

/// The axes over every finite point, or None when there is none.
fn axes<'a>(points: impl Iterator<Item = &'a (f64, f64)> + Clone) -> Option<Axes> {
    let finite = points.filter(|(x, y)| x.is_finite() && y.is_finite());
    Some(Axes {
        x: range(finite.clone().map(|p| p.0))?,
        y: range(finite.map(|p| p.1))?,
    })
}

/// The chart's frame: `title` on top, the y-axis labelled at min, middle and max with
/// gridlines, the x-axis (step) at its ends.
fn frame(title: &str, a: &Axes) -> String {
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
    let (y0, y1) = a.y;
    for y in [y0, (y0 + y1) / 2.0, y1] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 4.0,
            a.py(y) + 3.0,
            label(y),
            py = a.py(y)
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="{}" text-anchor="start">{}</text><text x="{}" y="{}" text-anchor="end">step {}</text>"##,
        H - 8.0,
        step_label(a.x.0),
        W - RIGHT,
        H - 8.0,
        step_label(a.x.1)
    );
    svg
}

/// Runs of consecutive finite points: a non-finite value (a NaN loss, logged as null) breaks
/// the line, so it shows as a gap rather than being bridged.
fn segments(points: &[(f64, f64)]) -> Vec<&[(f64, f64)]> {
    points
        .split(|(x, y)| !(x.is_finite() && y.is_finite()))
        .filter(|run| !run.is_empty())
        .collect()
}

/// One series: its line (broken at non-finite values), its points when there are few, and
/// its label (the `label`-th in the legend) when the chart has several.
fn draw_series(svg: &mut String, s: &Series, label: Option<usize>, a: &Axes, width: f64) {
    let runs = segments(&s.points);
    for run in &runs {
        if run.len() > 1 {
            let path: Vec<String> = run.iter().map(|&p| a.point(p)).collect();
            let _ = write!(
                svg,
                r##"<polyline fill="none" stroke="{}" stroke-width="{width}" points="{}"/>"##,
                s.color,
                path.join(" ")
            );
        }
    }
    let count: usize = runs.iter().map(|r| r.len()).sum();
    for run in &runs {
        // Few points: each drawn; many: only the isolated ones a gap left without a line.
        if count <= 24 || run.len() == 1 {
            for &(x, y) in *run {
                let _ = write!(
                    svg,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"##,
                    a.px(x),
                    a.py(y),
                    s.color
                );
            }
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

/// A line per series against steps. None when no series has a finite point.
pub fn line_chart(title: &str, series: &[Series]) -> Option<String> {
    let a = axes(series.iter().flat_map(|s| s.points.iter()))?;
    let mut svg = frame(title, &a);
    for (i, s) in series.iter().enumerate() {
        let label = (series.len() > 1).then_some(i);
        draw_series(&mut svg, s, label, &a, 1.5);
    }
    svg.push_str("</svg>");
    Some(svg)
}

/// Mean and standard deviation across `branches` at every step where at least two of them
/// have a finite value, in step order.
pub fn band(branches: &[Series]) -> Vec<(f64, f64, f64)> {
    let mut by_step: BTreeMap<i64, (f64, Vec<f64>)> = BTreeMap::new();
    for s in branches {
        for &(x, y) in &s.points {
            if x.is_finite() && y.is_finite() {
                // Steps are integers; keyed in thousandths so fractional ones still group.
                let e = by_step
                    .entry((x * 1000.0).round() as i64)
                    .or_insert((x, vec![]));
                e.1.push(y);
            }
        }
    }
    by_step
        .into_values()
        .filter(|(_, ys)| ys.len() >= 2)
        .map(|(x, ys)| {
            let (mean, std, _) = crate::views::compare::mean_std(&ys);
            (x, mean, std)
        })
        .collect()
}

/// The branches of a sweep in one chart: each branch a thin line, their mean as a thick one
/// inside a shaded band of ± one standard deviation. None without a finite point.
pub fn band_chart(title: &str, color: &'static str, branches: &[Series]) -> Option<String> {
    let stats = band(branches);
    let edges: Vec<(f64, f64)> = stats
        .iter()
        .flat_map(|&(x, m, s)| [(x, m - s), (x, m + s)])
        .collect();
    let a = axes(branches.iter().flat_map(|s| s.points.iter()).chain(&edges))?;
    let mut svg = frame(title, &a);
    if stats.len() > 1 {
        let upper = stats.iter().map(|&(x, m, s)| a.point((x, m + s)));
        let lower = stats.iter().rev().map(|&(x, m, s)| a.point((x, m - s)));
        let outline: Vec<String> = upper.chain(lower).collect();
        let _ = write!(
            svg,
            r##"<polygon class="band" fill="{color}" fill-opacity="0.18" stroke="none" points="{}"/>"##,
            outline.join(" ")
        );
    }
    for s in branches {
        let thin = Series {
            label: s.label.clone(),
            color: "#999",
            points: s.points.clone(),
        };
        draw_series(&mut svg, &thin, None, &a, 0.8);
    }
    let mean = Series {
        label: format!("mean ± std of {}", branches.len()),
        color,
        points: stats.iter().map(|&(x, m, _)| (x, m)).collect(),
    };
    draw_series(&mut svg, &mean, Some(0), &a, 2.0);
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
        // A NaN in the middle of a long run breaks the line into two: a gap, not a bridge.
        let mut long: Vec<(f64, f64)> = (0..40).map(|i| (i as f64, i as f64)).collect();
        long[20].1 = f64::NAN;
        let svg = line_chart("loss", &[series(long)]).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(!svg.contains("NaN"));
        assert!(line_chart("kl", &[series(vec![(0.0, f64::INFINITY)])]).is_none());
        assert!(line_chart("<b>", &[series(vec![(0.0, 1.0)])])
            .unwrap()
            .contains("&lt;b&gt;"));
    }

    #[test]
    fn a_band_is_mean_plus_minus_std_over_the_steps_branches_share() {
        let a = series(vec![(0.0, 1.0), (10.0, 3.0), (20.0, 5.0)]);
        let b = series(vec![(0.0, 3.0), (10.0, 5.0)]);
        let stats = band(&[a, b]);
        // Step 20 has one branch only: no band there.
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].0, 0.0);
        assert!((stats[0].1 - 2.0).abs() < 1e-12);
        // Sample std of {1, 3} is sqrt(2).
        assert!((stats[0].2 - 2f64.sqrt()).abs() < 1e-12, "{stats:?}");
        let svg = band_chart(
            "accuracy",
            "#c00",
            &[
                series(vec![(0.0, 1.0), (1.0, 2.0)]),
                series(vec![(0.0, 2.0), (1.0, 4.0)]),
            ],
        )
        .unwrap();
        assert_eq!(svg.matches("class=\"band\"").count(), 1);
        assert_eq!(
            svg.matches("<polyline").count(),
            3,
            "two branches and the mean"
        );
    }
}
