//! A search's results a user can use at once: the best architectures as block strings, the Pareto
//! front of accuracy against FLOPs, and a plot of every candidate with the front and B0 marked.

use std::fmt::Write;
use std::path::Path;

use plotters::prelude::*;

use super::Candidate;

/// Candidates no other beats on both FLOPs (fewer or equal) and top-1 (higher or equal, one
/// strictly), sorted by FLOPs.
pub fn pareto(history: &[Candidate]) -> Vec<&Candidate> {
    let mut front: Vec<&Candidate> = history
        .iter()
        .filter(|c| {
            !history.iter().any(|o| {
                o.flops <= c.flops && o.top1 >= c.top1 && (o.flops < c.flops || o.top1 > c.top1)
            })
        })
        .collect();
    front.sort_by_key(|c| c.flops);
    front
}

/// Each architecture once (its first evaluation; a converged controller samples the same one
/// again, and training is deterministic), with how many times it was sampled.
fn distinct(history: &[Candidate]) -> Vec<(&Candidate, usize)> {
    let mut out: Vec<(&Candidate, usize)> = Vec::new();
    for c in history {
        match out.iter_mut().find(|(d, _)| d.arch == c.arch) {
            Some((_, n)) => *n += 1,
            None => out.push((c, 1)),
        }
    }
    out
}

/// The markdown report.
pub fn markdown(history: &[Candidate], b0: Option<&Candidate>, header: &str) -> String {
    let mut s = format!("# `effnet search`: results\n\n{header}\n\n");
    let unique = distinct(history);
    let _ = writeln!(
        s,
        "{} distinct architectures among {} candidates.\n",
        unique.len(),
        history.len()
    );
    let times = |c: &Candidate| {
        let n = unique
            .iter()
            .find(|(d, _)| d.arch == c.arch)
            .map_or(1, |u| u.1);
        if n > 1 {
            format!("{} (sampled {n}x)", c.index)
        } else {
            c.index.to_string()
        }
    };
    let mut ranked: Vec<&Candidate> = unique.iter().map(|u| u.0).collect();
    ranked.sort_by(|a, b| b.reward.total_cmp(&a.reward));
    let row = |s: &mut String, name: &str, c: &Candidate| {
        let _ = writeln!(
            s,
            "| {name} | {:.1} | {} | {:.4} | {:.4} | `{}` |",
            c.flops as f64 / 1e6,
            c.params,
            c.top1,
            c.reward,
            c.blocks.join(" ")
        );
    };
    s.push_str("## Best by reward\n\n| candidate | MFLOPs | params | top-1 | reward | blocks |\n|---|---:|---:|---:|---:|---|\n");
    if let Some(b0) = b0 {
        row(&mut s, "B0 (reference)", b0);
    }
    for c in ranked.iter().take(5) {
        row(&mut s, &times(c), c);
    }
    s.push_str("\n## Pareto front (fewer FLOPs, higher top-1)\n\n| candidate | MFLOPs | params | top-1 | reward | blocks |\n|---|---:|---:|---:|---:|---|\n");
    let firsts: Vec<Candidate> = unique.iter().map(|u| u.0.clone()).collect();
    for c in pareto(&firsts) {
        row(&mut s, &times(c), c);
    }
    let _ = writeln!(
        s,
        "\nUse an architecture with `effnet info --arch \"BLOCKS\"` or `effnet train --arch \"BLOCKS\"`.\n\n![candidates](search.png)"
    );
    s
}

/// Every candidate's top-1 against its FLOPs, the Pareto front joined, B0 marked.
pub fn plot(history: &[Candidate], b0: Option<&Candidate>, path: &Path) -> anyhow::Result<()> {
    if history.is_empty() {
        return Ok(());
    }
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, crate::train::plot::FONT);
    let (w, h) = (900u32, 560u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting: {e}");
    let mf = |c: &Candidate| c.flops as f64 / 1e6;
    let all = || history.iter().chain(b0);
    let (x0, x1) = all().fold((f64::MAX, f64::MIN), |(a, b), c| {
        (a.min(mf(c)), b.max(mf(c)))
    });
    let (y0, y1) = all().fold((1.0f64, 0.0f64), |(a, b), c| (a.min(c.top1), b.max(c.top1)));
    let (xp, yp) = (((x1 - x0) * 0.05).max(0.1), ((y1 - y0) * 0.08).max(0.005));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("architecture search: every candidate", ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0 - xp..x1 + xp, (y0 - yp).max(0.0)..(y1 + yp).min(1.0))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("MFLOPs")
            .y_desc("top-1 (proxy schedule)")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                history
                    .iter()
                    .map(|c| Circle::new((mf(c), c.top1), 3, BLUE.mix(0.5).filled())),
            )
            .map_err(|e| err(&e))?
            .label("candidates")
            .legend(|(x, y)| Circle::new((x + 8, y), 3, BLUE.filled()));
        let front: Vec<(f64, f64)> = pareto(history).iter().map(|c| (mf(c), c.top1)).collect();
        chart
            .draw_series(LineSeries::new(front, RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        if let Some(b0) = b0 {
            chart
                .draw_series([TriangleMarker::new((mf(b0), b0.top1), 8, BLACK.filled())])
                .map_err(|e| err(&e))?
                .label("B0 (same schedule)")
                .legend(|(x, y)| TriangleMarker::new((x + 8, y), 6, BLACK.filled()));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    crate::util::write_png(path, (w, h), buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::space::Arch;

    fn c(index: u64, flops: u64, top1: f64) -> Candidate {
        Candidate {
            index,
            arch: Arch(vec![]),
            blocks: vec![],
            flops,
            params: 0,
            top1,
            reward: top1,
            seconds: 0.0,
            commit: String::new(),
        }
    }

    #[test]
    fn the_front_keeps_only_undominated_candidates() {
        let h = [
            c(0, 10, 0.5),
            c(1, 20, 0.7),
            c(2, 15, 0.4),
            c(3, 30, 0.7),
            c(4, 5, 0.3),
        ];
        let front: Vec<u64> = pareto(&h).iter().map(|c| c.index).collect();
        assert_eq!(front, [4, 0, 1]);
    }

    #[test]
    fn an_architecture_sampled_again_is_listed_once_with_its_count() {
        let mut h = vec![c(0, 10, 0.5), c(1, 20, 0.7), c(2, 20, 0.7)];
        h[0].arch = Arch(vec![0]);
        h[1].arch = Arch(vec![1]);
        h[2].arch = Arch(vec![1]);
        let md = markdown(&h, None, "");
        assert!(
            md.contains("2 distinct architectures among 3 candidates"),
            "{md}"
        );
        assert!(md.contains("| 1 (sampled 2x) |"), "{md}");
        assert!(!md.contains("| 2 |"), "{md}");
    }
}
