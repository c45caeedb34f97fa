//! The `effnet` binary as a user runs it: happy paths and every kind of bad input.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn models_lists_every_variant() {
    let home = tempfile::tempdir().unwrap();
    let o = effnet(&["models"], home.path());
    assert!(o.status.success());
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1 + 23);
    assert!(out.contains("efficientnet-b0") && out.contains("5,288,548"));
    assert!(out.contains("efficientnetv2-xl"));
}

#[test]
fn info_reports_exact_counts_and_scaling() {
    let home = tempfile::tempdir().unwrap();
    let o = effnet(&["info", "b0"], home.path());
    let out = stdout(&o);
    assert!(
        out.contains("5,288,548") && out.contains("385,814,752"),
        "{out}"
    );
    let o = effnet(
        &["info", "efficientnet_b2", "--resolution", "288", "--json"],
        home.path(),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["params"], 9_109_994);
    assert_eq!(v["macs"], 1_087_529_456);
    let o = effnet(&["info", "b0", "--layers"], home.path());
    assert!(stdout(&o).contains("blocks.15.project.conv"));
    // Compound scaling from the CLI: phi = 1 on B0 gives depth 1.2, width 1.1, resolution 258.
    let o = effnet(&["info", "b0", "--phi", "1", "--json"], home.path());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["resolution"], 258);
    assert_eq!(v["spec"]["width"], 1.1);
    // A negative phi scales down, written as a plain value (clap took `-1` for a flag).
    let o = effnet(&["info", "b0", "--phi", "-1", "--json"], home.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["resolution"], 195);
}

#[test]
fn classify_with_the_installed_default_weights() {
    let home = tempfile::tempdir().unwrap();
    let st = home.path().join("efficientnet-lite0.safetensors");
    let o = effnet(
        &[
            "convert",
            fixture(LITE0).to_str().unwrap(),
            st.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // No arguments: the bundled sample photo with the default weights.
    let o = effnet(&["classify"], home.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(out.lines().nth(1).unwrap().contains("espresso"), "{out}");
    // JSON for real files, several at once.
    let chelsea = fixture("images/chelsea.png");
    let coffee = fixture("images/coffee.png");
    let o = effnet(
        &[
            "classify",
            "--json",
            coffee.to_str().unwrap(),
            chelsea.to_str().unwrap(),
        ],
        home.path(),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["predictions"][0]["class"], 967);
    assert_eq!(v[0]["predictions"].as_array().unwrap().len(), 5);
    assert_eq!(v[1]["predictions"][0]["class"], 282);
    let p = v[0]["predictions"][0]["probability"].as_f64().unwrap();
    assert!((p - 0.951).abs() < 0.03, "{p}");
}

#[test]
fn classify_with_explicit_pth_weights_and_model() {
    let home = tempfile::tempdir().unwrap();
    let coffee = fixture("images/coffee.png");
    let o = effnet(
        &[
            "classify",
            "--model",
            "lite0",
            "--weights",
            fixture(LITE0).to_str().unwrap(),
            "--top",
            "1",
            coffee.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 2);
    assert!(out.contains("967") && out.contains("espresso"));
}

#[test]
fn bad_inputs_fail_cleanly() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let coffee = fixture("images/coffee.png");
    let coffee = coffee.to_str().unwrap();
    let lite0 = fixture(LITE0);
    let lite0 = lite0.to_str().unwrap();

    // Default weights not installed.
    assert_clean_error(&effnet(&["classify", coffee], dir), "not installed");
    // Missing weights file.
    assert_clean_error(
        &effnet(
            &["classify", "--weights", "/nonexistent/w.pth", coffee],
            dir,
        ),
        "cannot read weights",
    );
    // Truncated legacy .pth and truncated zip .pth.
    let bytes = std::fs::read(fixture(LITE0)).unwrap();
    let cut = dir.join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", cut.to_str().unwrap(), coffee],
            dir,
        ),
        "corrupt or truncated",
    );
    let zip = std::fs::read(fixture(TV_B0)).unwrap();
    std::fs::write(&cut, &zip[..zip.len() - 1000]).unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", cut.to_str().unwrap(), coffee],
            dir,
        ),
        "corrupt or truncated",
    );
    // Garbage that is no checkpoint at all.
    let junk = dir.join("junk.pth");
    std::fs::write(&junk, b"this is not a checkpoint, just text").unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", junk.to_str().unwrap(), coffee],
            dir,
        ),
        "not a weights file",
    );
    // Weights for another variant: names the problem keys and suggests the right model.
    let o = effnet(
        &["classify", "--model", "b0", "--weights", lite0, coffee],
        dir,
    );
    assert_clean_error(&o, "do not fit efficientnet-b0");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--model efficientnet-lite0"));
    // Unknown model name.
    assert_clean_error(&effnet(&["info", "b9"], dir), "unknown model `b9`");
    assert_clean_error(
        &effnet(
            &[
                "classify",
                "--model",
                "resnet50",
                "--weights",
                lite0,
                coffee,
            ],
            dir,
        ),
        "unknown model",
    );
    // A non-image file, and an image format we do not decode.
    let text = dir.join("notes.png");
    std::fs::write(&text, b"plain text pretending to be a png").unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", lite0, text.to_str().unwrap()],
            dir,
        ),
        "notes.png",
    );
    let ppm = dir.join("pic.ppm");
    std::fs::write(&ppm, b"P6\n2 2\n255\n\0\0\0\0\0\0\0\0\0\0\0\0").unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", lite0, ppm.to_str().unwrap()],
            dir,
        ),
        "not a supported image",
    );
    // Missing image file.
    assert_clean_error(
        &effnet(&["classify", "--weights", lite0, "/nonexistent.jpg"], dir),
        "cannot read image",
    );
    // Bad scaling flags.
    assert_clean_error(
        &effnet(&["info", "b0", "--width=-1"], dir),
        "width multiplier",
    );
    assert_clean_error(
        &effnet(&["info", "b0", "--width", "-1"], dir),
        "width multiplier",
    );
    assert_clean_error(
        &effnet(&["info", "b0", "--phi", "1", "--depth", "2"], dir),
        "either --phi",
    );
}

#[test]
fn convert_round_trips_through_safetensors() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("tv_b0.safetensors");
    let o = effnet(
        &[
            "convert",
            fixture(TV_B0).to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("torchvision layout"));
    let from_pth = effnet::weights::load(&fixture(TV_B0), None).unwrap();
    let from_st = effnet::weights::load(&out, None).unwrap();
    assert_eq!(
        from_st.meta, from_pth.meta,
        "metadata travels with the weights"
    );
    assert_eq!(from_st.tensors, from_pth.tensors);
}

/// A tiny IDX dataset under `home/data`, named as `--dataset` takes it.
/// The final weights a training run wrote to `dir`.
fn run_weights(dir: &Path) -> effnet::weights::TensorMap {
    effnet::weights::read_tensors(&dir.join("weights.safetensors"))
        .unwrap()
        .0
}

fn tiny_dataset(home: &Path, n: usize) -> String {
    let data = home.join("data");
    std::fs::create_dir(&data).unwrap();
    tiny_idx(&data, n);
    format!("idx:{}", data.display())
}

