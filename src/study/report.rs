//! A study's results with their seed noise: groups of seeds (mean +- std), Welch's t-test between
//! compound scaling and the best single dimension at each FLOPs target, a markdown report and a
//! top-1-vs-FLOPs plot (the paper's Figure 3 and Figure 8 styles).

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;
use statrs::distribution::{ContinuousCDF, StudentsT};

use super::RunResult;
use super::plan::{Method, Multipliers};

/// Runs that differ only by seed.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub method: Method,
    pub target: f64,
    pub mult: Multipliers,
    pub phi: f64,
    pub resolution: usize,
    pub params: u64,
    pub macs: u64,
    pub achieved: f64,
    pub top1: Vec<f64>,
    pub seconds: Vec<f64>,
}

/// Mean and sample standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Welch's unequal-variance t-test: (t, degrees of freedom, two-sided p), or `None` with fewer
/// than two samples on a side or no variance at all.
pub fn welch(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let ((ma, sa), (mb, sb)) = (mean_std(a), mean_std(b));
    let (va, vb) = (sa * sa / a.len() as f64, sb * sb / b.len() as f64);
    if va + vb == 0.0 {
        return None;
    }
    let t = (ma - mb) / (va + vb).sqrt();
    let df =
        (va + vb).powi(2) / (va * va / (a.len() as f64 - 1.0) + vb * vb / (b.len() as f64 - 1.0));
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    Some((t, df, 2.0 * (1.0 - dist.cdf(t.abs()))))
}

/// Groups results by group name, in first-seen order.
pub fn groups(results: &[RunResult]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for r in results {
        match out.iter_mut().find(|g| g.name == r.group) {
            Some(g) => {
                g.top1.push(r.top1);
                g.seconds.push(r.seconds);
            }
            None => out.push(Group {
                name: r.group.clone(),
                method: r.method,
                target: r.target,
                mult: r.mult,
                phi: r.phi,
                resolution: r.resolution,
                params: r.params,
                macs: r.macs,
                achieved: r.achieved,
                top1: vec![r.top1],
                seconds: vec![r.seconds],
            }),
        }
    }
    out
}

/// The markdown table of every group.
pub fn table(groups: &[Group]) -> String {
    let mut s = String::from(
        "| group | method | depth | width | resolution | MFLOPs | x base | params | top-1 (mean +- std) | seeds | train s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for g in groups {
        let (m, sd) = mean_std(&g.top1);
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.3} | {} ({:.3}) | {:.1} | {:.2} | {} | {:.4} +- {:.4} | {} | {:.0} |",
            g.name,
            g.method.name(),
            g.mult.depth,
            g.mult.width,
            g.resolution,
            g.mult.resolution,
            2.0 * g.macs as f64 / 1e6,
            g.achieved,
            g.params,
            m,
            sd,
            g.top1.len(),
            mean_std(&g.seconds).0
        );
    }
    s
}

/// For each FLOPs target: compound against the best single dimension, with Welch's test.
pub fn compound_vs_single(groups: &[Group]) -> String {
    let mut targets: Vec<f64> = groups
        .iter()
        .filter(|g| g.method == Method::Compound)
        .map(|g| g.target)
        .collect();
    targets.dedup();
    let mut s = String::new();
    for t in targets {
        let at: Vec<&Group> = groups.iter().filter(|g| g.target == t).collect();
        let Some(compound) = at.iter().find(|g| g.method == Method::Compound) else {
            continue;
        };
        let Some(best) = at
            .iter()
            .filter(|g| g.method != Method::Compound)
            .max_by(|a, b| mean_std(&a.top1).0.total_cmp(&mean_std(&b.top1).0))
        else {
            continue;
        };
        let ((mc, _), (mb, _)) = (mean_std(&compound.top1), mean_std(&best.top1));
        let verdict = match welch(&compound.top1, &best.top1) {
            Some((tstat, df, p)) => {
                let beyond = if p < 0.05 {
                    "exceeds the seed noise (p < 0.05)"
                } else {
                    "is within the seed noise (p >= 0.05)"
                };
                format!("Welch t = {tstat:.2}, df = {df:.1}, p = {p:.3}: the difference {beyond}")
            }
            None => "too few seeds for a test".into(),
        };
        let _ = writeln!(
            s,
            "- {}x FLOPs: compound {:.4} vs best single dimension ({}) {:.4}, difference {:+.2} points; {verdict}.",
            super::plan::fmt_num(t),
            mc,
            best.method.name(),
            mb,
            100.0 * (mc - mb)
        );
    }
    s
}

