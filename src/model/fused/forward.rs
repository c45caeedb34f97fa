//! The fused ops on `Flex` tensors: forward passes only.

use burn::backend::flex::FlexTensor;
use burn::backend::{Flex, TensorMetadata};

use super::kernels::{
    CHUNK, ConvGeometry, batch_norm_forward, depthwise_forward, im2col, par_map, plane_means,
    pointwise_forward, rmsprop_tf, rmsprop_tf_chunk, scale_planes, sigmoid_forward, silu_forward,
    squared_sum,
};
use super::{FusedOps, RmsPropCoefficients, contiguous, deferred, dims4, exclusive, f32s, tensor};
use crate::spec::Activation;

impl FusedOps for Flex {
    fn fused_silu(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        // SAFETY: the kernel writes every element of its chunk.
        let y = unsafe { par_map(f32s(&x), silu_forward) };
        tensor(y, x.shape().to_vec())
    }

    fn fused_sigmoid(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        // SAFETY: the kernel writes every element of its chunk.
        let y = unsafe { par_map(f32s(&x), sigmoid_forward) };
        tensor(y, x.shape().to_vec())
    }

    fn fused_squared_sum(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        tensor(vec![squared_sum(f32s(&x))], vec![1])
    }

    fn fused_depthwise(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: [usize; 4],
    ) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let [n, c, h, w] = dims4(&x);
        let geom = ConvGeometry::new(h, w, weight.shape()[2], stride, padding);
        let y = depthwise_forward(&geom, c, f32s(&x), f32s(&weight));
        tensor(y, vec![n, c, geom.out_h, geom.out_w])
    }

    fn fused_im2col(x: FlexTensor, k: usize, stride: usize, padding: [usize; 4]) -> FlexTensor {
        let x = contiguous(x);
        let [n, c, h, w] = dims4(&x);
        let geom = ConvGeometry::new(h, w, k, stride, padding);
        let cols = im2col(&geom, c, f32s(&x));
        tensor(cols, vec![n, c * k * k, geom.out_h, geom.out_w])
    }

    fn fused_pointwise(x: FlexTensor, weight: FlexTensor, _param: Option<u64>) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let [n, ci, h, w] = dims4(&x);
        let co = weight.shape()[0];
        let y = pointwise_forward(f32s(&x), f32s(&weight), (n, ci, co, h * w));
        tensor(y, vec![n, co, h, w])
    }

    fn fused_spatial_mean(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let [n, c, h, w] = dims4(&x);
        tensor(plane_means(f32s(&x), h * w), vec![n, c, 1, 1])
    }

    fn fused_plane_scale(x: FlexTensor, scale: FlexTensor) -> FlexTensor {
        let (x, scale) = (contiguous(x), contiguous(scale));
        let [_, _, h, w] = dims4(&x);
        let y = scale_planes(f32s(&x), f32s(&scale), h * w);
        tensor(y, x.shape().to_vec())
    }

    fn fused_rmsprop_tf(
        w: FlexTensor,
        g: FlexTensor,
        ms: FlexTensor,
        mom: FlexTensor,
        c: RmsPropCoefficients,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let g = contiguous(g);
        let [mut w, mut ms, mut mom] = [w, ms, mom].map(exclusive);
        if !defer_rmsprop(&g, c, [&mut w, &mut ms, &mut mom]) {
            rmsprop_tf(
                f32s(&g),
                c,
                w.storage_mut(),
                ms.storage_mut(),
                mom.storage_mut(),
            );
        }
        (w, ms, mom)
    }

    fn fused_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
        act: Option<Activation>,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let shape = x.shape().to_vec();
        let plane = shape[2..].iter().product();
        let (out, mean, var) = batch_norm_forward(
            f32s(&x),
            shape[1],
            plane,
            f32s(&gamma),
            f32s(&beta),
            epsilon as f32,
            act,
        );
        let channels = vec![shape[1]];
        (
            tensor(out, shape),
            tensor(mean, channels.clone()),
            tensor(var, channels),
        )
    }
}

/// Parameters with fewer weights are updated at once: queueing one costs about as much as its
/// update.
const DEFER_UPDATE_MIN: usize = 4096;

/// Queues the update of `[w, ms, mom]` (unique and contiguous, from [`exclusive`]) in parts of
/// [`CHUNK`] to a deferring [`deferred::updates`] on this thread; false when there is none or the
/// parameter is small (the caller updates it now). Each weight's update depends on its own values
/// alone, so the result does not depend on which thread runs a part.
fn defer_rmsprop(g: &FlexTensor, c: RmsPropCoefficients, mut state: [&mut FlexTensor; 3]) -> bool {
    let len = f32s(g).len();
    if len < DEFER_UPDATE_MIN {
        return false;
    }
    let buffers = Buffers(
        state
            .each_mut()
            .map(|t| t.storage_mut::<f32>().as_mut_ptr()),
        f32s(g).as_ptr(),
    );
    // The job holds the tensors: their buffers live until its last part is done.
    let held = [g, &*state[0], &*state[1], &*state[2]].map(FlexTensor::clone);
    deferred::defer_work(len.div_ceil(CHUNK), move |i| {
        let _ = &held;
        let start = i * CHUNK;
        // SAFETY: part `i` alone covers `start..start + n` of the four buffers of `len` floats,
        // which `held` keeps alive; nothing reads `w`, `ms` or `mom` before `deferred::updates`
        // returns, after every part.
        let (g, [w, ms, mom]) = unsafe { buffers.part(start, CHUNK.min(len - start)) };
        rmsprop_tf_chunk(g, c, w, ms, mom);
    })
}

/// The weight, mean-square and momentum buffers and the gradient of one deferred update.
struct Buffers([*mut f32; 3], *const f32);

// SAFETY: the buffers outlive the job (it holds their tensors) and parts touch disjoint ranges.
unsafe impl Send for Buffers {}
// SAFETY: as for `Send`.
unsafe impl Sync for Buffers {}

impl Buffers {
    /// # Safety
    /// `start..start + n` lies in every buffer, and no other live slice overlaps it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, n: usize) -> (&[f32], [&mut [f32]; 3]) {
        // SAFETY: the caller's contract.
        unsafe {
            (
                std::slice::from_raw_parts(self.1.add(start), n),
                self.0
                    .map(|p| std::slice::from_raw_parts_mut(p.add(start), n)),
            )
        }
    }
}