/// Writes a tiny IDX dataset (train + t10k) of `n` 8x8 images in 3 classes: class = brightness band.

#[test]
fn train_writes_a_run_directory() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("run");
    let dataset = tiny_dataset(home.path(), 96);
    let o = effnet(
        &[
            "train",
            "lite0",
            "--dataset",
            &dataset,
            "--resolution",
            "16",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("EMA eval top-1"));
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "header + 2 epochs: {csv}");
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    assert!(
        std::fs::read_to_string(out.join("config.toml"))
            .unwrap()
            .contains("batch_size = 16")
    );
    let plot = image::open(out.join("curves.png")).unwrap();
    assert_eq!((plot.width(), plot.height()), (1000, 420));
    // The saved EMA weights carry their own metadata (3 classes, 16x16 preprocessing)...
    let weights = out.join("weights.safetensors");
    let set = effnet::weights::load(&weights, None).unwrap();
    assert_eq!((set.spec().num_classes, set.meta.preprocess.crop), (3, 16));
    // ...and `effnet eval` scores them exactly as training's last evaluation did.
    let o = effnet(
        &[
            "eval",
            "--weights",
            weights.to_str().unwrap(),
            "--dataset",
            &dataset,
            "--json",
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(report["top1"], last["eval_top1"]);
    assert_eq!(report["images"], 48);
    let confusion: u64 = report["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(confusion, 48);
}

#[test]
fn train_rejects_bad_data_and_flags() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 48);
    // A CIFAR-10 batch whose second record has label 10.
    let cifar = home.path().join("cifar");
    std::fs::create_dir(&cifar).unwrap();
    let mut records = Vec::new();
    for label in [3u8, 10] {
        records.push(label);
        records.extend(std::iter::repeat_n(0u8, 3072));
    }
    for i in 1..=5 {
        std::fs::write(cifar.join(format!("data_batch_{i}.bin")), &records).unwrap();
    }
    std::fs::write(cifar.join("test_batch.bin"), &records).unwrap();
    let bad = format!("cifar10:{}", cifar.display());
    assert_clean_error(
        &effnet(&["train", "--dataset", &bad], home.path()),
        "label 10 of sample 1 is out of range",
    );
    std::fs::write(cifar.join("data_batch_1.bin"), &records[..100]).unwrap();
    assert_clean_error(
        &effnet(&["train", "--dataset", &bad], home.path()),
        "truncated",
    );
    assert_clean_error(
        &effnet(&["train", "--dataset", "nowhere:"], home.path()),
        "unknown dataset",
    );
    assert_clean_error(
        &effnet(&["train", "--dataset", "/nonexistent/dir"], home.path()),
        "unknown dataset",
    );
    let cfg = home.path().join("bad.toml");
    std::fs::write(&cfg, "batch_sise = 3\n").unwrap();
    assert_clean_error(
        &effnet(&["train", "--config", cfg.to_str().unwrap()], home.path()),
        "invalid config",
    );
    assert_clean_error(
        &effnet(
            &["train", "--dataset", &dataset, "--batch-size", "4096"],
            home.path(),
        ),
        "fewer than one batch",
    );
}

/// `effnet models | head -1`: the reader goes away early; effnet ends without a panic.
#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    use std::io::Read;
    let home = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["models", "--json"])
        .env("EFFNET_HOME", home.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_devices_are_clear_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // An unknown device string is a usage error naming the accepted forms.
    for args in [
        &["train", "--device", "gpu0"][..],
        &["eval", "--weights", "w.safetensors", "--device", "cuda:x"],
        &["bench", "b0", "--train", "--device", "tpu"],
    ] {
        let o = effnet(args, h);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && !err.contains("panicked"), "{err}");
        assert!(
            err.contains("unknown device") && err.contains("cuda[:N]"),
            "{err}"
        );
    }
    // A CUDA device this build or this machine lacks: one line, before any data loads.
    let o = effnet(&["train", "--device", "cuda:7", "--max-steps", "1"], h);
    assert_clean_error(&o, "cuda:7");
    // Several devices: CUDA only (burn 0.22 all-reduces through NCCL), a batch that splits evenly.
    for (args, needle) in [
        (&["--devices", "cpu,cuda:0"][..], "needs CUDA devices"),
        (
            &["--devices", "cuda:0,cuda:1", "--batch-size", "63"],
            "does not split",
        ),
        (&["--devices", "cuda:0,cuda:1"], "cuda:0"),
    ] {
        let mut all = vec!["train", "--max-steps", "1"];
        all.extend_from_slice(args);
        assert_clean_error(&effnet(&all, h), needle);
    }
    let o = effnet(&["train", "--devices", "cuda:0,cuda:0"], h);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("listed twice"));
    // --device moves the burn model; the engine runs on the CPU only.
    assert_clean_error(
        &effnet(&["classify", "--device", "cuda:0"], h),
        "add --backend burn",
    );
}

#[test]
fn an_interrupted_run_resumes_bit_for_bit() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 64);
    resumes_bit_for_bit(home.path(), &dataset, &[]);
}

/// The same with the streaming image-folder loader, random-resized crops taken from the full-size
/// files on several decode threads.
#[test]
fn an_interrupted_run_on_a_streamed_image_folder_resumes_bit_for_bit() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("photos");
    tiny_image_folder(&folder, 22);
    resumes_bit_for_bit(
        home.path(),
        folder.to_str().unwrap(),
        &["--random-resized-crop"],
    );
}