/// One plotted series: a label and (x, mean top-1, std) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64, f64)>,
    /// Text beside each point (empty: none).
    pub point_labels: Vec<String>,
}

/// MFLOPs (2 x MACs) of a group.
pub fn mflops(g: &Group) -> f64 {
    2.0 * g.macs as f64 / 1e6
}

/// One series per scaling method (each starting from the base), x = MFLOPs: the paper's Figure 3
/// and Figure 8.
pub fn method_series(groups: &[Group]) -> Vec<Series> {
    let base = groups.iter().find(|g| g.method == Method::Base);
    Method::SCALING
        .iter()
        .filter(|m| groups.iter().any(|g| g.method == **m))
        .map(|&m| {
            let mut points: Vec<(f64, f64, f64)> = base
                .into_iter()
                .chain(groups.iter().filter(|g| g.method == m))
                .map(|g| {
                    let (mean, sd) = mean_std(&g.top1);
                    (mflops(g), mean, sd)
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label: m.name().into(),
                points,
                point_labels: Vec::new(),
            }
        })
        .collect()
}

/// Plots `series` (top-1 with a +-1 std error bar per point; joined by lines when `lines`).
pub fn plot(
    series: &[Series],
    (title, x_desc): (&str, &str),
    lines: bool,
    path: &Path,
) -> anyhow::Result<()> {
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, crate::train::plot::FONT);
    let (w, h) = (900u32, 560u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting: {e}");
    let all = || series.iter().flat_map(|s| &s.points);
    let x0 = all().map(|p| p.0).fold(f64::MAX, f64::min);
    let x1 = all().map(|p| p.0).fold(f64::MIN, f64::max);
    let y0 = all().map(|p| p.1 - p.2).fold(1.0, f64::min);
    let y1 = all().map(|p| p.1 + p.2).fold(0.0, f64::max);
    if series.iter().all(|s| s.points.is_empty()) {
        // No points yet (a study stopped before a run finished): no plot.
        return Ok(());
    }
    // Room on the right for point labels.
    let labelled = series.iter().any(|s| !s.point_labels.is_empty());
    let (left, right) = if labelled { (0.05, 0.25) } else { (0.08, 0.08) };
    let ypad = ((y1 - y0) * 0.1).max(0.005);
    let (xpad_left, xpad_right) = (((x1 - x0) * left).max(1e-3), ((x1 - x0) * right).max(1e-3));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(
                x0 - xpad_left..x1 + xpad_right,
                (y0 - ypad).max(0.0)..(y1 + ypad).min(1.0),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("top-1 (mean +- std over seeds)")
            .draw()
            .map_err(|e| err(&e))?;
        let colours = [RED, BLUE, GREEN, MAGENTA, BLACK, CYAN];
        for (s, colour) in series.iter().zip(colours.iter().cycle()) {
            let style = colour.stroke_width(2);
            if lines {
                chart
                    .draw_series(LineSeries::new(s.points.iter().map(|p| (p.0, p.1)), style))
                    .map_err(|e| err(&e))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            }
            chart
                .draw_series(s.points.iter().map(|&(x, m, sd)| {
                    ErrorBar::new_vertical(x, m - sd, m, m + sd, colour.filled(), 8)
                }))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(
                    s.points
                        .iter()
                        .zip(&s.point_labels)
                        .map(|(&(x, m, _), text)| {
                            Text::new(text.clone(), (x, m), ("sans-serif", 13).into_font())
                        }),
                )
                .map_err(|e| err(&e))?;
        }
        if lines {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    crate::util::write_png(path, (w, h), buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welch_matches_a_hand_computed_case() {
        // a: mean 0.8, sd 0.01; b: mean 0.78, sd 0.02; n = 3 each.
        let a = [0.79, 0.80, 0.81];
        let b = [0.76, 0.78, 0.80];
        let (t, df, p) = welch(&a, &b).unwrap();
        // se = sqrt(0.0001/3 + 0.0004/3) = 0.012910; t = 0.02 / se = 1.549.
        assert!((t - 1.549).abs() < 1e-3, "{t}");
        // df = (0.0005/3)^2 / ((0.0001/3)^2/2 + (0.0004/3)^2/2) = 2.941.
        assert!((df - 2.941).abs() < 1e-3, "{df}");
        assert!(p > 0.2 && p < 0.25, "{p}");
        assert!(welch(&a, &[0.7]).is_none());
        let (m, sd) = mean_std(&b);
        assert!((m - 0.78).abs() < 1e-12 && (sd - 0.02).abs() < 1e-12);
    }
}
