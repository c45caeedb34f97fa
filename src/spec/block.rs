//! Block arguments and the TF block-string codec (`r1_k3_s11_e1_i32_o16_se0.25`).
//!
//! Grammar (order-free, `_`-separated): `r` repeats, `k` kernel, `s` stride (`s2` or TF V1's `s22`),
//! `e` expansion ratio, `i` input channels, `o` output channels, `se` squeeze-excite ratio,
//! `c` conv type (`c1` = Fused-MBConv), `noskip` disables the identity shortcut.

use std::fmt;

use crate::spec::SpecError;

/// Largest kernel, stride, expansion ratio and repeat count a block string may ask for.
const MAX_KERNEL: usize = 15;
const MAX_STRIDE: usize = 4;
const MAX_EXPAND: usize = 32;
const MAX_REPEATS: usize = 256;

/// Which convolution a block starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BlockKind {
    /// Inverted residual: 1x1 expand (skipped when e = 1) -> depthwise kxk -> SE -> 1x1 project.
    MbConv,
    /// EfficientNetV2's Fused-MBConv: kxk expand (or a single kxk conv when e = 1) -> SE -> 1x1 project.
    FusedMbConv,
}

/// One stage of a network as written in a block string (before width/depth scaling).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockArgs {
    pub kind: BlockKind,
    pub repeats: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand_ratio: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Squeeze-excite ratio relative to the block's INPUT channels; `None` means no SE.
    pub se_ratio: Option<f64>,
    /// Identity shortcut allowed (still requires stride 1 and in == out).
    pub id_skip: bool,
}

