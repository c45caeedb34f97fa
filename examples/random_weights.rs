//! Random weights for any variant, as a weights file: for timing models that have no published
//! checkpoint here (`effnet bench --weights`, `effnet quantize`), as docs/benchmarks.md does for
//! V2's int8 figures. FIRST_OUTPUTS widens (or narrows) the first block's output channels, to
//! time one convolution at several widths.
//!
//!   cargo run --release --example random_weights -- MODEL OUT.safetensors [FIRST_OUTPUTS]

use anyhow::{Context, bail};
use effnet::weights::{self, WeightSet};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, out, first) = match args.as_slice() {
        [model, out] => (model, out, None),
        [model, out, first] => (model, out, Some(first)),
        _ => bail!("usage: random_weights MODEL OUT.safetensors [FIRST_OUTPUTS]"),
    };
    let mut spec = effnet::spec::variant(model)?;
    if let Some(first) = first {
        let outputs: usize = first.parse().ok().filter(|&c| c > 0).with_context(|| {
            format!("FIRST_OUTPUTS must be a positive whole number, not {first:?}")
        })?;
        if spec.blocks.len() < 2 {
            bail!("{model} has fewer than two blocks");
        }
        spec.blocks[0].out_channels = outputs;
        spec.blocks[1].in_channels = outputs;
    }
    let set = WeightSet::random(&spec, 7);
    weights::write_safetensors(std::path::Path::new(out), &set)
        .with_context(|| format!("writing `{out}`"))?;
    println!("{} ({} tensors) -> {out}", spec.name, set.tensors.len());
    Ok(())
}
