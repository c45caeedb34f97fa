//! Which convolutions each layer of a network has, with their kinds and shapes: the one place that
//! spells out the block kinds. The analysis, the burn model, every weight layout and the inference
//! engine read it instead of re-deriving "does this block have an expand conv".

use super::{BlockKind, LayerSpec, ModelSpec};

/// What a convolution (or the classifier) does in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Stem,
    /// MBConv: the 1x1 expansion. Fused-MBConv: the kxk convolution (the only one when e = 1).
    Expand,
    Depthwise,
    SeReduce,
    SeExpand,
    /// The 1x1 projection (no activation).
    Project,
    Head,
    /// The final linear layer.
    Classifier,
}

/// Where a block sits: index in the network, stage, and index within the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPos {
    pub index: usize,
    pub stage: usize,
    pub in_stage: usize,
}

/// One convolution (followed by batch norm unless it belongs to SE) or the classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    pub role: Role,
    pub block: Option<BlockPos>,
    /// Canonical module path: `stem`, `blocks.3.expand`, `blocks.3.se.reduce`, `classifier`.
    pub path: String,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    /// Whether the model's activation follows (after batch norm). SE expand is followed by a
    /// sigmoid, which the SE itself applies.
    pub act: bool,
}

impl Conv {
    /// Followed by batch norm (`{path}.bn`), with the conv at `{path}.conv` and no bias. SE convs and
    /// the classifier carry a bias instead and live at `path` itself.
    pub fn has_bn(&self) -> bool {
        !matches!(
            self.role,
            Role::SeReduce | Role::SeExpand | Role::Classifier
        )
    }

    pub fn is_depthwise(&self) -> bool {
        self.role == Role::Depthwise
    }

    /// Module path of the weight-bearing layer: `{path}.conv` with batch norm, else `path`.
    pub fn weight_module(&self) -> String {
        if self.has_bn() {
            format!("{}.conv", self.path)
        } else {
            self.path.clone()
        }
    }

    /// Module path of the batch norm, if any.
    pub fn bn_module(&self) -> Option<String> {
        self.has_bn().then(|| format!("{}.bn", self.path))
    }

    /// PyTorch weight shape: `[out, in / groups, k, k]`, or `[out, in]` for the classifier.
    pub fn weight_shape(&self) -> Vec<usize> {
        match self.role {
            Role::Classifier => vec![self.out_channels, self.in_channels],
            _ => vec![
                self.out_channels,
                self.in_channels / self.groups,
                self.kernel,
                self.kernel,
            ],
        }
    }

    /// Trainable parameters: the weight, plus a bias or the batch norm's scale and shift.
    pub fn params(&self) -> u64 {
        let weight: u64 = self.weight_shape().iter().map(|&d| d as u64).product();
        let extra = if self.has_bn() { 2 } else { 1 };
        weight + extra * self.out_channels as u64
    }
}

/// One block's convolutions, each `None` where the block kind has none.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockAnatomy {
    pub layer: LayerSpec,
    pub pos: BlockPos,
    pub expand: Option<Conv>,
    pub depthwise: Option<Conv>,
    /// Squeeze-excite reduce and expand 1x1 convs (with bias), on the expanded channels.
    pub se: Option<[Conv; 2]>,
    pub project: Option<Conv>,
}

impl BlockAnatomy {
    /// The block's convolutions in forward order.
    pub fn convs(&self) -> impl Iterator<Item = &Conv> {
        let se = self.se.iter().flatten();
        self.expand
            .iter()
            .chain(&self.depthwise)
            .chain(se)
            .chain(&self.project)
    }

    /// Channels entering the SE and the projection (the expanded width, or the output width of a
    /// Fused-MBConv with e = 1).
    pub fn mid_channels(&self) -> usize {
        self.depthwise
            .as_ref()
            .or(self.expand.as_ref())
            .map_or(self.layer.in_channels, |c| c.out_channels)
    }
}

/// A whole network's convolutions.
#[derive(Debug, Clone, PartialEq)]
pub struct Anatomy {
    pub stem: Conv,
    pub blocks: Vec<BlockAnatomy>,
    pub head: Conv,
    pub classifier: Conv,
}

impl Anatomy {
    /// Every convolution and the classifier, in forward order.
    pub fn convs(&self) -> impl Iterator<Item = &Conv> {
        std::iter::once(&self.stem)
            .chain(self.blocks.iter().flat_map(BlockAnatomy::convs))
            .chain([&self.head, &self.classifier])
    }
}

fn conv(
    role: Role,
    block: Option<BlockPos>,
    path: String,
    (cin, cout): (usize, usize),
    (kernel, stride, groups): (usize, usize, usize),
    act: bool,
) -> Conv {
    Conv {
        role,
        block,
        path,
        in_channels: cin,
        out_channels: cout,
        kernel,
        stride,
        groups,
        act,
    }
}

