//! The fused ops on `Autodiff<Flex>`: each records its node with the state its hand-written
//! backward needs and computes the forward with the `Flex` implementation.

use std::cell::Cell;
use std::mem::MaybeUninit;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Flex, TensorMetadata};

use super::kernels::{
    ConvGeometry, Written, add_plane_mean_gradient, batch_norm_backward, col2im,
    depthwise_backward, map_planes, normalized_activation_backward, par_map2, plane_dots,
    pointwise_backward, pointwise_weight_gradient_chunk, pointwise_weight_gradient_part,
    scale_planes, sigmoid_backward, silu_backward,
};
use super::{FusedOps, RmsPropCoefficients, contiguous, deferred, dims4, exclusive, f32s, tensor};
use crate::spec::Activation;

/// The backward of an elementwise op whose input gradient is `kernel(saved, grad, out)` for a
/// saved tensor of the input's shape (SiLU saves its input, sigmoid its output). The kernel
/// writes every element of `out`.
#[derive(Debug)]
struct ElementwiseBackward(fn(&[f32], &[f32], &mut Written));

impl Backward<Flex, 1> for ElementwiseBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let saved = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = contiguous(grad);
            // SAFETY: the kernel writes every element of its chunk (the type's contract).
            let out = unsafe { par_map2(f32s(&saved), f32s(&grad), self.0) };
            tensor(out, saved.shape().to_vec())
        });
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        let x = contiguous(x.into_primitive());
        match ElementwiseBackward(silu_backward)
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let y = <Flex as FusedOps>::fused_silu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as FusedOps>::fused_silu(x)),
        }
    }

    fn fused_sigmoid(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        let y = <Flex as FusedOps>::fused_sigmoid(x.into_primitive());
        // Its derivative is computed from the output, so the output is the saved state.
        match ElementwiseBackward(sigmoid_backward)
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_squared_sum(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(<Flex as FusedOps>::fused_squared_sum(Self::inner(x)))
    }

    fn fused_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DepthwiseBackward;

        impl Backward<Flex, 2> for DepthwiseBackward {
            type State = (FlexTensor, FlexTensor, ConvGeometry);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_x, node_w] = ops.parents;
                let grad = contiguous(grads.consume::<Flex>(&ops.node));
                let (x, weight, geom) = ops.state;
                let [n, c, h, w] = dims4(&x);
                let (gx, gw) = depthwise_backward(
                    &geom,
                    c,
                    f32s(&x),
                    f32s(&weight),
                    f32s(&grad),
                    node_x.is_some(),
                );
                let w_shape = weight.shape().to_vec();
                register(
                    grads,
                    [node_x, node_w].map(|n| n.map(|n| n.id)),
                    [(gx, vec![n, c, h, w]), (gw, w_shape)],
                );
            }
        }

        let nodes = [x.node(), weight.node()];
        let x = contiguous(x.into_primitive());
        let weight = contiguous(weight.into_primitive());
        let y = <Flex as FusedOps>::fused_depthwise(x.clone(), weight.clone(), stride, padding);
        match DepthwiseBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [_, _, h, w] = dims4(&x);
                let geom = ConvGeometry::new(h, w, weight.shape()[2], stride, padding);
                prep.finish((x, weight, geom), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_im2col(
        x: FloatTensor<Self>,
        k: usize,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Im2colBackward;

        impl Backward<Flex, 1> for Im2colBackward {
            /// The input's `[n, c]` and the geometry.
            type State = ([usize; 2], ConvGeometry);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let ([n, c], geom) = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                    let grad = contiguous(grad);
                    let dx = col2im(&geom, n, c, f32s(&grad));
                    tensor(dx, vec![n, c, geom.h, geom.w])
                });
            }
        }

        let node = x.node();
        let x = contiguous(x.into_primitive());
        let [n, c, h, w] = dims4(&x);
        let cols = <Flex as FusedOps>::fused_im2col(x, k, stride, padding);
        match Im2colBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish(([n, c], ConvGeometry::new(h, w, k, stride, padding)), cols)
            }
            OpsKind::UnTracked(prep) => prep.finish(cols),
        }
    }

    fn fused_pointwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        param: Option<u64>,
    ) -> FloatTensor<Self> {
        /// The weight's parameter id, when the weight is that parameter.
        #[derive(Debug)]
        struct PointwiseBackward(Option<u64>);

        impl Backward<Flex, 2> for PointwiseBackward {
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_x, node_w] = ops.parents;
                let grad = contiguous(grads.consume::<Flex>(&ops.node));
                let (x, weight) = ops.state;
                let [n, ci, h, w] = dims4(&x);
                let co = weight.shape()[0];
                let dims = (n, ci, co, h * w);
                let w_shape = weight.shape().to_vec();
                // A parameter's gradient waits for the optimizer: queued when the pass defers.
                let deferred = node_w.as_ref().zip(self.0).is_some_and(|(node, param)| {
                    let (x, grad) = (x.clone(), grad.clone());
                    node.parents.is_empty()
                        && deferred::defer(
                            param,
                            [co, ci, 1, 1],
                            pointwise_weight_gradient_chunk(ci, co, h * w),
                            move |part, dw| {
                                let (x, dy) = (f32s(&x), f32s(&grad));
                                pointwise_weight_gradient_part(x, dy, dims, part, dw)
                            },
                        )
                });
                let node_w = node_w.filter(|_| !deferred);
                let (gx, gw) = pointwise_backward(
                    f32s(&x),
                    f32s(&weight),
                    f32s(&grad),
                    dims,
                    (node_x.is_some(), node_w.is_some()),
                );
                register(
                    grads,
                    [node_x, node_w].map(|n| n.map(|n| n.id)),
                    [(gx, vec![n, ci, h, w]), (gw, w_shape)],
                );
            }
        }

        let nodes = [x.node(), weight.node()];
        let x = contiguous(x.into_primitive());
        let weight = contiguous(weight.into_primitive());
        let y = <Flex as FusedOps>::fused_pointwise(x.clone(), weight.clone(), param);
        match PointwiseBackward(param)
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, weight), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_spatial_mean(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SpatialMeanBackward;

        impl Backward<Flex, 1> for SpatialMeanBackward {
            /// The input's shape.
            type State = Vec<usize>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let shape = ops.state;
                let plane = shape[2] * shape[3];
                // In a squeeze-excite gate the input's other gradient, from the gate's scale,
                // is registered by now: add this one to it in place, in parallel, rather than
                // as a second tensor burn adds on one thread (1.3 % of a two-thread B0 step).
                // Only an intermediate's gradient is taken out by `consume`; it shares the
                // requirement of this op's own (never a leaf's) node.
                let [parent] = &ops.parents;
                if let Some(parent) = parent.as_ref().filter(|p| {
                    p.requirement == ops.node.requirement && SCALED_INPUT.take() == Some(p.id)
                }) {
                    let grad = contiguous(grads.consume::<Flex>(&ops.node));
                    let mut gx = exclusive(grads.consume::<Flex>(parent));
                    add_plane_mean_gradient(gx.storage_mut::<f32>(), f32s(&grad), plane);
                    grads.register::<Flex>(parent.id, gx);
                    return;
                }
                unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                    let grad = contiguous(grad);
                    let g = f32s(&grad);
                    // SAFETY: the fill writes all of each plane.
                    let out = unsafe {
                        map_planes(g.len() * plane, 1, plane, |run, out| {
                            for (o, g) in out.chunks_exact_mut(plane).zip(&g[run.first..]) {
                                o.fill(MaybeUninit::new(g / plane as f32));
                            }
                        })
                    };
                    tensor(out, shape)
                });
            }
        }

        let node = x.node();
        let x = contiguous(x.into_primitive());
        let shape = x.shape().to_vec();
        let y = <Flex as FusedOps>::fused_spatial_mean(x);
        match SpatialMeanBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(shape, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_plane_scale(x: FloatTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PlaneScaleBackward;

        impl Backward<Flex, 2> for PlaneScaleBackward {
            type State = (FlexTensor, FlexTensor);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_x, node_s] = ops.parents;
                let grad = contiguous(grads.consume::<Flex>(&ops.node));
                let (x, scale) = ops.state;
                let plane = x.shape()[2] * x.shape()[3];
                let (g, xs) = (f32s(&grad), f32s(&x));
                // dx = g * scale per plane; dscale = sum over the plane of g x.
                let gx = match node_x {
                    Some(_) => scale_planes(g, f32s(&scale), plane),
                    None => Vec::new(),
                };
                let gs = match node_s {
                    Some(_) => plane_dots(g, xs, plane),
                    None => Vec::new(),
                };
                let node_x = node_x.map(|n| n.id);
                register(
                    grads,
                    [node_x, node_s.map(|n| n.id)],
                    [(gx, x.shape().to_vec()), (gs, scale.shape().to_vec())],
                );
                SCALED_INPUT.set(node_x);
            }
        }

        let nodes = [x.node(), scale.node()];
        let x = contiguous(x.into_primitive());
        let scale = contiguous(scale.into_primitive());
        let y = <Flex as FusedOps>::fused_plane_scale(x.clone(), scale.clone());
        match PlaneScaleBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, scale), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_rmsprop_tf(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        ms: FloatTensor<Self>,
        mom: FloatTensor<Self>,
        c: RmsPropCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // An optimizer update is not differentiated: computed on the inner tensors, untracked.
        let [w, g, ms, mom] = [w, g, ms, mom].map(Self::inner);
        let (w, ms, mom) = <Flex as FusedOps>::fused_rmsprop_tf(w, g, ms, mom, c);
        (
            Self::from_inner(w),
            Self::from_inner(ms),
            Self::from_inner(mom),
        )
    }

    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        act: Option<Activation>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        /// With an activation applied to the output, that activation and beta, which the backward
        /// needs to recompute the activation's input.
        #[derive(Debug)]
        struct BatchNormBackward(Option<(Activation, FlexTensor)>);

        impl Backward<Flex, 3> for BatchNormBackward {
            /// x, gamma, batch mean, batch variance, epsilon.
            type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = contiguous(grads.consume::<Flex>(&ops.node));
                let (x, gamma, mean, var, epsilon) = ops.state;
                let channels = gamma.shape()[0];
                let plane = x.shape()[2..].iter().product();
                // Through the activation first: the gradient of the batch norm's own output.
                let grad = match &self.0 {
                    Some((act, beta)) => tensor(
                        normalized_activation_backward(
                            *act,
                            f32s(&x),
                            f32s(&grad),
                            plane,
                            f32s(&gamma),
                            f32s(beta),
                            f32s(&mean),
                            f32s(&var),
                            epsilon,
                        ),
                        x.shape().to_vec(),
                    ),
                    None => grad,
                };
                let (gx, ggamma, gbeta) = batch_norm_backward(
                    f32s(&x),
                    f32s(&grad),
                    plane,
                    f32s(&gamma),
                    f32s(&mean),
                    f32s(&var),
                    epsilon,
                    node_x.is_some(),
                );
                let nodes = [node_x, node_gamma, node_beta].map(|n| n.map(|n| n.id));
                let c = vec![channels];
                let values = [(gx, x.shape().to_vec()), (ggamma, c.clone()), (gbeta, c)];
                register(grads, nodes, values);
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let x = contiguous(x.into_primitive());
        let gamma = contiguous(gamma.into_primitive());
        let beta = contiguous(beta.into_primitive());
        let (out, mean, var) = <Flex as FusedOps>::fused_batch_norm_train(
            x.clone(),
            gamma.clone(),
            beta.clone(),
            epsilon,
            act,
        );
        // The statistics leave untracked, as from burn's own batch_norm_train.
        let stats = (
            Self::from_inner(mean.clone()),
            Self::from_inner(var.clone()),
        );
        let out = match BatchNormBackward(act.map(|act| (act, beta)))
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, mean, var, epsilon as f32), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, stats.0, stats.1)
    }
}

thread_local! {
    /// The input whose gradient the last plane-scale backward on this thread registered: a
    /// spatial mean of the same input (a squeeze-excite gate's) adds its gradient to that one.
    static SCALED_INPUT: Cell<Option<NodeId>> = const { Cell::new(None) };
}

/// Registers each gradient (values, shape) with its parent node, for the parents that track one.
fn register<const N: usize>(
    grads: &mut Gradients,
    nodes: [Option<NodeId>; N],
    values: [(Vec<f32>, Vec<usize>); N],
) {
    for (node, (g, shape)) in nodes.into_iter().zip(values) {
        if let Some(id) = node {
            grads.register::<Flex>(id, tensor(g, shape));
        }
    }
}
