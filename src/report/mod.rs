//! `convlab report`: one self-contained HTML page per run (no scripts, no network: charts are
//! inline SVG, pictures are base64 PNG). Every string that comes from data (class names, file
//! names, the recipe) is escaped, so a class folder called `<script>` shows as text.

pub mod charts;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use burn::module::Module;
use burn::prelude::*;

use crate::data::{Dataset, Subset, open, stats};
use crate::error::Result;
use crate::eval::separation::{Analysis, analyze};
use crate::eval::tta::score;
use crate::pipeline::view_probabilities;
use crate::pipeline::{load_model, view_loader};
use crate::recipe::RunRecipe;
use crate::run::{RECIPE, RunDir, SUMMARY, Summary};
use crate::viz::{self, attribution, maps};
use charts::{BLUE_, GREEN_, ORANGE_, RED_, Series, line_chart};

/// Images used for the analysis and the dataset statistics (a stratified subset of the
/// split): enough for stable means, bounded for big datasets.
pub const MAX_IMAGES: usize = 2000;

/// HTML-escapes text.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn img_tag(png: &[u8], alt: &str) -> String {
    format!(
        "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
        escape(alt),
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// At most `n` samples, stratified by class (folders list images class by class, so the
/// first `n` would be a few classes only).
fn stratified(data: Arc<dyn Dataset>, n: usize) -> Arc<dyn Dataset> {
    if data.len() <= n {
        return data;
    }
    let labels = crate::data::dataset::labels_of(data.as_ref());
    let mut indices = crate::data::split::stratified_subset(&labels, n, 0);
    indices.sort_unstable();
    Arc::new(Subset {
        base: data,
        indices,
    })
}

/// Writes the report of `run` to `out` (default `RUN/report.html`) and returns its path.
/// `device` must be an autodiff device (Grad-CAM needs gradients).
pub fn write_report(run: &RunDir, out: Option<&Path>, device: &Device) -> Result<PathBuf> {
    let recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let metrics = run.read_metrics()?;
    let summary: Option<Summary> = run.read_json(SUMMARY).ok();
    let model = load_model(run, &recipe, "best", device)?.freeze();
    let eval = model.valid();
    let plain = device.clone().without_autodiff();
    let splits = open(&recipe.data.spec(recipe.seed))?;
    let val = stratified(splits.val.clone(), MAX_IMAGES);
    let size = recipe.model.input_size;

    let probs = view_probabilities(
        &eval,
        &recipe,
        val.clone(),
        (size, recipe.eval.single()),
        &plain,
    )?;
    let report = score(&probs, val.as_ref(), &classes);
    let k = classes.len();
    let analysis: Analysis = analyze(
        &eval,
        &view_loader(&recipe, val.clone(), size, recipe.eval.single())?,
        &classes,
        &plain,
    )?;
    let data_stats = stats::compute(
        stratified(splits.train.clone(), MAX_IMAGES).as_ref(),
        splits.val.as_ref(),
        &splits.classes,
        recipe.model.in_channels,
        size,
    )
    .ok();

    let mut h = String::new();
    let title = format!("convlab report: {}", run.path.display());
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>body{{font-family:sans-serif;max-width:1180px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0}}td,th{{border:1px solid #ccc;\
         padding:3px 7px;text-align:right}}th{{background:#f3f3f3}}td.l,th.l{{text-align:left}}\
         pre{{background:#f7f7f7;padding:1em;overflow:auto;max-height:30em}}\
         .row{{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}}\
         figure{{margin:0}}figcaption{{font-size:12px;max-width:400px}}\
         img{{image-rendering:pixelated}}</style></head><body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );

    // Final metrics.
    let _ = writeln!(h, "<h2>Final metrics</h2><table>");
    let _ = writeln!(
        h,
        "<tr><th class=l>model</th><td class=l>{}</td></tr>",
        escape(recipe.model.name.as_str())
    );
    if let Some(s) = &summary {
        for (k, v) in [
            ("parameters", s.params.to_string()),
            ("epochs", s.epochs.to_string()),
            ("final val top-1", pct(s.final_val_top1)),
            ("final val top-5", pct(s.final_val_top5)),
            ("final val loss", format!("{:.4}", s.final_val_loss)),
            (
                "best val top-1",
                format!("{} (epoch {})", pct(s.best_val_top1), s.best_epoch),
            ),
            ("training time", format!("{:.1} s", s.seconds)),
        ] {
            let _ = writeln!(h, "<tr><th class=l>{k}</th><td>{}</td></tr>", escape(&v));
        }
    } else {
        let _ = writeln!(
            h,
            "<tr><th class=l>status</th><td>unfinished (no summary.json)</td></tr>"
        );
    }
    let _ = writeln!(
        h,
        "<tr><th class=l>best checkpoint on {} val images</th><td>top-1 {}, top-5 {}</td></tr></table>",
        report.count,
        pct(report.top1),
        pct(report.top5)
    );

    // Curves.
    let ep = |f: &dyn Fn(&crate::run::EpochMetrics) -> f64| -> Vec<(f64, f64)> {
        metrics.iter().map(|m| (m.epoch as f64, f(m))).collect()
    };
    let _ = writeln!(h, "<h2>Training curves</h2><div class=row>");
    h.push_str(&line_chart(
        "loss",
        "epoch",
        "cross-entropy",
        &[
            Series {
                name: "train",
                points: ep(&|m| m.train_loss),
                colour: BLUE_,
            },
            Series {
                name: "val",
                points: ep(&|m| m.val_loss),
                colour: ORANGE_,
            },
        ],
    ));
    h.push_str(&line_chart(
        "accuracy",
        "epoch",
        "%",
        &[
            Series {
                name: "train top-1",
                points: ep(&|m| 100.0 * m.train_top1),
                colour: BLUE_,
            },
            Series {
                name: "val top-1",
                points: ep(&|m| 100.0 * m.val_top1),
                colour: ORANGE_,
            },
            Series {
                name: "val top-5",
                points: ep(&|m| 100.0 * m.val_top5),
                colour: GREEN_,
            },
        ],
    ));
    h.push_str(&line_chart(
        "learning rate (end of epoch)",
        "epoch",
        "lr",
        &[Series {
            name: "lr",
            points: ep(&|m| m.lr),
            colour: RED_,
        }],
    ));
    h.push_str("</div>\n");

    // Per-class accuracy and confusion.
    let _ = writeln!(
        h,
        "<h2>Per-class accuracy and confusion matrix</h2><p>balanced top-1 {} (the mean of the per-class accuracies), macro F1 {:.4}</p><div class=row><table><tr><th class=l>class</th><th>accuracy</th><th>precision</th><th>F1</th><th>images</th></tr>",
        pct(report.balanced_top1),
        report.macro_f1
    );
    for c in &report.per_class {
        let _ = writeln!(
            h,
            "<tr><td class=l>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{}</td></tr>",
            escape(&c.class),
            pct(c.accuracy),
            pct(c.precision),
            c.f1,
            c.count
        );
    }
    h.push_str("</table><table><tr><th class=l>true \\ predicted</th>");
    for (i, name) in classes.iter().enumerate() {
        let _ = write!(h, "<th title=\"{}\">{i}</th>", escape(name));
    }
    h.push_str("</tr>\n");
    for (i, row) in report.confusion.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f64;
        let _ = write!(h, "<tr><th class=l>{i} {}</th>", escape(&classes[i]));
        for &v in row {
            let a = v as f64 / total;
            let _ = write!(
                h,
                "<td style=\"background:rgba(31,119,180,{a:.3});color:{}\">{v}</td>",
                if a > 0.5 { "#fff" } else { "#222" }
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table></div>\n");

    // Filters.
    let (fname, filters) = maps::filters(&model, None)?;
    let _ = writeln!(
        h,
        "<h2>First-layer filters</h2><p>{}</p>{}",
        escape(&fname),
        img_tag(
            &viz::png_bytes(&viz::enlarge(&filters, 320)),
            "first-layer filters"
        )
    );

    // Grad-CAM and occlusion on a few right and wrong validation images.
    let preds: Vec<Option<usize>> = (0..val.len())
        .map(|i| {
            probs.seen[i].then(|| crate::eval::metrics::argmax(&probs.probs[i * k..(i + 1) * k]))
        })
        .collect();
    let right: Vec<usize> = (0..val.len())
        .filter(|&i| preds[i] == Some(val.label(i)))
        .take(3)
        .collect();
    let wrong: Vec<usize> = (0..val.len())
        .filter(|&i| preds[i].is_some_and(|p| p != val.label(i)))
        .take(3)
        .collect();
    let layer = model
        .feature_maps(
            Tensor::zeros([1, recipe.model.in_channels, size, size], device),
            &[],
        )?
        .last()
        .map(|(n, _)| n.clone())
        .unwrap_or_default();
    let _ = writeln!(
        h,
        "<h2>Where the model looks</h2><p>Each row: the image, Grad-CAM at <code>{}</code> for \
         the predicted class, and the occlusion map (probability of the true class as a grey \
         square of a quarter of the side slides over the image; black 0, white 1).</p>",
        escape(&layer)
    );
    for (title, list) in [("Right", &right), ("Wrong", &wrong)] {
        let _ = writeln!(h, "<h3>{title}</h3>");
        for &i in list.iter() {
            let input = viz::input_from_dataset(&recipe, val.as_ref(), i, device)?;
            let pred = preds[i].unwrap_or(0);
            let truth = val.label(i);
            let pic = viz::enlarge(&input.picture, 128);
            let (cam, w, hh) = attribution::grad_cam(&model, input.tensor.clone(), &layer, pred)?;
            let (p, _, nx, ny) = attribution::occlusion(
                &model,
                input.tensor.clone(),
                truth,
                (size / 4).max(1),
                (size / 16).max(1),
            )?;
            let occ = image::RgbImage::from_fn(nx as u32, ny as u32, |x, y| {
                viz::heat(p[y as usize * nx + x as usize])
            });
            let row = viz::grid(
                &[pic.clone(), viz::overlay_heat(&pic, &cam, w, hh, 0.5), occ],
                3,
                128,
            );
            let _ = writeln!(
                h,
                "<figure>{}<figcaption>{}: true <b>{}</b>, predicted <b>{}</b></figcaption></figure>",
                img_tag(&viz::png_bytes(&row), "grad-cam and occlusion"),
                escape(&val.describe(i)),
                escape(&classes[truth]),
                escape(&classes[pred])
            );
        }
    }

    // Separation over depth.
    let idx = |f: &dyn Fn(&crate::eval::separation::LayerSeparation) -> f64| -> Vec<(f64, f64)> {
        analysis
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| ((i + 1) as f64, f(l)))
            .collect()
    };
    let _ = writeln!(
        h,
        "<h2>Class separation by layer</h2><p>On {} validation images, globally pooled features \
         of each named layer: inter- / intra-class variance (Fisher ratio) and nearest-centroid \
         accuracy.</p><div class=row>",
        analysis.images
    );
    h.push_str(&line_chart(
        "inter / intra-class variance",
        "layer (see table)",
        "ratio",
        &[Series {
            name: "Fisher ratio",
            points: idx(&|l| l.ratio),
            colour: BLUE_,
        }],
    ));
    h.push_str(&line_chart(
        "nearest-centroid top-1",
        "layer (see table)",
        "%",
        &[Series {
            name: "nearest centroid",
            points: idx(&|l| 100.0 * l.nearest_centroid_top1),
            colour: GREEN_,
        }],
    ));
    h.push_str("<table><tr><th>#</th><th class=l>layer</th><th>channels</th><th>intra</th><th>inter</th><th>ratio</th><th>nearest-centroid</th></tr>");
    for (i, l) in analysis.layers.iter().enumerate() {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=l>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.3}</td><td>{}</td></tr>",
            i + 1,
            escape(&l.layer),
            l.channels,
            l.intra_class_variance,
            l.inter_class_variance,
            l.ratio,
            pct(l.nearest_centroid_top1)
        );
    }
    h.push_str("</table></div>\n<h3>Most confused pairs</h3><table><tr><th class=l>a</th><th class=l>b</th><th>a as b</th><th>b as a</th></tr>");
    for p in &analysis.confused_pairs {
        let _ = writeln!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&p.a),
            escape(&p.b),
            p.a_as_b,
            p.b_as_a
        );
    }
    h.push_str("</table>\n");

    // Dataset statistics.
    if let Some(s) = &data_stats {
        let _ = writeln!(
            h,
            "<h2>Dataset</h2><p>{} training images described (at most {MAX_IMAGES}), fitted to {} px. \
             Mean {:.4?}, std {:.4?}. Pixel-space intra-class variance {:.2}, inter-class {:.2}, \
             ratio {:.3}; duplicates {}, corrupt {}.</p><table><tr><th class=l>class</th><th>train</th><th>val</th></tr>",
            s.images,
            s.size,
            s.mean,
            s.std,
            s.granularity.intra_class_variance,
            s.granularity.inter_class_variance,
            s.granularity.ratio,
            s.duplicates,
            s.corrupt
        );
        for c in &s.classes {
            let _ = writeln!(
                h,
                "<tr><td class=l>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&c.class),
                c.train,
                c.val
            );
        }
        h.push_str("</table>\n");
    }

    // The recipe.
    let recipe_text = std::fs::read_to_string(run.file(RECIPE)).unwrap_or_default();
    let _ = writeln!(h, "<h2>Recipe</h2><pre>{}</pre>", escape(&recipe_text));
    h.push_str("</body></html>\n");

    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run.path.join("report.html"));
    crate::run::write_atomic(&path, h.as_bytes())?;
    Ok(path)
}