fn block(layer: &LayerSpec, pos: BlockPos) -> BlockAnatomy {
    let p = format!("blocks.{}", pos.index);
    let b = Some(pos);
    let (cin, mid, cout, k, s) = (
        layer.in_channels,
        layer.mid_channels,
        layer.out_channels,
        layer.kernel,
        layer.stride,
    );
    let se = |channels: usize| {
        layer.se_channels.map(|r| {
            [
                conv(
                    Role::SeReduce,
                    b,
                    format!("{p}.se.reduce"),
                    (channels, r),
                    (1, 1, 1),
                    true,
                ),
                conv(
                    Role::SeExpand,
                    b,
                    format!("{p}.se.expand"),
                    (r, channels),
                    (1, 1, 1),
                    false,
                ),
            ]
        })
    };
    let expand = |cout, kernel, stride| {
        conv(
            Role::Expand,
            b,
            format!("{p}.expand"),
            (cin, cout),
            (kernel, stride, 1),
            true,
        )
    };
    let project = || {
        conv(
            Role::Project,
            b,
            format!("{p}.project"),
            (mid, cout),
            (1, 1, 1),
            false,
        )
    };
    let (expand, depthwise, se, project) = match (layer.kind, layer.expand_ratio) {
        // Inverted residual: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project.
        (BlockKind::MbConv, e) => (
            (e != 1).then(|| expand(mid, 1, 1)),
            Some(conv(
                Role::Depthwise,
                b,
                format!("{p}.dw"),
                (mid, mid),
                (k, s, mid),
                true,
            )),
            se(mid),
            Some(project()),
        ),
        // Fused-MBConv with e = 1: a single kxk conv [+ SE].
        (BlockKind::FusedMbConv, 1) => (Some(expand(cout, k, s)), None, se(cout), None),
        // Fused-MBConv: kxk expand -> [SE] -> 1x1 project.
        (BlockKind::FusedMbConv, _) => (Some(expand(mid, k, s)), None, se(mid), Some(project())),
    };
    BlockAnatomy {
        layer: layer.clone(),
        pos,
        expand,
        depthwise,
        se,
        project,
    }
}

impl ModelSpec {
    /// Every layer's convolutions with their kinds and shapes.
    pub fn anatomy(&self) -> Anatomy {
        let mut blocks = Vec::new();
        let mut in_stage = 0;
        for (index, layer) in self.layers().iter().enumerate() {
            let first_of_stage = blocks
                .last()
                .is_none_or(|b: &BlockAnatomy| b.pos.stage != layer.stage);
            in_stage = if first_of_stage { 0 } else { in_stage + 1 };
            let pos = BlockPos {
                index,
                stage: layer.stage,
                in_stage,
            };
            blocks.push(block(layer, pos));
        }
        let head = self.head_channels();
        Anatomy {
            stem: conv(
                Role::Stem,
                None,
                "stem".into(),
                (3, self.stem_channels()),
                (3, 2, 1),
                true,
            ),
            blocks,
            head: conv(
                Role::Head,
                None,
                "head".into(),
                (self.body_channels(), head),
                (1, 1, 1),
                true,
            ),
            classifier: conv(
                Role::Classifier,
                None,
                "classifier".into(),
                (head, self.num_classes),
                (1, 1, 1),
                false,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::variant;

    #[test]
    fn block_kinds_have_the_convolutions_of_their_papers() {
        let b0 = variant("b0").unwrap().anatomy();
        let roles = |b: &BlockAnatomy| b.convs().map(|c| c.role).collect::<Vec<_>>();
        use Role::*;
        // e = 1 MBConv has no expansion.
        assert_eq!(
            roles(&b0.blocks[0]),
            [Depthwise, SeReduce, SeExpand, Project]
        );
        assert_eq!(
            roles(&b0.blocks[1]),
            [Expand, Depthwise, SeReduce, SeExpand, Project]
        );
        assert_eq!(
            b0.blocks[1].depthwise.as_ref().unwrap().weight_shape(),
            [96, 1, 3, 3]
        );
        assert_eq!(
            b0.blocks[1].pos,
            BlockPos {
                index: 1,
                stage: 1,
                in_stage: 0
            }
        );
        assert_eq!(
            b0.blocks[2].pos,
            BlockPos {
                index: 2,
                stage: 1,
                in_stage: 1
            }
        );
        let v2 = variant("v2-s").unwrap().anatomy();
        assert_eq!(roles(&v2.blocks[0]), [Expand]);
        assert_eq!(
            v2.blocks[0].expand.as_ref().unwrap().weight_shape(),
            [24, 24, 3, 3]
        );
        assert_eq!(roles(&v2.blocks[2]), [Expand, Project]);
        assert_eq!(
            roles(v2.blocks.last().unwrap()),
            [Expand, Depthwise, SeReduce, SeExpand, Project]
        );
        assert_eq!(b0.classifier.weight_shape(), [1000, 1280]);
        assert_eq!(b0.convs().count(), 1 + 16 * 4 + 15 + 2);
    }
}