/// Trains 16 steps in one go and in two pieces (stopped mid-epoch, resumed): same weights and
/// metrics; then resuming a folder without a checkpoint is a clean error.
fn resumes_bit_for_bit(home: &Path, dataset: &str, flags: &[&str]) {
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "lite0",
            "--dataset",
            dataset,
            "--resolution",
            "16",
            "--batch-size",
            "8",
        ];
        args.extend_from_slice(&["--epochs", "2", "--warmup-epochs", "0.5"]);
        args.extend_from_slice(flags);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        let o = effnet(&args, home);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // 16 steps in one go, with a checkpoint every 3 steps.
    let whole = home.join("whole");
    std::fs::create_dir(&whole).unwrap();
    let cfg = home.join("ckpt.toml");
    std::fs::write(&cfg, "checkpoint_every = 3\n").unwrap();
    run(&whole, &["--config", cfg.to_str().unwrap()]);
    // The same run stopped after 7 steps (mid-epoch, last checkpoint at step 6), then resumed.
    let split = home.join("split");
    run(
        &split,
        &["--config", cfg.to_str().unwrap(), "--max-steps", "7"],
    );
    let o = effnet(
        &[
            "train",
            "--resume",
            split.to_str().unwrap(),
            "--max-steps",
            "0",
        ],
        home,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (run_weights(&whole), run_weights(&split));
    let differing: Vec<&String> = a.keys().filter(|k| a[*k] != b[*k]).collect();
    assert!(
        differing.is_empty(),
        "resumed run differs in {} tensors, e.g. {:?}",
        differing.len(),
        differing.first()
    );
    let m = |d: &Path| std::fs::read_to_string(d.join("metrics.csv")).unwrap();
    let strip = |s: String| {
        s.lines()
            .map(|l| l.rsplit_once(',').unwrap().0.to_string())
            .collect::<Vec<_>>()
    };
    let (a, b) = (strip(m(&whole)), strip(m(&split)));
    assert_eq!(a.len(), b.len());
    // Every column but throughput and wall time matches.
    for (x, y) in a.iter().zip(&b).skip(1) {
        let cols = |s: &str| {
            s.split(',')
                .enumerate()
                .filter(|(i, _)| *i != 5)
                .map(|(_, c)| c.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(cols(x), cols(y));
    }
    // Resuming a directory without a checkpoint is a clean error.
    assert_clean_error(
        &effnet(&["train", "--resume", home.to_str().unwrap()], home),
        "not a run directory",
    );
}

#[test]
fn finetune_keeps_the_checkpoint_conventions_and_replaces_the_head() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 96);
    let out = home.path().join("ft");
    let lite0 = fixture(LITE0);
    let o = effnet(
        &[
            "finetune",
            "--weights",
            lite0.to_str().unwrap(),
            "--dataset",
            &dataset,
            "--resolution",
            "32",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--freeze-epochs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let set = effnet::weights::load(&out.join("weights.safetensors"), None).unwrap();
    assert_eq!(set.spec().name, "efficientnet-lite0");
    assert_eq!(set.spec().num_classes, 3);
    assert_eq!(
        (set.meta.preprocess.mean, set.meta.preprocess.std),
        ([127.0; 3], [128.0; 3])
    );
    assert_eq!(
        (set.spec().padding, set.spec().bn_eps),
        (effnet::spec::Padding::Same, 1e-3)
    );
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        cfg.contains("freeze_epochs = 1") && cfg.contains("unfrozen_lr_scale = 0.1"),
        "{cfg}"
    );
    // The pretrained backbone was loaded into the same architecture.
    let pretrained = effnet::weights::load(&lite0, None).unwrap();
    assert_eq!(
        pretrained.tensors["blocks.3.dw.conv.weight"].shape,
        set.tensors["blocks.3.dw.conv.weight"].shape
    );
    assert_clean_error(
        &effnet(
            &[
                "finetune",
                "--weights",
                lite0.to_str().unwrap(),
                "--dataset",
                &dataset,
                "--epochs",
                "1",
            ],
            home.path(),
        ),
        "must be smaller than --epochs",
    );
}

#[test]
fn mixup_and_cutmix_runs_are_reproducible() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 64);
    let cfg = home.path().join("mix.toml");
    std::fs::write(
        &cfg,
        "mixup_alpha = 0.2\ncutmix_alpha = 1.0\nmax_steps = 6\nbatch_size = 16\nresolution = 16\n",
    )
    .unwrap();
    let run = |name: &str| {
        let out = home.path().join(name);
        let o = effnet(
            &[
                "train",
                "lite0",
                "--config",
                cfg.to_str().unwrap(),
                "--dataset",
                &dataset,
                "--out",
                out.to_str().unwrap(),
            ],
            home.path(),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        run_weights(&out)
    };
    let (a, b) = (run("a"), run("b"));
    assert!(
        a.keys().all(|k| a[k] == b[k]),
        "same seed, same mixed batches, same weights"
    );
}

