"""Benchmark for issue 23 item 4: does channels_last speed up training steps where torch stays on the CPU?

    PYTHONPATH=. python benchmarks/bench_cpu_training.py [--rounds 3] [--steps 6]

One training step = forward, cross-entropy, backward, SGD step, on random pixels of the network's default size:
- finetune's head phase (lite0 at 256 px, everything frozen but the classifier, batch 32: the frozen body still runs
  forward), and its fine-tune phase (the top 2 layer groups trainable, BatchNorm statistics frozen);
- scratch training of featx's small CNNs (lenet5 at 32 px, vgg_small at 64 px, resnet20 at 32 px, batch 64).
Each set-up runs contiguous (NCHW) and channels_last (model and input), alternated round by round in one process, at
torch's default thread count; the table shows the median steps/s of each and the ratio. The machine is shared:
load averages are printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setups():
    import torch

    import featx
    from featx.training import zoo
    from featx.training.trainer import freeze_bn_stats

    def lite0(unfreeze: int):
        bb = featx.create_backbone("efficientnet_lite0", image_size=256)
        bb.reset_classifier(2)
        model = bb.model
        for p in model.parameters():
            p.requires_grad_(False)
        for p in bb.classifier().parameters():
            p.requires_grad_(True)
        for group in bb.layer_groups()[-unfreeze:] if unfreeze else []:
            for m in group:
                for p in m.parameters():
                    p.requires_grad_(True)
        model.train()
        freeze_bn_stats(model)
        return model, (32, 3, 256, 256), 2

    def scratch(name: str, size: int):
        model = zoo.build(name, 10, size)
        model.train()
        return model, (64, 3, size, size), 10

    yield "finetune head phase (lite0 256 px, b32)", lambda: lite0(0)
    yield "finetune top 2 groups (lite0 256 px, b32)", lambda: lite0(2)
    yield "scratch lenet5 (32 px, b64)", lambda: scratch("lenet5", 32)
    yield "scratch vgg_small (64 px, b64)", lambda: scratch("vgg_small", 64)
    yield "scratch resnet20 (32 px, b64)", lambda: scratch("resnet20", 32)
    del torch


def _time_steps(model, x, y, steps: int) -> float:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up: allocator, kernels chosen
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    import torch

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    rows = []
    for name, make in _setups():
        model, shape, k = make()
        x = torch.rand(shape)
        y = torch.randint(0, k, (shape[0],))
        got = {"contiguous": [], "channels_last": []}
        for _ in range(a.rounds):
            for fmt in got:
                mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                model.to(memory_format=mf)
                got[fmt].append(_time_steps(model, x.contiguous(memory_format=mf), y, a.steps))
        c, cl = statistics.median(got["contiguous"]), statistics.median(got["channels_last"])
        rows.append((name, c, cl))
        print(f"{name:45s} contiguous {c:7.2f} steps/s  channels_last {cl:7.2f} steps/s  ratio {cl / c:5.2f}  "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print("\n| set-up | contiguous steps/s | channels_last steps/s | channels_last / contiguous |")
    print("|---|---|---|---|")
    for name, c, cl in rows:
        print(f"| {name} | {c:.2f} | {cl:.2f} | {cl / c:.2f}x |")


if __name__ == "__main__":
    main()
