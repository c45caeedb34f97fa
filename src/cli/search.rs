//! `effnet search`: a baseline architecture for a FLOPs target, found as B0 was (MnasNet's
//! reward and controller, or regularized evolution), resumable, with a report a user can act on.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use effnet::search::{self, ControllerKind, Options, compare, report, space::Space};
use effnet::spec::CompoundCoefficients;
use effnet::train::{RunFile, TrainConfig};

#[derive(Args)]
pub struct SearchArgs {
    /// The FLOPs target T of the reward ACC x (FLOPS/T)^w, in MFLOPs (2 x MACs); default: B0's
    /// FLOPs at --resolution.
    #[arg(long)]
    target_mflops: Option<f64>,
    /// The reward's exponent (MnasNet: -0.07).
    #[arg(long, default_value_t = -0.07, allow_hyphen_values = true)]
    w: f64,
    #[arg(long, value_parser = ["reinforce", "evolution"], default_value = "reinforce")]
    controller: String,
    /// Candidates to train and score.
    #[arg(long, default_value_t = 100)]
    candidates: u64,
    /// Dataset (as for `effnet train`).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    #[arg(long, default_value_t = 32)]
    resolution: usize,
    /// Epochs of each candidate's proxy training.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Training images of the proxy (0 = all).
    #[arg(long, default_value_t = 3000)]
    train_limit: usize,
    /// Candidates trained at once, one thread each.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Search directory.
    #[arg(long, default_value = "search")]
    out: PathBuf,
    /// Any recipe field of the proxy training (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// After the search: the best candidate and B0 trained with this many seeds, unscaled and at
    /// --compare-phi (0: no comparison).
    #[arg(long, default_value_t = 3)]
    compare_seeds: u64,
    /// The compound coefficient of the comparison's scaled pair (the paper's alpha, beta, gamma).
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    compare_phi: f64,
}

/// The proxy recipe, the same for every candidate and for the B0 reference: the short-run recipe
/// with a shorter warmup and BN re-estimate for a 2-epoch proxy on 3,000 images.
fn recipe(args: &SearchArgs) -> anyhow::Result<TrainConfig> {
    let base = TrainConfig {
        warmup_epochs: 0.3,
        precise_bn_batches: 20,
        ..TrainConfig::short_run()
    };
    let mut r = base.with_overrides(&args.overrides)?;
    r.dataset = args.dataset.clone();
    r.epochs = args.epochs;
    r.train_limit = args.train_limit;
    r.resolution = args.resolution;
    r.seed = args.seed;
    r.validate()?;
    Ok(r)
}

