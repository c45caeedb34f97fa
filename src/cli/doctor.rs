//! `effnet doctor`: what a weights file is and how it will be used, and which pretrained configs
//! the file cannot be told apart from; with `--images`, each candidate's top-1 on real photos, so a
//! wrong transform shows before it silently costs accuracy.

use std::path::PathBuf;

use clap::Args;

use effnet::classify::{Backend, Classifier};
use effnet::preprocess::{Preprocess, load_rgb};
use effnet::weights::{self, Layout, WeightSet};

use super::PreprocessArgs;

#[derive(Args)]
pub struct DoctorArgs {
    #[arg(long)]
    weights: PathBuf,
    /// Model name when the file does not say.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    preprocess: PreprocessArgs,
    /// Photos to run every candidate transform on.
    #[arg(long, num_args = 1..)]
    images: Vec<PathBuf>,
}

fn describe(p: &Preprocess) -> String {
    let scale = |v: [f32; 3]| {
        let v = v.map(|x| x / 255.0);
        format!("{:.3},{:.3},{:.3}", v[0], v[1], v[2])
    };
    let mode = match p.resize_mode {
        effnet::preprocess::ResizeMode::ShorterSide => "shorter side",
        effnet::preprocess::ResizeMode::Squash => "both sides",
    };
    format!(
        "resize {mode} to {}, {}, crop {}, mean {} std {}",
        p.resize,
        format!("{:?}", p.interpolation).to_lowercase(),
        p.crop,
        scale(p.mean),
        scale(p.std)
    )
}

pub fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let (tensors, file_meta) = weights::read_tensors(&args.weights)?;
    let mut set = weights::load(&args.weights, args.model.as_deref())?;
    args.preprocess.apply(&mut set.meta)?;
    let meta = &set.meta;
    let spec = &meta.spec;
    println!(
        "weights       {} ({} tensors)",
        args.weights.display(),
        tensors.len()
    );
    println!("layout        {}", meta.source);
    let origin = match (&args.model, &file_meta) {
        (Some(_), _) => "named with --model",
        (None, Some(_)) => "carried in the file",
        (None, None) => "inferred from the tensor shapes",
    };
    println!("architecture  {} ({origin})", spec.name);
    println!(
        "conventions   padding {:?}, BN eps {}, {} classes",
        spec.padding, spec.bn_eps, spec.num_classes
    );
    let source = match (&meta.preset, &file_meta, &args.preprocess.preset) {
        (_, _, Some(_)) => "chosen with --preset",
        (_, Some(_), _) => "carried in the file",
        (Some(_), None, _) => "assumed from the layout",
        (None, None, _) => "generic (no preset fits)",
    };
    println!(
        "transform     {} [{source}]\n              {}",
        meta.preset.as_deref().unwrap_or("(own)"),
        describe(&meta.preprocess)
    );
    if let Some(q) = &meta.quantization {
        let int8 = q.layers.iter().filter(|l| l.int8).count();
        use effnet::engine::{Engine, Precision};
        let runs = match Precision::default_for(meta) {
            Precision::Int8 => format!(
                "runs in int8 by default, the rest in {}",
                Engine::default_int8_fallback()
            ),
            _ => "runs in fp32 by default here (int8 is no faster on this CPU; --precision int8 forces it)"
                .to_string(),
        };
        println!(
            "int8          {int8} of {} GEMM layers ({}); {runs}",
            q.layers.len(),
            q.calibration
        );
    }
    let candidates = meta.candidate_presets();
    let differs: Vec<_> = candidates
        .iter()
        .filter(|c| c.preprocess != meta.preprocess)
        .collect();
    if file_meta.is_none() && !candidates.is_empty() {
        println!("candidates    (the keys and shapes alone cannot tell these apart)");
        for c in &candidates {
            let mark = if Some(&c.tag) == meta.preset.as_ref() {
                "*"
            } else {
                " "
            };
            println!("  {mark} {:<40} {}", c.tag, describe(&c.preprocess));
        }
        if meta.source == Layout::Timm {
            println!(
                "note          timm's tf_ ports and its own models have the same keys; {} was assumed (name the model, e.g. --model efficientnet_b0, for the other)",
                if spec.padding == effnet::spec::Padding::Same {
                    "tf_ (SAME padding, BN eps 1e-3)"
                } else {
                    "the plain model (symmetric padding, BN eps 1e-5)"
                }
            );
        }
        if !differs.is_empty() {
            println!(
                "warning       {} candidate(s) use another transform; pick the tag the file was published under with --preset TAG",
                differs.len()
            );
        }
    }
    if !args.images.is_empty() {
        let photos = args
            .images
            .iter()
            .map(|p| load_rgb(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut runs: Vec<(String, WeightSet)> = vec![("current".into(), set.clone())];
        for c in candidates
            .iter()
            .filter(|c| Some(&c.tag) != meta.preset.as_ref())
        {
            let mut alt = set.clone();
            if alt.meta.apply_preset(&c.tag).is_ok() {
                runs.push((c.tag.clone(), alt));
            }
        }
        println!("\ntop-1 per transform:");
        for (name, s) in runs {
            let labels = s.meta.labels();
            let mut clf = Classifier::new(s, Backend::Engine, 1)?;
            let mut cells = Vec::new();
            for (photo, path) in photos.iter().zip(&args.images) {
                let probs = &clf.probabilities(std::slice::from_ref(photo))?[0];
                let (best, p) = probs
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, p)| (i, *p))
                    .unwrap_or((0, 0.0));
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                cells.push(format!("{file}: {} {p:.3}", labels[best]));
            }
            println!("  {name:<40} {}", cells.join(" | "));
        }
    }
    Ok(())
}
