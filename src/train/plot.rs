//! The training plot: `metrics.jsonl` drawn as an SVG with plotters — training loss on the
//! left axis; validation α (greedy agreement with the teacher) and the selected fraction
//! (AdaSPEC) on the right axis, 0..1; axes, labels and a legend. SVG keeps the text without a
//! font dependency; any browser shows it.

use std::path::Path;

use plotters::prelude::*;

use super::data::write_atomic;
use super::error::{Error, Result};

/// The series a metrics file holds.
#[derive(Debug, Default, PartialEq)]
pub struct Series {
    /// (step, training loss).
    pub loss: Vec<(f64, f64)>,
    /// (step, validation α).
    pub val_alpha: Vec<(f64, f64)>,
    /// (step, selected fraction), only for runs with selection.
    pub selected: Vec<(f64, f64)>,
    /// The method named by the file's lines ("fkl", "adaspec", ...).
    pub method: String,
}

/// Reads the series of a `metrics.jsonl` (unparsable lines are skipped).
pub fn read_series(metrics: &Path) -> Result<Series> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut s = Series::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let step = v.get("step").and_then(|x| x.as_f64()).unwrap_or(0.0);
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
        if let Some(m) = v.get("method").and_then(|m| m.as_str()) {
            s.method = m.to_string();
        }
        // Training loss only: evaluation lines of the head trainer carry a held-out "loss" too.
        let training = v.get("kind").and_then(|k| k.as_str()).map_or(true, |k| k == "train");
        if let Some(l) = num("loss").filter(|_| training) {
            s.loss.push((step, l));
        }
        if let Some(a) = num("val_alpha") {
            s.val_alpha.push((step, a));
        }
        if let Some(f) = num("selected_fraction").filter(|&f| f < 1.0) {
            s.selected.push((step, f));
        }
    }
    Ok(s)
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::InvalidArg { name: "metrics plot", reason: format!("{}: {e}", path.display()) }
}

/// Draws `metrics` into `svg` (written atomically).
pub fn write_metrics_svg(svg: &Path, metrics: &Path) -> Result<()> {
    let s = read_series(metrics)?;
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (800, 450)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(svg, e))?;
        let max_step = s.loss.iter().chain(&s.val_alpha).map(|p| p.0).fold(1.0f64, f64::max);
        let (lo, hi) = s.loss.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let (lo, hi) = if s.loss.is_empty() { (0.0, 1.0) } else { (lo.min(0.0), hi.max(lo + 1e-6) * 1.05) };
        let title = if s.method.is_empty() { "training".to_string() } else { format!("training: {}", s.method) };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .right_y_label_area_size(60)
            .build_cartesian_2d(0f64..max_step, lo..hi)
            .map_err(|e| plot_err(svg, e))?
            .set_secondary_coord(0f64..max_step, 0f64..1f64);
        chart.configure_mesh().x_desc("optimizer step").y_desc("training loss").draw().map_err(|e| plot_err(svg, e))?;
        chart
            .configure_secondary_axes()
            .y_desc("validation α / selected fraction")
            .draw()
            .map_err(|e| plot_err(svg, e))?;
        chart
            .draw_series(LineSeries::new(s.loss.iter().copied(), BLUE.stroke_width(2)))
            .map_err(|e| plot_err(svg, e))?
            .label("training loss (left)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_secondary_series(LineSeries::new(s.val_alpha.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| plot_err(svg, e))?
            .label("validation α (right)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_secondary_series(s.val_alpha.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| plot_err(svg, e))?;
        if !s.selected.is_empty() {
            chart
                .draw_secondary_series(LineSeries::new(s.selected.iter().copied(), GREEN.stroke_width(1)))
                .map_err(|e| plot_err(svg, e))?
                .label("selected fraction (right)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| plot_err(svg, e))?;
        root.present().map_err(|e| plot_err(svg, e))?;
    }
    write_atomic(svg, buf.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_has_axes_labels_and_legend() {
        let dir = std::env::temp_dir().join(format!("adaspec-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = dir.join("metrics.jsonl");
        let mut lines = vec![r#"{"kind":"val","method":"adaspec","step":0,"val_alpha":0.2}"#.to_string()];
        for i in 1..=10 {
            lines.push(format!(
                r#"{{"kind":"train","method":"adaspec","step":{i},"loss":{},"selected_fraction":0.4}}"#,
                2.0 / i as f64
            ));
        }
        lines.push(r#"{"kind":"val","method":"adaspec","step":10,"val_alpha":0.5}"#.into());
        // The head trainer's evaluation lines: their held-out loss is not the training loss.
        lines.push(r#"{"kind":"eval","step":10,"loss":9.0,"val_alpha":0.55}"#.into());
        std::fs::write(&m, lines.join("\n")).unwrap();
        let s = read_series(&m).unwrap();
        assert_eq!((s.loss.len(), s.val_alpha.len(), s.selected.len()), (10, 3, 10));
        assert!(s.loss.iter().all(|&(_, l)| l <= 2.0), "an evaluation loss among the training losses");
        let svg = dir.join("metrics.svg");
        write_metrics_svg(&svg, &m).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        for want in
            ["<svg", "optimizer step", "training loss", "validation α", "selected fraction", "training: adaspec"]
        {
            assert!(text.contains(want), "{want} missing from the plot");
        }
        assert!(text.matches("<polyline").count() >= 3, "three series");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
