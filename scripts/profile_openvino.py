"""OpenVINO's CPU time per kernel kind on a graph `effnet export onnx` wrote, to set beside
`effnet bench MODEL --profile` (and scripts/profile_ort.py):
    python scripts/profile_openvino.py MODEL.onnx [PRECISION] [THREADS] [RUNS]
PRECISION is OpenVINO's inference precision hint, f32 or bf16 (default bf16); THREADS default 1,
RUNS default 50 (after 20 warm-up runs). Prints the mean time per (node type, kernel) and the
total, from OpenVINO's own per-node counters (PERF_COUNT)."""

import collections
import sys

import numpy as np
import openvino as ov

path = sys.argv[1]
precision = sys.argv[2] if len(sys.argv) > 2 else "bf16"
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
runs = int(sys.argv[4]) if len(sys.argv) > 4 else 50
core = ov.Core()
model = core.read_model(path)
compiled = core.compile_model(
    model,
    "CPU",
    {
        "PERF_COUNT": "YES",
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    },
)
request = compiled.create_infer_request()
shape = [d.get_length() for d in model.inputs[0].get_partial_shape()]
x = np.random.default_rng(0).random(shape, dtype=np.float32)
for _ in range(20):
    request.infer({0: x})
per_kind = collections.defaultdict(float)
for _ in range(runs):
    request.infer({0: x})
    for node in request.profiling_info:
        per_kind[(node.node_type, node.exec_type)] += node.real_time.total_seconds() * 1e3 / runs
total = sum(per_kind.values())
print(f"openvino {ov.__version__} {precision}, {threads} thread(s), mean of {runs} runs:")
for (node_type, kernel), ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
    if ms > 0:
        print(f"  {node_type:<20} {kernel:<32} {ms:7.3f} ms {100 * ms / total:5.1f}%")
print(f"  total {total:.3f} ms")