pub fn run(args: &SearchArgs) -> anyhow::Result<()> {
    let recipe = recipe(args)?;
    if !(args.compare_phi.is_finite() && args.compare_phi > 0.0) {
        bail!(
            "--compare-phi {} must be a positive number",
            args.compare_phi
        );
    }
    let (train, _) = effnet::data::named(&recipe.dataset)?;
    let images = match recipe.train_limit {
        0 => train.len(),
        l => l.min(train.len()),
    };
    if images < recipe.batch_size {
        bail!(
            "the training set has {images} images, fewer than one batch of {}",
            recipe.batch_size
        );
    }
    let space = Space::b0(args.resolution, train.num_classes());
    let target = match args.target_mflops {
        Some(t) if t.is_finite() && t > 0.0 => (t * 1e6) as u64,
        Some(t) => bail!("--target-mflops {t} must be a positive number"),
        None => space.flops(&space.b0_arch()),
    };
    let opts = Options {
        out: args.out.clone(),
        space,
        controller: match args.controller.as_str() {
            "evolution" => ControllerKind::Evolution,
            _ => ControllerKind::Reinforce,
        },
        target_flops: target,
        w: args.w,
        candidates: args.candidates,
        jobs: args.jobs,
        seed: args.seed,
        exe: std::env::current_exe().context("locating the effnet executable")?,
        recipe: recipe.clone(),
        show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    search::check(&opts)?;
    // The same directory may only continue the same search.
    let manifest = serde_json::json!({
        "controller": args.controller, "target_flops": target, "w": args.w, "seed": args.seed,
        "resolution": args.resolution, "recipe": recipe,
    });
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("search.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let old: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("`{}` is corrupt", path.display()))?;
            if old != manifest {
                bail!(
                    "`{}` holds a different search; continue it with the same options or choose another --out",
                    args.out.display()
                );
            }
        }
        Err(_) => {
            effnet::util::write_atomic(&path, serde_json::to_string_pretty(&manifest)?.as_bytes())?
        }
    }
    eprintln!(
        "searching {} candidates ({} controller, T = {:.1} MFLOPs, w = {}) in {}; B0 on the same schedule first",
        args.candidates,
        args.controller,
        target as f64 / 1e6,
        args.w,
        args.out.display()
    );
    let b0 = search::reference(&opts, &indicatif::ProgressBar::hidden())?;
    let history = search::run(&opts)?;
    let header = format!(
        "{} candidates, {} controller, T = {:.1} MFLOPs (B0 at {r}x{r}), w = {}; each trained on {} images of {} for {} epochs ({}), the B0 reference on the same schedule. Generated at commit {}.",
        history.len(),
        args.controller,
        target as f64 / 1e6,
        args.w,
        images,
        recipe.dataset,
        recipe.epochs,
        RunFile::to_toml(&recipe, &opts.space.base)?
            .lines()
            .filter(|l| l.starts_with("base_lr") || l.starts_with("batch_size"))
            .collect::<Vec<_>>()
            .join(", "),
        effnet::study::COMMIT,
        r = args.resolution
    );
    let mut markdown = report::markdown(&history, Some(&b0), &header);
    effnet::util::write_atomic(&args.out.join("report.md"), markdown.as_bytes())?;
    report::plot(&history, Some(&b0), &args.out.join("search.png"))?;
    let best = history
        .iter()
        .max_by(|a, b| a.reward.total_cmp(&b.reward))
        .context("no candidate")?;
    if args.compare_seeds > 0 {
        // The reward's choice, and (when it is another architecture) the most accurate one within
        // the FLOPs target: the comparison at equal FLOPs.
        let mut found = vec![("found", &best.arch)];
        if let Some(within) = history
            .iter()
            .filter(|c| c.flops <= target)
            .max_by(|a, b| a.top1.total_cmp(&b.top1))
            && within.arch != best.arch
        {
            found.push(("found-within-t", &within.arch));
        }
        eprintln!(
            "comparing candidate {} (best reward){} with B0: {} seeds each, unscaled and at phi = {}",
            best.index,
            if found.len() > 1 {
                " and the most accurate within T"
            } else {
                ""
            },
            args.compare_seeds,
            args.compare_phi
        );
        let plan = compare::Plan {
            found,
            seeds: args.compare_seeds,
            phi: args.compare_phi,
            coefficients: CompoundCoefficients::default(),
        };
        let entries = compare::run(&opts, &plan)?;
        markdown.push('\n');
        markdown.push_str(&compare::markdown(&entries));
        effnet::util::write_atomic(&args.out.join("report.md"), markdown.as_bytes())?;
    }
    println!(
        "best of {}: candidate {} at {:.1} MFLOPs, top-1 {:.4}, reward {:.4} (B0: {:.1} MFLOPs, top-1 {:.4}, reward {:.4}); report.md, history.csv and search.png in {}\n--arch \"{}\"",
        history.len(),
        best.index,
        best.flops as f64 / 1e6,
        best.top1,
        best.reward,
        b0.flops as f64 / 1e6,
        b0.top1,
        b0.reward,
        args.out.display(),
        best.blocks.join(" ")
    );
    Ok(())
}