#[test]
fn augmentation_and_progressive_learning_are_reproducible_and_recorded() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 64);
    let run = |name: &str, extra: &[&str]| {
        let out = home.path().join(name);
        let mut args = vec![
            "train",
            "lite0",
            "--dataset",
            &dataset,
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--resolution",
            "24",
            "--max-steps",
            "6",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = effnet(&args, home.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let weights = run_weights(&out);
        let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
        (weights, config)
    };
    let flags = [
        "--augment",
        "rand-n2-m9",
        "--random-resized-crop",
        "--progressive",
        "2",
        "--set",
        "lr_decay=cosine",
        "--set",
        "mixup_alpha=0.2",
    ];
    let (a, config) = run("a", &flags);
    let (b, _) = run("b", &flags);
    assert!(a.keys().all(|k| a[k] == b[k]), "same seed, same weights");
    for line in [
        "augment = \"rand-n2-m9\"",
        "random_resized_crop = true",
        "progressive_stages = 2",
        "lr_decay = \"cosine\"",
        "mixup_alpha = 0.2",
    ] {
        assert!(
            config.contains(line),
            "config.toml lacks `{line}`:\n{config}"
        );
    }
    let (v0, _) = run("v0", &["--augment", "v0"]);
    let (plain, _) = run("plain", &[]);
    assert!(
        plain.keys().any(|k| plain[k] != v0[k]),
        "AutoAugment changes what the model sees"
    );
}

#[test]
fn bad_augmentation_and_override_flags_are_rejected() {
    let home = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            &["train", "--set", "learning_rate=0.1"][..],
            "unknown field `learning_rate`",
        ),
        (&["train", "--set", "epochs"][..], "expected KEY=VALUE"),
        // Checked before the dataset is loaded and resized.
        (
            &["train", "--epochs", "2", "--progressive", "4"][..],
            "at least one epoch per stage",
        ),
    ] {
        assert_clean_error(&effnet(args, home.path()), want);
    }
    // clap's own message adds a usage hint after the error line.
    let o = effnet(&["train", "--augment", "v9"], home.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "--augment v9 should fail");
    assert!(err.contains("unknown augmentation `v9`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A stand-in for `python3`: checks it was handed effnet's embedded training benchmark script
/// (written to a temp dir, so no checkout is needed) and answers like it, or exits with `code`.
#[cfg(unix)]
fn fake_python(dir: &Path, code: u8) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("python-{code}"));
    let answer = r#"[{"runtime":"fake torch","median_ms":2.0,"p90_ms":3.0,"images_per_s":1000.0}]"#;
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in {checkout}/*) exit 7 ;; */bench_train_torch.py) ;; *) exit 9 ;; esac\n\
         grep -q efficientnet_b0 \"$1\" || exit 8\n\
         [ {code} -eq 0 ] || {{ echo 'fake failure {code}' >&2; exit {code}; }}\n\
         echo '{answer}'\n",
        checkout = env!("CARGO_MANIFEST_DIR")
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[cfg(unix)]
#[test]
fn bench_train_times_steps_beside_the_embedded_reference_script() {
    let home = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "b0",
        "--train",
        "--batch",
        "2",
        "--resolution",
        "16",
        "--iters",
        "2",
        "--json",
        "--reference",
        "--python",
    ];
    let run = |python: &Path| {
        Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args(args)
            .arg(python)
            .current_dir(home.path()) // away from the checkout's scripts/
            .output()
            .unwrap()
    };
    let o = run(&fake_python(home.path(), 0));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    assert_eq!(rows[0]["runtime"], "effnet (burn flex)");
    let median = rows[0]["median_ms"].as_f64().unwrap();
    assert!(median > 0.0);
    // The step's parts: each took time, and no more than the slowest whole step.
    let parts =
        ["forward", "backward", "update"].map(|p| rows[0]["phases_ms"][p].as_f64().unwrap());
    let slowest = rows[0]["p99_ms"].as_f64().unwrap();
    assert!(parts.iter().all(|&t| t > 0.0 && t <= slowest), "{v}");
    assert_eq!(rows[1]["runtime"], "fake torch");
    assert!(rows[1].get("phases_ms").is_none(), "{v}");

    // Exit 3 is the script's "PyTorch is not installed": effnet's own row only.
    let o = run(&fake_python(home.path(), 3));
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");

    let o = run(&fake_python(home.path(), 1));
    assert_clean_error(&o, "fake failure 1");

    for (bad, needle) in [
        (["--resolution", "0"], "at least"),
        (["--resolution", "4"], "resolution = 4 is outside 8..="),
        (["--iters", "0"], "at least"),
    ] {
        let o = effnet(&["bench", "b0", "--train", bad[0], bad[1]], home.path());
        assert_clean_error(&o, needle);
    }
    let o = effnet(&["bench", "b0", "--resolution", "0"], home.path());
    assert_clean_error(&o, "at least 1");
    // Half precision is for GPU devices, for inference as for training.
    let o = effnet(&["bench", "b0", "--mixed-precision", "f16"], home.path());
    assert_clean_error(&o, "is for GPU devices");

    // A sweep: one entry per (resolution, batch), each with its arithmetic rate.
    let o = effnet(
        &[
            "bench",
            "b0",
            "--train",
            "--resolution",
            "16,24",
            "--batch",
            "2",
            "--iters",
            "1",
            "--json",
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let sweep = v.as_array().unwrap();
    assert_eq!(sweep.len(), 2, "{v}");
    assert_eq!(sweep[1]["resolution"], 24);
    assert!(
        sweep[0]["results"][0]["gflops"].as_f64().unwrap() > 0.0,
        "{v}"
    );
    let o = effnet(&["bench", "b0", "--batch", "1,2"], home.path());
    assert_clean_error(&o, "sweeps of --train");
}

/// Writes an image folder (`train/` and `val/`) with classes `cat` (dark), `dog` (mid), `owl`
/// (bright) of `n` 12x12 PNGs each.
fn tiny_image_folder(dir: &Path, n: usize) {
    for split in ["train", "val"] {
        for (i, class) in ["cat", "dog", "owl"].iter().enumerate() {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for j in 0..n {
                let v = (30 + 90 * i + j) as u8;
                // A little texture, so crops and flips of one image differ.
                image::RgbImage::from_fn(12, 12, |x, y| {
                    let t = v.saturating_add(((x * 3 + y * 5) % 7) as u8);
                    image::Rgb([t, v, v])
                })
                .save(d.join(format!("{j}.png")))
                .unwrap();
            }
        }
    }
}

/// `eval` and `classify` need nothing but the weights file a run wrote.
fn weights_load_alone(home: &Path, weights: &Path, dataset: &str, class_name: &str) {
    let w = weights.to_str().unwrap();
    let o = effnet(&["eval", "--weights", w, "--dataset", dataset], home);
    assert!(
        o.status.success(),
        "eval: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let img = home.join("probe.png");
    image::RgbImage::from_pixel(20, 20, image::Rgb([120, 120, 120]))
        .save(&img)
        .unwrap();
    let o = effnet(&["classify", "--weights", w, img.to_str().unwrap()], home);
    assert!(
        o.status.success(),
        "classify: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains(class_name), "{}", stdout(&o));
}

#[test]
fn scaled_and_resumed_runs_load_back_with_their_weights_alone() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 48);
    let steps = [
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--dataset",
        &dataset,
    ];
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&steps);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        let o = effnet(&args, home.path());
        assert!(
            o.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let phi = home.path().join("phi");
    train(&phi, &["--phi", "1"]);
    let set = effnet::weights::load(&phi.join("weights.safetensors"), None).unwrap();
    assert_eq!(set.spec().name, "efficientnet-b0(phi=1)");
    assert!((set.spec().depth - 1.2).abs() < 1e-12 && (set.spec().width - 1.1).abs() < 1e-12);
    assert_eq!(set.spec().resolution, 37, "32 x 1.15");
    weights_load_alone(
        home.path(),
        &phi.join("weights.safetensors"),
        &dataset,
        "class ",
    );

    let wd = home.path().join("wd");
    train(&wd, &["--width", "1.3", "--depth", "0.8"]);
    let set = effnet::weights::load(&wd.join("weights.safetensors"), None).unwrap();
    assert!((set.spec().width - 1.3).abs() < 1e-12 && (set.spec().depth - 0.8).abs() < 1e-12);
    weights_load_alone(
        home.path(),
        &wd.join("weights.safetensors"),
        &dataset,
        "class ",
    );

    // A plain run continued with --resume keeps its architecture and name.
    let plain = home.path().join("plain");
    train(&plain, &["lite0"]);
    let o = effnet(
        &[
            "train",
            "--resume",
            plain.to_str().unwrap(),
            "--max-steps",
            "6",
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let set = effnet::weights::load(&plain.join("weights.safetensors"), None).unwrap();
    assert_eq!(set.spec().name, "efficientnet-lite0");
    weights_load_alone(
        home.path(),
        &plain.join("weights.safetensors"),
        &dataset,
        "class ",
    );

    // Editing the recorded architecture or recipe before resuming is refused.
    let cfg = plain.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("seed = 0", "seed = 5")).unwrap();
    assert_clean_error(
        &effnet(&["train", "--resume", plain.to_str().unwrap()], home.path()),
        "changed since the last checkpoint (seed)",
    );
    std::fs::write(&cfg, text.replace("width = 1.0", "width = 2.0")).unwrap();
    assert_clean_error(
        &effnet(&["train", "--resume", plain.to_str().unwrap()], home.path()),
        "(model)",
    );
}

#[test]
fn finetuned_weights_print_the_folder_class_names() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("pets");
    tiny_image_folder(&folder, 6);
    let out = home.path().join("ft");
    let lite0 = fixture(LITE0);
    let o = effnet(
        &[
            "finetune",
            "--weights",
            lite0.to_str().unwrap(),
            "--dataset",
            folder.to_str().unwrap(),
            "--resolution",
            "32",
            "--batch-size",
            "6",
            "--epochs",
            "2",
            "--max-steps",
            "4",
            "--out",
            out.to_str().unwrap(),
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w = out.join("weights.safetensors");
    let o = effnet(
        &[
            "classify",
            "--weights",
            w.to_str().unwrap(),
            "--json",
            "--top",
            "3",
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut labels: Vec<&str> = v[0]["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    labels.sort();
    assert_eq!(labels, ["cat", "dog", "owl"]);
    weights_load_alone(home.path(), &w, folder.to_str().unwrap(), "cat");
}

#[test]
fn absurd_scaling_is_a_one_line_error() {
    let home = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (&["--phi", "1000"][..], "phi 1000"),
        (&["--depth", "1e9"][..], "blocks"),
        (&["--width", "1e9"][..], "channels"),
        (&["--res-mult", "1e6"][..], "pixels wide"),
        (&["--resolution", "1099511627776"][..], "64 bits"),
    ] {
        let mut all = vec!["info", "b0"];
        all.extend_from_slice(args);
        assert_clean_error(&effnet(&all, home.path()), needle);
    }
    // Large but sane scalings still answer.
    let o = effnet(&["info", "b0", "--phi", "8"], home.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_study_resumes_without_repeating_a_run_and_reports() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 48);
    let study = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "study",
            "single-dim",
            "--dataset",
            &dataset,
            "--resolution",
            "16",
            "--epochs",
            "1",
            "--train-limit",
            "0",
            "--depth",
            "2",
            "--width",
            "1.5",
            "--resolution-mult",
            "1.5",
            "--set",
            "batch_size=16",
            "--set",
            "precise_bn_batches=2",
        ];
        if !extra.contains(&"--seeds") {
            args.extend_from_slice(&["--seeds", "1"]);
        }
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        effnet(&args, home.path())
    };
    let whole = home.path().join("whole");
    let o = study(&whole, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Stopped after its first run, then started again.
    let split = home.path().join("split");
    let o = study(&split, &["--max-runs", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = split.join("runs/base-s0/result.json");
    let before = std::fs::read_to_string(&first).unwrap();
    let log = std::fs::metadata(split.join("runs/base-s0/train.log"))
        .unwrap()
        .len();
    let o = study(&split, &["--jobs", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        before,
        "first run redone"
    );
    assert_eq!(
        std::fs::metadata(split.join("runs/base-s0/train.log"))
            .unwrap()
            .len(),
        log
    );
    let top1 = |dir: &Path| -> Vec<(String, f64)> {
        std::fs::read_to_string(dir.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["id"].as_str().unwrap().to_string(),
                    v["top1"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(top1(&whole).len(), 4);
    assert_eq!(top1(&whole), top1(&split), "resumed study differs");
    for f in ["results.csv", "report.md", "single-dim.png", "plan.md"] {
        assert!(split.join(f).exists(), "{f}");
    }
    // Each run's weights load with `eval --weights` alone.
    let w = split.join("runs/width-1.5-s0/weights.safetensors");
    let o = effnet(
        &[
            "eval",
            "--weights",
            w.to_str().unwrap(),
            "--dataset",
            &dataset,
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same directory with other options is a different study.
    assert_clean_error(
        &study(&split, &["--set", "label_smoothing=0.2"]),
        "recipe fields differ: label_smoothing",
    );
    // More seeds grow the study: only the new runs train; fewer seeds again is another study.
    let o = study(&split, &["--seeds", "2", "--max-runs", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&first).unwrap(), before);
    assert_eq!(top1(&split).len(), 5);
    assert!(split.join("runs/base-s1/result.json").exists());
    assert_clean_error(&study(&split, &[]), "holds a different study");
}

#[test]
fn study_plans_reject_bad_input() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 48);
    let plan = |args: &[&str]| {
        let mut all = vec!["study"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--dataset", &dataset, "--dry-run", "--set", "batch_size=8"]);
        effnet(&all, home.path())
    };
    assert_clean_error(
        &plan(&["scaling", "--methods", "height"]),
        "unknown scaling method `height`",
    );
    assert_clean_error(
        &plan(&["scaling", "--targets", "1000000"]),
        "cannot reach 1000000x",
    );
    assert_clean_error(&plan(&["scaling", "--targets", "2"]), "cannot reach 2x");
    assert_clean_error(
        &plan(&[
            "grid",
            "--tolerance",
            "0.0001",
            "--step",
            "0.5",
            "--flops",
            "2.3",
        ]),
        "widen the tolerance",
    );
    assert_clean_error(
        &effnet(
            &["study", "grid", "--dataset", "nowhere:", "--dry-run"],
            home.path(),
        ),
        "unknown dataset",
    );
    let o = plan(&[
        "scaling",
        "--skip-unreachable",
        "--seeds",
        "1",
        "--resolution",
        "32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("skipped: scaling by compound"));
    assert!(stdout(&o).contains("x4-compound-s0"));
}

/// A small valid weights file (B0 with 3 classes, random) written through `convert`'s code path.
fn small_weights(dir: &Path) -> std::path::PathBuf {
    let mut spec = effnet::spec::variant("b0").unwrap();
    spec.num_classes = 3;
    let set = effnet::weights::WeightSet::random(&spec, 1);
    let path = dir.join("small.safetensors");
    effnet::weights::write_safetensors(&path, &set).unwrap();
    path
}

#[test]
fn hostile_files_fail_cleanly_and_quickly() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let w = small_weights(dir);
    let img = dir.join("grey.png");
    image::RgbImage::from_pixel(40, 30, image::Rgb([90, 90, 90]))
        .save(&img)
        .unwrap();
    let (w_s, img_s) = (w.to_str().unwrap(), img.to_str().unwrap());
    // A FIFO as weights or image: an error, not a hang.
    let fifo = dir.join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let fifo_s = fifo.to_str().unwrap();
    assert_clean_error(
        &effnet(&["classify", "--weights", fifo_s, img_s], dir),
        "not a regular file",
    );
    assert_clean_error(
        &effnet(&["classify", "--weights", w_s, fifo_s], dir),
        "not a regular file",
    );
    // `convert` never replaces a FIFO or a symlink with a regular file.
    assert_clean_error(
        &effnet(&["convert", w_s, fifo_s], dir),
        "not a regular file",
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    let target = dir.join("target.txt");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_clean_error(
        &effnet(&["convert", w_s, link.to_str().unwrap()], dir),
        "cannot write weights",
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // NaN weights are refused by name.
    let (mut t, meta) = effnet::weights::read_tensors(&w).unwrap();
    t.get_mut("head.bn.running_var").unwrap().data[0] = f32::NAN;
    let set = effnet::weights::WeightSet {
        meta: meta.unwrap(),
        tensors: t,
    };
    let nan = dir.join("nan.safetensors");
    effnet::weights::write_safetensors(&nan, &set).unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", nan.to_str().unwrap(), img_s],
            dir,
        ),
        "`head.bn.running_var` holds NaN",
    );
    // A key with a newline and ANSI escapes prints as one escaped line.
    let data = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    let evil = "x\nerror: fake\u{1b}[31m".repeat(1000);
    let bytes = safetensors::tensor::serialize([(evil.as_str(), view)], None).unwrap();
    let bad = dir.join("evil.safetensors");
    std::fs::write(&bad, bytes).unwrap();
    let o = effnet(
        &["classify", "--weights", bad.to_str().unwrap(), img_s],
        dir,
    );
    assert_clean_error(&o, "unknown key layout");
    assert!(o.stderr.len() < 2000, "{} bytes of error", o.stderr.len());
    // A 1x65535 strip and a JPEG cut inside its scan.
    let strip = dir.join("strip.png");
    image::GrayImage::new(1, 65535).save(&strip).unwrap();
    assert_clean_error(
        &effnet(
            &["classify", "--weights", w_s, strip.to_str().unwrap()],
            dir,
        ),
        "longer side would be",
    );
    let mut jpeg = Vec::new();
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 3, y as u8 * 3, 7]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &jpeg[..jpeg.len() * 2 / 3]).unwrap();
    assert_clean_error(
        &effnet(&["classify", "--weights", w_s, cut.to_str().unwrap()], dir),
        "truncated",
    );
    // Many images are classified in batches (more than one batch here).
    let many: Vec<String> = (0..40).map(|_| img_s.to_string()).collect();
    let mut args = vec!["classify", "--weights", w_s, "--json"];
    args.extend(many.iter().map(String::as_str));
    let o = effnet(&args, dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 40);
    // IDX files of 0x0 images.
    let data = dir.join("empty-idx");
    std::fs::create_dir(&data).unwrap();
    for (prefix, n) in [("train", 4u32), ("t10k", 2)] {
        let mut imgs = vec![0, 0, 8, 3];
        for d in [n, 0, 0] {
            imgs.extend(d.to_be_bytes());
        }
        std::fs::write(data.join(format!("{prefix}-images-idx3-ubyte")), imgs).unwrap();
        let mut lab = vec![0, 0, 8, 1];
        lab.extend(n.to_be_bytes());
        lab.extend(vec![0u8; n as usize]);
        std::fs::write(data.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
    let idx = format!("idx:{}", data.display());
    assert_clean_error(
        &effnet(&["train", "--dataset", &idx, "--batch-size", "2"], dir),
        "images are 0x0 pixels",
    );
}

#[test]
fn bad_flags_and_configs_fail_before_any_work() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let dataset = tiny_dataset(dir, 32);
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--dataset", dataset.as_str()];
        if !extra.contains(&"--batch-size") {
            args.extend_from_slice(&["--batch-size", "8"]);
        }
        args.extend_from_slice(extra);
        let start = std::time::Instant::now();
        let o = effnet(&args, dir);
        assert!(start.elapsed().as_secs() < 30, "{extra:?} took too long");
        o
    };
    for (flags, needle) in [
        (&["--set", "mixup_alpha=inf"][..], "mixup_alpha"),
        (&["--set", "mixup_alpha=30"][..], "mixup_alpha"),
        (&["--set", "cutmix_alpha=1e-320"][..], "cutmix_alpha"),
        (&["--set", "label_smoothing=5"][..], "label_smoothing = 5"),
        (&["--set", "bn_momentum=5"][..], "bn_momentum = 5"),
        (&["--batch-size", "0"][..], "batch_size = 0"),
        (&["--resolution", "4"][..], "resolution = 4"),
        (&["--set", "model=lite0"][..], "first argument"),
    ] {
        assert_clean_error(&train(flags), needle);
    }
    // `--set dataset=...` names the data when `--dataset` does not.
    assert_clean_error(
        &effnet(&["train", "--set", "dataset=nowhere:"], dir),
        "unknown dataset",
    );
    let w = small_weights(dir);
    assert_clean_error(
        &effnet(
            &[
                "eval",
                "--weights",
                w.to_str().unwrap(),
                "--threads",
                "10000",
            ],
            dir,
        ),
        "--threads is at most",
    );
    assert_clean_error(
        &effnet(&["bench", "b0", "--threads", "10000"], dir),
        "more than 256",
    );
    assert_clean_error(
        &effnet(&["bench", "b0", "--batch", "100000"], dir),
        "needs about",
    );
    // A run whose progress file was tampered with, and a second trainer in a directory in use.
    let run = dir.join("run");
    let o = train(&["--max-steps", "2", "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let progress = run.join("checkpoint/progress.json");
    let text = std::fs::read_to_string(&progress).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["seconds"] = (-5.0).into();
    std::fs::write(&progress, v.to_string()).unwrap();
    assert_clean_error(
        &effnet(&["train", "--resume", run.to_str().unwrap()], dir),
        "is not a duration",
    );
    v["seconds"] = 1.0.into();
    v["loss_scale"] = serde_json::json!({"scale": 0.0, "good_steps": 3});
    std::fs::write(&progress, v.to_string()).unwrap();
    assert_clean_error(
        &effnet(&["train", "--resume", run.to_str().unwrap()], dir),
        "is not a loss scale",
    );
    std::fs::write(&progress, text).unwrap();
    let lock = std::fs::File::options()
        .write(true)
        .open(run.join(".lock"))
        .unwrap();
    lock.lock().unwrap();
    assert_clean_error(
        &effnet(
            &[
                "train",
                "--resume",
                run.to_str().unwrap(),
                "--max-steps",
                "3",
            ],
            dir,
        ),
        "in use by another training process",
    );
}

#[test]
fn eval_on_an_image_folder_reads_val_alone_with_the_weights_transform() {
    let home = tempfile::tempdir().unwrap();
    let folder = home.path().join("pets");
    tiny_image_folder(&folder, 4);
    // train/ is neither needed nor read: a broken file there changes nothing.
    std::fs::write(folder.join("train/cat/broken.png"), b"not a png").unwrap();
    let mut spec = effnet::spec::variant("b0").unwrap();
    spec.num_classes = 3;
    let w = home.path().join("w.safetensors");
    effnet::weights::write_safetensors(&w, &effnet::weights::WeightSet::random(&spec, 3)).unwrap();
    let o = effnet(
        &[
            "eval",
            "--weights",
            w.to_str().unwrap(),
            "--dataset",
            folder.to_str().unwrap(),
            "--json",
        ],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["images"], 12);
}

#[test]
fn presets_are_chosen_stored_and_checked() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let timm = fixture(TIMM_B0);
    let timm_s = timm.to_str().unwrap();
    let out = dir.join("b0.safetensors");
    let out_s = out.to_str().unwrap();
    // convert stores the chosen preset (AdvProp: its own normalisation) in the weights.
    let o = effnet(
        &[
            "convert",
            timm_s,
            out_s,
            "--preset",
            "tf_efficientnet_b0.ap_in1k",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("tf_efficientnet_b0.ap_in1k"));
    let set = effnet::weights::load(&out, None).unwrap();
    assert_eq!(
        set.meta.preset.as_deref(),
        Some("tf_efficientnet_b0.ap_in1k")
    );
    assert_eq!(set.meta.preprocess.mean, [127.5; 3]);
    // Without a preset, the assumed one is named.
    let o = effnet(&["convert", timm_s, out_s], dir);
    assert!(
        stdout(&o).contains("tf_efficientnet_b0.in1k"),
        "{}",
        stdout(&o)
    );
    // Overrides on top of the preset.
    let o = effnet(
        &[
            "convert",
            timm_s,
            out_s,
            "--crop-pct",
            "1.0",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.25,0.25,0.25",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = effnet::weights::load(&out, None).unwrap().meta.preprocess;
    assert_eq!((p.resize, p.crop, p.std), (224, 224, [63.75; 3]));
    for (args, needle) in [
        (
            &["--preset", "tf_efficientnet_b0.bogus"][..],
            "tags of `tf_efficientnet_b0`",
        ),
        (
            &["--preset", "tf_efficientnetv2_s.in1k"][..],
            "is for tf_efficientnetv2_s",
        ),
        (&["--mean", "0.5,0.5"][..], "--mean takes three values"),
        (&["--std", "0.5,0,0.5"][..], "--std values must be positive"),
        (&["--crop-pct", "1.5"][..], "--crop-pct must be in (0, 1]"),
        (&["--crop-pct", "0"][..], "--crop-pct must be in (0, 1]"),
    ] {
        let mut all = vec!["convert", timm_s, out_s];
        all.extend_from_slice(args);
        assert_clean_error(&effnet(&all, dir), needle);
    }
    // doctor names the layout, the assumption and the candidates, and runs them on photos.
    let coffee = fixture("images/coffee.png");
    let o = effnet(
        &[
            "doctor",
            "--weights",
            timm_s,
            "--images",
            coffee.to_str().unwrap(),
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    for needle in [
        "layout        timm",
        "inferred from the tensor shapes",
        "tf_efficientnet_b0.ap_in1k",
        "tf_ (SAME padding",
        "top-1 per transform",
    ] {
        assert!(out.contains(needle), "`{needle}` missing:\n{out}");
    }
    let o = effnet(&["presets", "v2_l"], dir);
    assert!(stdout(&o).contains("efficientnet_v2_l.IMAGENET1K_V1"));
}

#[test]
fn a_search_scores_candidates_resumes_and_reports() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 48);
    let out = home.path().join("search");
    let search = |extra: &[&str]| {
        let mut args = vec![
            "search",
            "--dataset",
            &dataset,
            "--resolution",
            "16",
            "--epochs",
            "1",
            "--train-limit",
            "0",
            "--set",
            "batch_size=16",
            "--set",
            "precise_bn_batches=1",
            "--controller",
            "evolution",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        effnet(&args, home.path())
    };
    let o = search(&["--candidates", "2", "--compare-seeds", "0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("compare").exists());
    let first = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
    assert_eq!(first.lines().count(), 2);
    let log = std::fs::metadata(out.join("candidates/0/train.log"))
        .unwrap()
        .len();
    let o = search(&["--candidates", "3", "--compare-seeds", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let all = std::fs::read_to_string(out.join("history.jsonl")).unwrap();
    // The comparison: B0, the best candidate (and the most accurate within T when that is another
    // architecture), 2 seeds each, at phi 0 and 1, in the report.
    let compared = std::fs::read_to_string(out.join("compare/results.jsonl")).unwrap();
    let names = if compared.contains("found-within-t") {
        3
    } else {
        2
    };
    assert_eq!(compared.lines().count(), 4 * names, "{compared}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("- phi = 1: found"), "{report}");
    let scaled = out.join("compare/found-phi1-s1.json");
    let trained_at = std::fs::metadata(&scaled).unwrap().modified().unwrap();
    assert_eq!(all.lines().count(), 3);
    assert!(all.starts_with(&first), "earlier candidates changed");
    assert_eq!(
        std::fs::metadata(out.join("candidates/0/train.log"))
            .unwrap()
            .len(),
        log
    );
    for f in ["history.csv", "report.md", "search.png", "reference.json"] {
        assert!(out.join(f).exists(), "{f}");
    }
    // The reported architecture is usable at once.
    let arch = stdout(&o)
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("--arch ")
        .trim_matches('"')
        .to_string();
    let o = effnet(
        &["info", "--arch", &arch, "--resolution", "16"],
        home.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Run again: nothing is retrained.
    let o = search(&["--candidates", "3", "--compare-seeds", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::metadata(&scaled).unwrap().modified().unwrap(),
        trained_at
    );
    // Bad input.
    assert_clean_error(&search(&["--w", "0.5"]), "must be zero or negative");
    assert_clean_error(
        &search(&["--compare-phi", "-1"]),
        "must be a positive number",
    );
    assert_clean_error(
        &search(&["--target-mflops", "1000000"]),
        "no architecture in the space",
    );
    assert_clean_error(
        &effnet(&["info", "--arch", "r1_k4_s11_e1_i32_o16"], home.path()),
        "kernels must be odd",
    );
}

#[test]
fn embed_writes_features_of_files_and_folders() {
    let home = tempfile::tempdir().unwrap();
    let photos = home.path().join("photos");
    std::fs::create_dir_all(photos.join("more")).unwrap();
    std::fs::copy(fixture("images/coffee.png"), photos.join("coffee.png")).unwrap();
    std::fs::copy(
        fixture("images/chelsea.png"),
        photos.join("more/chelsea.png"),
    )
    .unwrap();
    std::fs::write(photos.join("notes.txt"), "not an image").unwrap();
    let weights = fixture(LITE0);
    let embed = |extra: &[&str]| {
        let mut args = vec!["embed", "--weights", weights.to_str().unwrap()];
        args.extend_from_slice(extra);
        effnet(&args, home.path())
    };
    let dir = photos.to_str().unwrap();
    let npy = home.path().join("pooled.npy");
    let o = embed(&[dir, "--out", npy.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("2 images"), "{}", stdout(&o));
    let bytes = std::fs::read(&npy).unwrap();
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'shape': (2, 1280)"), "{header}");
    assert_eq!(bytes.len(), 10 + len + 2 * 1280 * 4);
    let npy_values: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    // Every tap in one safetensors file, in batches of one: the same pooled features.
    let st = home.path().join("all.safetensors");
    let o = embed(&[
        dir,
        "--taps",
        "pooled,8,32",
        "--batch",
        "1",
        "--threads",
        "2",
        "--out",
        st.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = std::fs::read(&st).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&file).unwrap();
    let images = &meta.metadata().as_ref().unwrap()["images"];
    assert!(
        images.contains("coffee.png") && images.contains("more/chelsea.png"),
        "{images}"
    );
    let tensors = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(tensors.tensor("pooled").unwrap().shape(), [2, 1280]);
    assert_eq!(
        tensors.tensor("features.8").unwrap().shape(),
        [2, 40, 28, 28]
    );
    assert_eq!(
        tensors.tensor("features.32").unwrap().shape(),
        [2, 320, 7, 7]
    );
    let pooled: Vec<f32> = tensors
        .tensor("pooled")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let diff = pooled
        .iter()
        .zip(&npy_values)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff < 1e-5, "{diff}");
    // JSON lines: one per image.
    let jsonl = home.path().join("f.jsonl");
    let coffee = photos.join("coffee.png");
    let o = embed(&[coffee.to_str().unwrap(), "--out", jsonl.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["pooled"].as_array().unwrap().len(), 1280);
    // Bad input: nothing is written.
    let bad = home.path().join("bad.npy");
    let b = bad.to_str().unwrap();
    assert_clean_error(
        &embed(&[dir, "--taps", "pooled,8", "--out", b]),
        "one array",
    );
    assert_clean_error(
        &embed(&[dir, "--taps", "64", "--out", b]),
        "no feature map at reduction 64",
    );
    assert_clean_error(
        &embed(&[dir, "--taps", "big", "--out", b]),
        "neither `pooled`",
    );
    assert_clean_error(
        &embed(&[dir, "--out", "f.txt"]),
        ".safetensors, .npy or .jsonl",
    );
    let empty = home.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_error(
        &embed(&[empty.to_str().unwrap(), "--out", b]),
        "no image files",
    );
    assert_clean_error(&embed(&["/nonexistent.png", "--out", b]), "nonexistent");
    assert!(!bad.exists());
}

#[test]
fn export_onnx_writes_a_model_and_rejects_bad_options() {
    let home = tempfile::tempdir().unwrap();
    let out = home.path().join("lite0.onnx");
    let w = fixture(LITE0);
    let export = |extra: &[&str]| {
        let mut args = vec!["export", "onnx", "--weights", w.to_str().unwrap()];
        args.extend_from_slice(extra);
        effnet(&args, home.path())
    };
    let o = export(&["--out", out.to_str().unwrap(), "--dynamic-batch"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout(&o).contains("224x224 (batch N, opset 17)"),
        "{}",
        stdout(&o)
    );
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes.len() > 4_000_000, "{}", bytes.len());
    // The preprocessing travels in the metadata.
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("effnet.preprocess") && text.contains("espresso"));
    let bad = home.path().join("bad.onnx");
    let b = bad.to_str().unwrap();
    assert_clean_error(
        &export(&["--out", b, "--opset", "7"]),
        "--opset 7 is not supported",
    );
    assert_clean_error(&export(&["--out", b, "--resolution", "0"]), "too small");
    assert_clean_error(
        &export(&["--out", "/nonexistent/dir/m.onnx"]),
        "cannot write",
    );
    assert!(!bad.exists());
}

/// `effnet quantize` on real weights and photos writes int8 weights (and a report) that classify,
/// bench and embed run in int8 by default; bad calibration input and flags are one-line errors.
#[test]
fn quantize_writes_int8_weights_that_every_command_runs() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path();
    let lite0 = fixture(LITE0);
    let lite0 = lite0.to_str().unwrap();
    let coffee = fixture("images/coffee.png");
    let coffee = coffee.to_str().unwrap();
    let jpegs = fixture("jpeg");
    let w8 = dir.join("lite0-int8.safetensors");
    let w8s = w8.to_str().unwrap();
    let o = effnet(
        &[
            "quantize",
            "--weights",
            lite0,
            "--calib",
            jpegs.to_str().unwrap(),
            coffee,
            "--out",
            w8s,
            "--threads",
            "2",
        ],
        dir,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = stdout(&o);
    assert!(
        out.contains("GEMM layers in int8") && out.contains("held out"),
        "{out}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("lite0-int8.report.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["calibration_images"].as_u64().unwrap() + report["holdout_images"].as_u64().unwrap(),
        11
    );
    assert!(report["calibration"]["top1"].as_f64().unwrap() >= 0.99);
    assert!(report["layers"].as_array().unwrap().len() > 30);

    let o = effnet(&["classify", "--weights", w8s, coffee, "--top", "1"], dir);
    assert!(stdout(&o).contains("espresso"), "{}", stdout(&o));
    // Same weights, forced fp32 and int8: the default is int8 where the CPU has AVX512-VNNI or
    // AVX2 and fp32 elsewhere (the portable int8 loop is slower than f32); `doctor` says which,
    // and that is what ran.
    let o = effnet(&["doctor", "--weights", w8s], dir);
    let doctor = stdout(&o);
    assert!(doctor.contains("GEMM layers (mse of"), "{doctor}");
    let default = match doctor.contains("runs in int8 by default") {
        true => "int8",
        false => {
            assert!(doctor.contains("runs in fp32 by default here"), "{doctor}");
            "fp32"
        }
    };
    let p = |args: &[&str]| {
        let o = effnet(
            &[&["classify", "--weights", w8s, coffee, "--json"], args].concat(),
            dir,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        stdout(&o)
    };
    let (int8, fp32) = (p(&["--precision", "int8"]), p(&["--precision", "fp32"]));
    assert_ne!(int8, fp32);
    assert_eq!(p(&[]), if default == "int8" { int8 } else { fp32 });
    let o = effnet(
        &["bench", "--weights", w8s, "--iters", "2", "--threads", "2"],
        dir,
    );
    let bench = stdout(&o);
    assert!(
        o.status.success() && bench.contains("effnet engine"),
        "{bench}"
    );
    assert_eq!(
        bench.contains("effnet engine int8"),
        default == "int8",
        "{bench}"
    );
    // Each engine timed says how often its thread policy ran one thread.
    assert!(bench.contains("thread policy: "), "{bench}");
    assert_eq!(
        bench.contains("thread policy (int8): "),
        default == "int8",
        "{bench}"
    );
    let npy = dir.join("f.npy");
    let o = effnet(
        &[
            "embed",
            "--weights",
            w8s,
            "--out",
            npy.to_str().unwrap(),
            coffee,
        ],
        dir,
    );
    assert!(
        o.status.success() && npy.exists(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Bad input.
    assert_clean_error(
        &effnet(
            &[
                "classify",
                "--weights",
                lite0,
                "--precision",
                "int8",
                coffee,
            ],
            dir,
        ),
        "effnet quantize",
    );
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.join("x.safetensors");
    let out = out.to_str().unwrap();
    let q = |args: &[&str]| {
        effnet(
            &[&["quantize", "--weights", lite0, "--out"], args].concat(),
            dir,
        )
    };
    assert_clean_error(
        &q(&[out, "--calib", empty.to_str().unwrap()]),
        "no calibration images",
    );
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "not an image").unwrap();
    assert_clean_error(&q(&[out, "--calib", notes.to_str().unwrap()]), "notes.txt");
    assert_clean_error(
        &q(&[out, "--calib", coffee, "--threshold", "2"]),
        "--threshold",
    );
    assert_clean_error(&q(&[out, "--calib", coffee, "--holdout", "1"]), "--holdout");
    assert_clean_error(
        &q(&[&dir.join("x.pth").to_string_lossy(), "--calib", coffee]),
        ".safetensors",
    );
    let o = q(&[out, "--calib", coffee, "--method", "entropy"]);
    assert!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("mse, minmax or percentile")
    );
    assert!(
        !dir.join("x.safetensors").exists(),
        "nothing written on errors"
    );
}

/// The training step's parallel ops (1x1 convolutions by image and output-channel block,
/// depthwise and batch norm by fixed chunks) do not depend on the thread count: the same seed gives
/// bit-identical weights on one thread and on two, and the same logged training loss (its L2 term
/// is summed beside the forward pass on two threads). B0 (SiLU, squeeze-excite, stochastic depth)
/// and Lite0 (ReLU6).
#[test]
fn training_is_bit_identical_on_one_and_two_threads() {
    let home = tempfile::tempdir().unwrap();
    let dataset = tiny_dataset(home.path(), 96);
    for model in ["b0", "lite0"] {
        same_training_on_one_and_two_threads(home.path(), &dataset, model);
    }
}

fn same_training_on_one_and_two_threads(home: &Path, dataset: &str, model: &str) {
    let (mut weights, mut losses) = (Vec::new(), Vec::new());
    for threads in ["1", "2"] {
        let out = home.join(format!("{model}-run{threads}"));
        let o = Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args([
                "train",
                model,
                "--dataset",
                dataset,
                "--resolution",
                "32",
                "--batch-size",
                "16",
            ])
            .args(["--epochs", "1", "--out", out.to_str().unwrap()])
            .env("EFFNET_HOME", home)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        weights.push(run_weights(&out));
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let first: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        losses.push(first["train_loss"].as_f64().unwrap());
    }
    assert!(!weights[0].is_empty());
    for (name, t) in &weights[0] {
        assert_eq!(t.data, weights[1][name].data, "{model}: {name}");
    }
    assert!(losses[0] > 0.0);
    assert_eq!(
        losses[0].to_bits(),
        losses[1].to_bits(),
        "{model}: {losses:?}"
    );
}
