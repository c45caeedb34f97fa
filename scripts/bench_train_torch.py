#!/usr/bin/env python3
"""PyTorch side of `effnet bench --train`: torchvision efficientnet_b0 (random init, `num_classes`
outputs), RMSprop (alpha 0.9, momentum 0.9, eps 1e-3), label-smoothed cross-entropy, timed per
optimizer step on a fixed random batch exactly like the effnet side. Prints a JSON list of timings.

    python3 scripts/bench_train_torch.py --batch 64 --resolution 32 --threads 1 --iters 20

On a GPU (`--device cuda`, as scripts/gpu_check.sh runs it beside effnet's GPU figures), `--amp
f16|bf16` adds autocast (with a GradScaler for f16) and `--eval` times inference instead (no_grad,
eval mode, the logits copied back to the host per batch, as `effnet bench --device` does).

Requires torch and torchvision; exits with status 3 when they are not installed.
"""
import argparse
import json
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--resolution", type=int, default=32)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--iters", type=int, default=20)
ap.add_argument("--classes", type=int, default=10)
ap.add_argument("--device", default="cpu")
ap.add_argument("--amp", choices=["f16", "bf16"])
ap.add_argument("--eval", action="store_true")
args = ap.parse_args()

try:
    import torch
    import torchvision
except ImportError as e:
    print(f"PyTorch is not installed ({e})", file=sys.stderr)
    sys.exit(3)

torch.set_num_threads(args.threads)
torch.set_num_interop_threads(1)
torch.manual_seed(0)
model = torchvision.models.efficientnet_b0(num_classes=args.classes).to(args.device)
model.train(not args.eval)
opt = torch.optim.RMSprop(model.parameters(), lr=0.004, alpha=0.9, momentum=0.9, eps=1e-3,
                          weight_decay=1e-5)
loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
x_host = torch.randn(args.batch, 3, args.resolution, args.resolution)
x = x_host.to(args.device)
y = torch.randint(0, args.classes, (args.batch,)).to(args.device)
half = {"f16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
scaler = torch.amp.GradScaler(enabled=args.amp == "f16")


def step():
    if args.eval:
        with torch.no_grad(), torch.autocast(x.device.type, half, enabled=half is not None):
            return model(x_host.to(args.device)).float().cpu()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, half, enabled=half is not None):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.item()


step()
step()  # warm-up: allocator, kernel selection
ms = []
for _ in range(args.iters):
    t = time.perf_counter()
    step()
    ms.append((time.perf_counter() - t) * 1000)
ms.sort()
median = ms[len(ms) // 2]
p90 = ms[min(len(ms), -(-len(ms) * 9 // 10)) - 1]
p99 = ms[min(len(ms), -(-len(ms) * 99 // 100)) - 1]
print(json.dumps([{
    "runtime": f"pytorch {torch.__version__.split('+')[0]}"
    + ("" if args.device == "cpu" else f" {args.device}")
    + (f" {args.amp}" if args.amp else ""),
    "median_ms": median,
    "p90_ms": p90,
    "p99_ms": p99,
    "images_per_s": args.batch * 1000 / median,
}]))
