"""ONNX Runtime's time per node on a graph `effnet export onnx` wrote, to set beside
`effnet bench MODEL --profile` layer by layer (same layer names):
    python scripts/profile_ort.py MODEL.onnx [THREADS] [RUNS]
Runs the graph RUNS times (default 60) with ONNX Runtime's profiler on, drops the first 10, and
prints each node's median kernel time and the total per operator kind."""

import collections
import json
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

path = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 60
graph = onnx.load(path).graph
kinds = {}
for node in graph.node:
    kind = node.op_type
    if kind == "Conv":
        attrs = {a.name: a for a in node.attribute}
        size = attrs["kernel_shape"].ints[0]
        group = attrs["group"].i if "group" in attrs else 1
        kind = f"Conv {size}x{size}" + (" depthwise" if group > 1 else "")
    kinds[node.name] = kind
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.enable_profiling = True
options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
x = np.random.default_rng(0).random(shape, dtype=np.float32)
name = session.get_inputs()[0].name
for _ in range(runs):
    session.run(None, {name: x})
profile = session.end_profiling()
times = collections.defaultdict(list)
for event in json.load(open(profile)):
    if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
        times[event["name"][: -len("_kernel_time")]].append(event["dur"])
os.remove(profile)
total = collections.Counter()
for node, us in times.items():
    us = sorted(us[10:] or us)
    median = us[len(us) // 2] / 1000
    # Graph optimisation renames fused nodes (e.g. "stem.relu6_nchwc"); match on the prefix.
    kind = kinds.get(node) or next((k for n, k in kinds.items() if node.startswith(n)), "fused")
    total[kind] += median
    print(f"{node:48s} {median:8.3f} ms")
print("per kind:", {k: round(v, 3) for k, v in total.items()}, "sum", round(sum(total.values()), 3))
