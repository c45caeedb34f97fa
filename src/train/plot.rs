//! Training curves as a PNG: loss and top-1 per epoch, train and (EMA) evaluation.

use std::path::Path;

use plotters::prelude::*;

use super::metrics::EpochMetrics;

pub const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Renders `metrics` to `path` (written atomically).
pub fn plot_curves(metrics: &[EpochMetrics], title: &str, path: &Path) -> anyhow::Result<()> {
    // The bundled font makes labels render without system fonts; registering twice is harmless.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let (w, h) = (1000u32, 420u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let root = root
            .titled(title, ("sans-serif", 20))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let panels = root.split_evenly((1, 2));
        let epochs = metrics.len().max(1) as f64;
        let max_loss = metrics
            .iter()
            .flat_map(|m| [m.train_loss, m.eval_loss])
            .fold(0.0f64, f64::max)
            .max(0.1)
            * 1.05;
        let series = [
            (
                "loss",
                0.0..max_loss,
                [("train loss", RED), ("eval loss (EMA)", BLUE)],
            ),
            (
                "top-1",
                0.0..1.0,
                [("train top-1", RED), ("eval top-1 (EMA)", BLUE)],
            ),
        ];
        for (panel, (name, range, lines)) in panels.iter().zip(series) {
            let mut chart = ChartBuilder::on(panel)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..epochs, range)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .y_desc(name)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for (i, (label, color)) in lines.into_iter().enumerate() {
                let points = metrics.iter().map(|m| {
                    let v = match (name, i) {
                        ("loss", 0) => m.train_loss,
                        ("loss", _) => m.eval_loss,
                        (_, 0) => m.train_top1,
                        _ => m.eval_top1,
                    };
                    (m.epoch as f64, v)
                });
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    crate::util::write_png(path, (w, h), buf)
}
