#!/usr/bin/env python3
"""Reference runtimes for `effnet bench --reference`: the same network in ONNX Runtime, OpenVINO
(fp32 and bf16, when the `openvino` package is installed), PyTorch eager (when torch is) and tract at
one thread (when the `tract` package is), timed the same way. Prints a JSON list of timings on stdout.

    python3 scripts/bench_reference.py --onnx MODEL.onnx --weights W.safetensors --spec SPEC.json \
        --batch 1 --threads 1 --resolution 224 --iters 30

MODEL.onnx is the graph `effnet export onnx` writes (bench writes it); the safetensors file
(canonical names) and the spec JSON rebuild the network in PyTorch. Requires numpy, safetensors,
onnxruntime.
"""
import argparse
import json
import os
import sys
import time


def conv_out(size, k, s, padding):
    if padding == "same":
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return out, (total // 2, total - total // 2)
    p = k // 2
    return (size + 2 * p - k) // s + 1, (p, p)


def timings(runtime, ms, batch):
    ms = sorted(ms)
    median = ms[len(ms) // 2]
    p90 = ms[min(len(ms), -(-len(ms) * 9 // 10)) - 1]
    p99 = ms[min(len(ms), -(-len(ms) * 99 // 100)) - 1]
    return {"runtime": runtime, "median_ms": median, "p90_ms": p90, "p99_ms": p99,
            "images_per_s": batch * 1000.0 / median}


def time_it(fn, iters):
    fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--input", help="raw little-endian f32 input file (NCHW) to run instead of the pattern")
    ap.add_argument("--onnx", required=True, help="the ONNX model (effnet export onnx)")
    ap.add_argument("--outputs", help="write ONNX Runtime logits (raw f32) here")
    ap.add_argument("--calib-input", help="raw f32 calibration images (N x 3 x res x res) for int8 models")
    ap.add_argument("--check-input", help="raw f32 images on which each runtime's top-1 is compared with its fp32")
    ap.add_argument("--method", default="percentile:99.99", help="calibration: minmax, entropy or percentile:P")
    ap.add_argument("--qdq", help="the int8 weights' own QDQ graph (effnet export onnx of quantised weights)")
    args = ap.parse_args()

    import numpy as np
    from safetensors.numpy import load_file

    tensors = load_file(args.weights)
    spec = json.load(open(args.spec))
    n, res = args.batch, args.resolution
    if args.input:
        x = np.fromfile(args.input, dtype=np.float32).reshape(n, 3, res, res)
    else:
        x = ((np.arange(n * 3 * res * res) * 7919 % 255) / 128.0 - 1.0).astype(np.float32).reshape(n, 3, res, res)
    results = []

    def images(path):
        if not path:
            return None
        return np.fromfile(path, dtype=np.float32).reshape(-1, 1, 3, res, res)

    calib, check = images(args.calib_input), images(args.check_input)

    def top1(run):
        return np.array([int(np.argmax(run(img))) for img in check])

    def agree(entry, run, reference):
        if check is not None:
            entry["top1_vs_fp32"] = float(np.mean(top1(run) == reference))
        return entry

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x})[0]
    if args.outputs:
        out.astype(np.float32).tofile(args.outputs)
    results.append(timings(f"onnxruntime {ort.__version__}", time_it(lambda: sess.run(None, {"input": x}), args.iters), n))
    ort_ref = top1(lambda img: sess.run(None, {"input": img})[0]) if check is not None else None
    ov_ref = None

    try:
        import openvino as ov
    except ImportError:
        ov = None
    if ov is not None:
        core = ov.Core()
        for precision in ("f32", "bf16"):
            compiled = core.compile_model(args.onnx, "CPU", {
                "INFERENCE_NUM_THREADS": args.threads,
                "INFERENCE_PRECISION_HINT": precision,
                "PERFORMANCE_HINT": "LATENCY",
            })
            request = compiled.create_infer_request()
            entry = timings(f"openvino {ov.__version__.split('-')[0]} {precision}",
                            time_it(lambda: request.infer({0: x}), args.iters), n)
            if check is not None:
                run = lambda img: request.infer({0: img})[0]
                if ov_ref is None:
                    ov_ref = top1(run)
                entry = agree(entry, run, ov_ref)
            results.append(entry)

    if args.qdq:
        results.extend(qdq_timings(args.qdq, "effnet QDQ", args, ort, ov, x, n, so, agree, (ort_ref, ov_ref)))
    if calib is not None:
        results.extend(int8_timings(args, ort, ov, calib, x, n, so, agree, (ort_ref, ov_ref)))

    try:
        import torch
    except ImportError:
        torch = None
    # BENCH_SKIP_PYTORCH=1: leave PyTorch eager out (slow, and not what a side-by-side round needs).
    if torch is not None and not os.environ.get("BENCH_SKIP_PYTORCH"):
        torch.set_num_threads(args.threads)
        results.append(torch_timing(torch, tensors, spec, x, args.iters, n))
    # tract (the `tract` package on PyPI) runs on one thread: timed only beside one-thread runs.
    if args.threads == 1:
        try:
            import tract
        except ImportError:
            tract = None
        if tract is not None:
            results.append(tract_timing(tract, args.onnx, x, args.iters, n))
    json.dump(results, sys.stdout)


def int8_timings(args, ort, ov, calib, x, n, so, agree, refs):
    """ONNX Runtime's post-training static quantisation of the same graph (QDQ, per-channel int8
    weights, uint8 activations, calibrated on the same images), run by ONNX Runtime and OpenVINO."""
    import os
    import tempfile
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            img = next(self.it, None)
            return None if img is None else {"input": img}

    method, extra = CalibrationMethod.MinMax, {}
    if args.method == "entropy":
        method = CalibrationMethod.Entropy
    elif args.method.startswith("percentile"):
        method = CalibrationMethod.Percentile
        extra = {"CalibPercentile": float(args.method.split(":")[1]) if ":" in args.method else 99.99}
    tmp = tempfile.mkdtemp()
    pre, q = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
    # The quantiser reports progress on stdout, which carries this script's JSON.
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        quant_pre_process(args.onnx, pre, skip_symbolic_shape=True)
        quantize_static(pre, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, extra_options=extra)
    return qdq_timings(q, "ORT QDQ", args, ort, ov, x, n, so, agree, refs)


def qdq_timings(path, label, args, ort, ov, x, n, so, agree, refs):
    """An int8 QDQ graph in ONNX Runtime and OpenVINO, with top-1 agreement against their fp32."""
    out = []
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out.append(agree(timings(f"onnxruntime int8 ({label})", time_it(lambda: sess.run(None, {"input": x}), args.iters), n),
                     lambda img: sess.run(None, {"input": img})[0], refs[0]))
    if ov is not None:
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                         "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        out.append(agree(timings(f"openvino int8 ({label})", time_it(lambda: request.infer({0: x}), args.iters), n),
                         lambda img: request.infer({0: img})[0], refs[1]))
    return out


def tract_timing(tract, path, x, iters, n):
    runnable = tract.onnx().load(path).into_model().into_runnable()
    version = tract.version() if hasattr(tract, "version") else ""
    return timings(f"tract {version}".strip(), time_it(lambda: runnable.run([x]), iters), n)


def torch_timing(torch, tensors, spec, x, iters, n):
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in tensors.items()}
    padding, eps = spec["padding"], spec["bn_eps"]

    def act(v):
        return F.silu(v) if spec["activation"] == "Silu" else F.relu6(v)

    def conv_bn(v, path, stride, groups, with_act):
        w = t[f"{path}.conv.weight"]
        k = w.shape[2]
        _, (pt, pb) = conv_out(v.shape[2], k, stride, padding)
        _, (pl, pr) = conv_out(v.shape[3], k, stride, padding)
        v = F.conv2d(F.pad(v, (pl, pr, pt, pb)), w, stride=stride, groups=groups)
        v = F.batch_norm(v, t[f"{path}.bn.running_mean"], t[f"{path}.bn.running_var"],
                         t[f"{path}.bn.weight"], t[f"{path}.bn.bias"], False, 0.0, eps)
        return act(v) if with_act else v

    def forward(v):
        v = conv_bn(v, "stem", 2, 1, True)
        for i, layer in enumerate(spec["layers"]):
            p, inp = f"blocks.{i}", v
            if f"{p}.expand.conv.weight" in t:
                v = conv_bn(v, f"{p}.expand", layer["stride"] if layer["kind"] == "FusedMbConv" else 1, 1, True)
            if f"{p}.dw.conv.weight" in t:
                v = conv_bn(v, f"{p}.dw", layer["stride"], t[f"{p}.dw.conv.weight"].shape[0], True)
            if f"{p}.se.reduce.weight" in t:
                s = v.mean((2, 3), keepdim=True)
                s = act(F.conv2d(s, t[f"{p}.se.reduce.weight"], t[f"{p}.se.reduce.bias"]))
                v = v * torch.sigmoid(F.conv2d(s, t[f"{p}.se.expand.weight"], t[f"{p}.se.expand.bias"]))
            if f"{p}.project.conv.weight" in t:
                v = conv_bn(v, f"{p}.project", 1, 1, False)
            if layer["residual"]:
                v = v + inp
        v = conv_bn(v, "head", 1, 1, True).mean((2, 3))
        return F.linear(v, t["classifier.weight"], t["classifier.bias"])

    xt = torch.from_numpy(x)
    with torch.inference_mode():
        return timings(f"pytorch {torch.__version__}", time_it(lambda: forward(xt), iters), n)


if __name__ == "__main__":
    main()
