"""OpenVINO's median time per node (in graph order) on a graph `effnet export onnx` wrote, to set
beside `effnet bench MODEL --profile` layer by layer:
    python scripts/profile_openvino_nodes.py MODEL.onnx PRECISION THREADS RUNS
PRECISION is f32 or bf16 (OpenVINO's inference precision hint). Nodes under 1 us are left out."""

import collections
import sys

import numpy as np
import openvino as ov

path, precision = sys.argv[1], sys.argv[2]
threads, runs = int(sys.argv[3]), int(sys.argv[4])
core = ov.Core()
model = core.read_model(path)
config = {
    "PERF_COUNT": "YES",
    "INFERENCE_PRECISION_HINT": precision,
    "INFERENCE_NUM_THREADS": threads,
    "PERFORMANCE_HINT": "LATENCY",
}
request = core.compile_model(model, "CPU", config).create_infer_request()
shape = [d.get_length() for d in model.inputs[0].get_partial_shape()]
x = np.random.default_rng(0).random(shape, dtype=np.float32)
for _ in range(20):
    request.infer({0: x})
times = collections.defaultdict(list)
kernel = {}
for _ in range(runs):
    request.infer({0: x})
    for node in request.profiling_info:
        times[node.node_name].append(node.real_time.total_seconds() * 1e3)
        kernel[node.node_name] = node.exec_type
for name, ms in times.items():
    median = sorted(ms)[len(ms) // 2]
    if median > 0.001:
        print(f"{name[:60]:<60} {kernel[name]:<28} {median:.3f}")