impl BlockArgs {
    /// Decodes one TF block string.
    pub fn decode(s: &str) -> Result<Self, SpecError> {
        let bad = |why: String| SpecError::BlockString {
            block: s.to_string(),
            why,
        };
        let mut repeats = None;
        let mut kernel = None;
        let mut stride = None;
        let mut expand = None;
        let mut input = None;
        let mut output = None;
        let mut se_ratio = None;
        let mut kind = BlockKind::MbConv;
        let mut id_skip = true;
        for op in s.split('_').filter(|p| !p.is_empty()) {
            if op == "noskip" {
                id_skip = false;
                continue;
            }
            let split = op
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .ok_or_else(|| bad(format!("option `{op}` has no value")))?;
            let (key, value) = op.split_at(split);
            let int = || {
                value
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{op}`: `{value}` is not a whole number")))
            };
            match key {
                "r" => repeats = Some(int()?),
                "k" => kernel = Some(int()?),
                "s" => {
                    // TF V1 writes the stride twice (`s22`), V2 once (`s2`); only square strides exist.
                    let digits: Vec<char> = value.chars().collect();
                    let v = match digits.as_slice() {
                        [a] => *a,
                        [a, b] if a == b => *a,
                        _ => return Err(bad(format!("`{op}`: only square strides are supported"))),
                    };
                    stride = Some(v.to_digit(10).unwrap_or(0) as usize);
                }
                "e" => expand = Some(int()?),
                "i" => input = Some(int()?),
                "o" => output = Some(int()?),
                "se" => {
                    let r: f64 = value
                        .parse()
                        .map_err(|_| bad(format!("`{op}`: `{value}` is not a number")))?;
                    if !(r > 0.0 && r <= 1.0) {
                        return Err(bad(format!("`{op}`: SE ratio must be in (0, 1]")));
                    }
                    se_ratio = Some(r);
                }
                "c" => {
                    kind = match int()? {
                        0 => BlockKind::MbConv,
                        1 => BlockKind::FusedMbConv,
                        other => return Err(bad(format!("unknown conv type c{other}"))),
                    }
                }
                _ => return Err(bad(format!("unknown option `{op}`"))),
            }
        }
        let need = |v: Option<usize>, name: &str, max: usize| {
            let v = v
                .filter(|&x| x > 0)
                .ok_or_else(|| bad(format!("missing or zero `{name}`")))?;
            if v > max {
                return Err(bad(format!(
                    "`{name}{v}` is above the largest allowed, {max}"
                )));
            }
            Ok(v)
        };
        let kernel = need(kernel, "k", MAX_KERNEL)?;
        if kernel % 2 == 0 {
            return Err(bad(format!("`k{kernel}`: kernels must be odd")));
        }
        Ok(BlockArgs {
            kind,
            repeats: need(repeats, "r", MAX_REPEATS)?,
            kernel,
            stride: need(stride, "s", MAX_STRIDE)?,
            expand_ratio: need(expand, "e", MAX_EXPAND)?,
            in_channels: need(input, "i", super::MAX_CHANNELS)?,
            out_channels: need(output, "o", super::MAX_CHANNELS)?,
            se_ratio,
            id_skip,
        })
    }

    /// Encodes back to the TF string form (V1 blocks with the doubled stride, V2 fused blocks with `c1`).
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// Decodes a whole architecture: one block string per stage.
    pub fn decode_all<S: AsRef<str>>(strings: &[S]) -> Result<Vec<Self>, SpecError> {
        strings.iter().map(|s| Self::decode(s.as_ref())).collect()
    }
}

impl fmt::Display for BlockArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "r{}_k{}_s{s}{s}_e{}_i{}_o{}",
            self.repeats,
            self.kernel,
            self.expand_ratio,
            self.in_channels,
            self.out_channels,
            s = self.stride
        )?;
        if let Some(r) = self.se_ratio {
            write!(f, "_se{r}")?;
        }
        if self.kind == BlockKind::FusedMbConv {
            write!(f, "_c1")?;
        }
        if !self.id_skip {
            write!(f, "_noskip")?;
        }
        Ok(())
    }
}

/// Serde for a list of stages as block strings (`["r1_k3_s11_e1_i32_o16_se0.25", ...]`).
pub(super) mod as_strings {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::BlockArgs;

    pub fn serialize<S: Serializer>(blocks: &[BlockArgs], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(blocks.iter().map(BlockArgs::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<BlockArgs>, D::Error> {
        let strings = Vec::<String>::deserialize(d)?;
        BlockArgs::decode_all(&strings).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_tf_v1_string() {
        let b = BlockArgs::decode("r2_k5_s22_e6_i24_o40_se0.25").unwrap();
        assert_eq!(b.kind, BlockKind::MbConv);
        assert_eq!(
            (
                b.repeats,
                b.kernel,
                b.stride,
                b.expand_ratio,
                b.in_channels,
                b.out_channels
            ),
            (2, 5, 2, 6, 24, 40)
        );
        assert_eq!(b.se_ratio, Some(0.25));
        assert!(b.id_skip);
    }

    #[test]
    fn decodes_v2_fused_and_noskip() {
        let b = BlockArgs::decode("r4_k3_s2_e4_i24_o48_c1_noskip").unwrap();
        assert_eq!(b.kind, BlockKind::FusedMbConv);
        assert_eq!(b.stride, 2);
        assert_eq!(b.se_ratio, None);
        assert!(!b.id_skip);
    }

    #[test]
    fn round_trips() {
        for s in [
            "r1_k3_s11_e1_i32_o16_se0.25",
            "r4_k5_s22_e6_i112_o192_se0.25",
            "r2_k3_s11_e1_i24_o24_c1",
            "r15_k3_s22_e6_i160_o256_se0.25",
            "r1_k3_s11_e6_i192_o320_noskip",
        ] {
            let b = BlockArgs::decode(s).unwrap();
            assert_eq!(b.encode(), s);
            assert_eq!(BlockArgs::decode(&b.encode()).unwrap(), b);
        }
        // The V2 single-digit stride decodes to the same args as the doubled form.
        assert_eq!(
            BlockArgs::decode("r2_k3_s2_e4_i16_o32_c1").unwrap(),
            BlockArgs::decode("r2_k3_s22_e4_i16_o32_c1").unwrap()
        );
    }

    #[test]
    fn rejects_bad_strings() {
        for s in [
            "r1_k3_s12_e1_i32_o16",
            "r1_k3_s11_e1_i32",
            "r0_k3_s11_e1_i32_o16",
            "r1_k3_s11_e1_i32_o16_zz4",
            "r1_k3_s11_e1_i32_o16_se1.5",
            "r1_kx_s11_e1_i32_o16",
            "r1_k3_s11_e1_i32_o16_c7",
            "r1_k4_s11_e1_i32_o16",
            "r1_k3_s99_e1_i32_o16",
            "r1000000_k3_s11_e1_i32_o16",
            "r1_k3_s11_e1_i32_o99999999999",
            "r1_k3_s11_e1_i32_o99999999999999999999999",
        ] {
            let err = BlockArgs::decode(s).unwrap_err().to_string();
            assert!(err.contains(s), "{err}");
        }
    }
}
