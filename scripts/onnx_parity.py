#!/usr/bin/env python3
"""The Rust ONNX export run in ONNX Runtime against the PyTorch oracles in ../shared/fixtures/io.

Usage: scripts/onnx_parity.py [EFFNET_BINARY]  (needs numpy, onnxruntime, safetensors)
Exports each fixture checkpoint with `effnet export onnx --dynamic-batch`, runs the oracle's input
through ONNX Runtime and prints max |diff| against PyTorch's logits; exits non-zero above 1e-4.
"""
import os, subprocess, sys, tempfile

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
CASES = [
    ("timm_tf_efficientnet_b0_seed0.pth", "timm_tf_efficientnet_b0_seed0_io.safetensors"),
    ("torchvision_efficientnet_b0_seed0.pth", "torchvision_efficientnet_b0_seed0_io.safetensors"),
    ("efficientnet-lite0-57934424.pth", "efficientnet-lite0_coffee_io.safetensors"),
    ("efficientnet-lite0-57934424.pth", "efficientnet-lite0_chelsea_io.safetensors"),
]


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "effnet")
    print(f"onnxruntime {ort.__version__}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for weights, io in CASES:
            model = os.path.join(tmp, weights + ".onnx")
            subprocess.run(
                [exe, "export", "onnx", "--weights", os.path.join(FIXTURES, "weights", weights),
                 "--out", model, "--dynamic-batch"],
                check=True, stdout=subprocess.DEVNULL)
            t = load_file(os.path.join(FIXTURES, "io", io))
            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            got = session.run(None, {"input": t["input"].astype(np.float32)})[0]
            diff = float(np.abs(got - t["logits"]).max())
            worst = max(worst, diff)
            print(f"{io}: max |diff| vs PyTorch {diff:.2e}, top-1 {int(got.argmax())} "
                  f"(PyTorch {int(t['logits'].argmax())})")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
