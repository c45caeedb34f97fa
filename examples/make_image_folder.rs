//! Writes a synthetic image folder for loader and memory measurements:
//! `cargo run --release --example make_image_folder -- DIR N [WIDTHxHEIGHT]` makes
//! `DIR/train/c0..c9/` with N JPEGs in all and `DIR/val/` with N/10, each image a class-coloured
//! gradient with seeded noise (so the JPEGs do not compress to nothing), 320x240 by default.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: make_image_folder DIR N [WIDTHxHEIGHT]";
    let dir = PathBuf::from(args.first().ok_or_else(|| anyhow::anyhow!(usage))?);
    let n: usize = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let (w, h) = match args.get(2) {
        Some(s) => {
            let (w, h) = s.split_once('x').ok_or_else(|| anyhow::anyhow!(usage))?;
            (w.parse::<u32>()?, h.parse::<u32>()?)
        }
        None => (320, 240),
    };
    const CLASSES: usize = 10;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 48) as u8
    };
    for (split, count) in [("train", n), ("val", n.div_ceil(10))] {
        for c in 0..CLASSES {
            std::fs::create_dir_all(dir.join(split).join(format!("c{c}")))?;
        }
        for i in 0..count {
            let c = i % CLASSES;
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let base = [(c * 25) as u8, (x * 200 / w) as u8, (y * 200 / h) as u8];
                image::Rgb(base.map(|v| v.saturating_add(noise())))
            });
            img.save(dir.join(split).join(format!("c{c}/{i:06}.jpg")))?;
        }
    }
    println!(
        "{}: {n} train and {} val images, {w}x{h}, {CLASSES} classes",
        dir.display(),
        n.div_ceil(10)
    );
    Ok(())
}
