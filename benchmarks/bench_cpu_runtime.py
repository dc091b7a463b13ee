"""CPU runtime (issue 23): torch eager vs torch channels_last vs onnxruntime, alternated in one run.

    python benchmarks/bench_cpu_runtime.py                    # 398 hymenoptera photos + a 128-px copy, 2 rounds
    python benchmarks/bench_cpu_runtime.py --rounds 1 --sets full --skip-predict   # a quicker look
    python benchmarks/bench_cpu_runtime.py --sets full --engines torch,onnx --before  # the 4x check + the old pipeline

Printed, each figure with the load average (1 min) beside it, since the 2-core machine may be shared:
1. the network alone on decoded pixels (lite0, 256 px, batch 32): images/s per engine, and this machine's limit
   (GFLOP per image, counted by torch's FlopCounterMode, times images/s, against cores x GHz x FLOP/cycle);
2. where the input side's time goes, one core: decode (featx.data.decode.load_rgb) and resize + crop
   (Preprocess.resize_crop), in images/s;
3. files -> store end to end (`featx.extract_features`, process start and model loading excluded: its own
   images_per_s), per engine and image set, plus the largest feature difference and the smallest cosine between the
   torch and onnxruntime stores; each round's ratio to `--runtime torch` (the runs alternate, so a ratio compares
   runs made under the same load) and where the onnxruntime run's time went: network (the session, wall), waiting
   for pixels, other (bookkeeping, writes), and the decode / resize work the threads did beside the network;
4. files -> table end to end (`featx.predict_folder` with a logistic head fitted on the torch features), the same way,
   plus the whole call (table written, seen-in-training matching) as wall time.
``--before`` adds the onnxruntime pipeline as it was before the decode threads and lanes (DataLoader worker processes
feeding one session with intra-op threads), for a before/after in the same run.
The first onnxruntime use builds the cached graph; that build is timed on its own and kept out of the rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def small_copy(src: Path, dst: Path, side: int) -> Path:
    """Every image of ``src`` with its shorter side resized to ``side`` px (JPEG, quality 90), same folders."""
    from PIL import Image

    marker = dst / f".side{side}"
    if marker.exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        out = dst / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() != ".jpg":  # the odd GIF / .jpeg: as it is
            shutil.copyfile(p, out)
            continue
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = side / min(im.size)
            im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC).save(out, quality=90)
    marker.touch()
    return dst


def channels_last(bb):
    """A copy of the backbone whose network keeps its weights (hence its activations) in channels_last."""
    import torch

    bb2 = copy.deepcopy(bb)
    bb2.model.to(memory_format=torch.channels_last)
    return bb2


def network_alone(bb, paths, rounds: int, batch: int, threads: int) -> dict:
    """images/s of the network on decoded pixels: torch eager, torch channels_last, onnxruntime."""
    import torch

    from featx import runtime
    from featx.data.decode import load_rgb
    from featx.features.engine import normalizer

    pp = bb.preprocess
    pixels = np.stack([pp.resize_crop(load_rgb(p)) for p in paths[:batch]])
    norm = normalizer(pp, torch.device("cpu"))
    x = norm(torch.from_numpy(pixels).permute(0, 3, 1, 2)).contiguous()
    bb_cl = channels_last(bb)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    what = f"features of {bb.name} at {bb.layer}"
    net = runtime.OnnxNetwork(bb.forward_features, bb.model, pp, what=what, threads=threads, parallel="lanes")
    intra = runtime.OnnxNetwork(bb.forward_features, bb.model, pp, what=what, threads=threads, parallel="intra")
    onnx_out = net(pixels)  # builds or loads the graph, checks parity
    intra(pixels)
    with torch.inference_mode():
        ref = bb.forward_features(x).numpy()
    engines = {
        "torch eager": lambda: bb.forward_features(x),
        "torch channels_last": lambda: bb_cl.forward_features(x_cl),
        "onnxruntime": lambda: net(pixels),
        "onnxruntime intra-op": lambda: intra(pixels),
    }
    times = {k: [] for k in engines}
    with torch.inference_mode():
        for fn in engines.values():
            fn()  # warm-up
        for _ in range(rounds):
            for k, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    out = {k: len(pixels) / statistics.median(v) for k, v in times.items()}
    diff = runtime.compare_outputs(onnx_out, ref)
    return {"ips": out, "parity": diff, "gflop": gflop_per_image(bb), "load": load()}


def gflop_per_image(bb) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    s = bb.preprocess.input_size
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        bb.forward_features(torch.zeros(1, 3, s, s))
    return fc.get_total_flops() / 1e9


def cpu_peak(cores: int, flop_per_cycle: int) -> tuple:
    """(GHz from /proc/cpuinfo, peak fp32 GFLOP/s for ``cores``)."""
    ghz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                ghz = float(line.split(":")[1]) / 1000
                break
    except OSError:
        pass
    return ghz, (ghz or 0) * cores * flop_per_cycle


def input_side(bb, paths, n: int) -> dict:
    """One core: decode, resize + crop, in images/s."""
    from featx.data.decode import load_rgb

    pp = bb.preprocess
    t0 = time.perf_counter()
    imgs = [load_rgb(p) for p in paths[:n]]
    t1 = time.perf_counter()
    for im in imgs:
        pp.resize_crop(im)
    t2 = time.perf_counter()
    return {"decode": n / (t1 - t0), "resize_crop": n / (t2 - t1), "both": n / (t2 - t0), "load": load()}


ENGINES = ("torch", "torch_cl", "onnx", "before")
ENGINE_NAMES = {"torch": "torch eager", "torch_cl": "torch channels_last", "onnx": "onnxruntime",
                "before": "onnxruntime, before (processes, intra-op)"}


@contextlib.contextmanager
def before_pipeline(on: bool):
    """The onnxruntime path as it was before the decode threads and lanes: DataLoader worker processes feed one
    session with intra-op threads (commit 27247e7). Benchmark only: a before/after in the same process."""
    if not on:
        yield
        return
    from featx import runtime
    from featx.features import engine

    saved = engine._on_threads, runtime.PARALLEL
    engine._on_threads, runtime.PARALLEL = (lambda *a: False), "intra"
    try:
        yield
    finally:
        engine._on_threads, runtime.PARALLEL = saved


def breakdown(t: dict, n: int, ips: float) -> str:
    """Where an onnxruntime run's wall time went (main thread), and the input work done beside it (thread-s)."""
    if "network_s" not in t or not ips:
        return ""
    wall = n / ips
    other = wall - t["network_s"] - t.get("input_wait_s", 0.0)
    return (f"last round: wall {wall:.2f} s = network {t['network_s']:.2f} + waiting for pixels {t.get('input_wait_s', 0):.2f} "
            f"+ other {other:.2f}; beside it, decode {t.get('decode_s', 0):.2f} + resize {t.get('resize_s', 0):.2f} "
            f"thread-s")


def end_to_end(bb, sets: dict, rounds: int, work: Path, threads, engines: list) -> dict:
    """files -> store: featx's own images_per_s per (set, engine), medians over alternated rounds."""
    import featx

    bb_cl = channels_last(bb) if "torch_cl" in engines else None
    spec = {"torch": (bb, "torch"), "torch_cl": (bb_cl, "torch"), "onnx": (bb, "onnx"), "before": (bb, "onnx")}
    res: dict = {}
    for name, folder in sets.items():
        # the first onnxruntime use of this graph (the size is the same for both sets): timed apart
        for k in engines:
            if spec[k][1] == "onnx":
                t0 = time.perf_counter()
                with before_pipeline(k == "before"):
                    featx.extract_features(folder, work / "warm.npz", backbone=bb, runtime="onnx", overwrite=True,
                                           threads=threads)
                res[(name, f"first run, {ENGINE_NAMES[k]} (graph build or load)")] = {
                    "seconds": time.perf_counter() - t0}
        runs: dict = {k: [] for k in engines}
        loads: dict = {k: [] for k in engines}
        for _ in range(rounds):
            for k in engines:
                b, rt = spec[k]
                with before_pipeline(k == "before"):
                    r = featx.extract_features(folder, work / f"{name}-{k}.npz", backbone=b, runtime=rt,
                                               overwrite=True, threads=threads)
                runs[k].append(r)
                loads[k].append(os.getloadavg()[0])
        base = runs.get("torch")
        for k, rs in runs.items():
            ips = [r.images_per_s for r in rs]
            res[(name, k)] = {"ips": statistics.median(ips), "n": rs[0].n_images, "timings": rs[-1].timings,
                              "load": f"load {statistics.mean(loads[k]):.1f}",
                              "ratios": [a / b.images_per_s for a, b in zip(ips, base)] if base else [],
                              "breakdown": breakdown(rs[-1].timings, rs[-1].n_images, rs[-1].images_per_s)}
        if "torch" in engines and "onnx" in engines:
            from featx.runtime import compare_outputs

            a = featx.load_features(work / f"{name}-torch.npz")
            b2 = featx.load_features(work / f"{name}-onnx.npz")
            res[(name, "features")] = compare_outputs(b2.features, a.features)
    return res


def predict(bb, sets: dict, rounds: int, work: Path, threads, engines: list) -> dict:
    import featx

    head_from = work / f"{next(iter(sets))}-torch.npz"
    if not head_from.exists():
        featx.extract_features(next(iter(sets.values())), head_from, backbone=bb, runtime="torch", overwrite=True)
    fs = featx.load_features(head_from)
    head = featx.fit_head(fs, head="logistic", output=work / "head.skops", overwrite=True)
    kinds = [k for k in ("torch", "onnx", "before") if k in engines]
    res: dict = {}
    for name, folder in sets.items():
        for k in kinds:
            if k != "torch":
                with before_pipeline(k == "before"):
                    featx.predict_folder(folder, model=head.path, output=work / "warm.csv", runtime="onnx",
                                         overwrite=True, threads=threads)
        runs: dict = {k: [] for k in kinds}
        walls: dict = {k: [] for k in kinds}
        loads: dict = {k: [] for k in kinds}
        for _ in range(rounds):
            for k in kinds:
                rt = "torch" if k == "torch" else "onnx"
                t0 = time.perf_counter()
                with before_pipeline(k == "before"):
                    r = featx.predict_folder(folder, model=head.path, output=work / f"p-{name}-{k}.csv", runtime=rt,
                                             overwrite=True, threads=threads)
                walls[k].append(time.perf_counter() - t0)
                runs[k].append(r)
                loads[k].append(os.getloadavg()[0])
        same = runs["torch"][-1].labels == runs["onnx"][-1].labels if "torch" in runs and "onnx" in runs else None
        base = runs.get("torch")
        for k, rs in runs.items():
            ips = [r.images_per_s for r in rs]
            res[(name, k)] = {"ips": statistics.median(ips), "n": rs[0].n_images, "same_labels": same,
                              "wall": statistics.median(walls[k]), "load": f"load {statistics.mean(loads[k]):.1f}",
                              "ratios": [a / b.images_per_s for a, b in zip(ips, base)] if base else [],
                              "breakdown": breakdown(rs[-1].timings, rs[-1].n_images, rs[-1].images_per_s)}
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "featx-bench-cpu-runtime")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sets", choices=("both", "full", "small"), default="both")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: usable cores)")
    ap.add_argument("--flop-per-cycle", type=int, default=32,
                    help="fp32 FLOP per cycle per core (32: two 256-bit FMA pipes, AVX2 / Zen 4's AVX-512)")
    ap.add_argument("--skip-predict", action="store_true")
    ap.add_argument("--engines", default="torch,torch_cl,onnx",
                    help=f"comma-separated, from {', '.join(ENGINES)} (torch is the baseline of every ratio)")
    ap.add_argument("--before", action="store_true", help="add the onnxruntime pipeline as it was before (see above)")
    ap.add_argument("--skip-network", action="store_true", help="skip sections 1-2 (network alone, input side)")
    args = ap.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e] + (["before"] if args.before else [])
    if set(engines) - set(ENGINES):
        ap.error(f"--engines: unknown {sorted(set(engines) - set(ENGINES))}")

    import torch

    import featx
    from featx.runtime import usable_cores

    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEATX_CACHE_DIR", str(args.work / "cache"))
    cores = usable_cores()
    print(f"torch {torch.__version__}, {cores} usable cores, torch threads {torch.get_num_threads()}, {load()}")
    bb = featx.create_backbone("efficientnet_lite0")
    sets = {}
    if args.sets in ("both", "full"):
        sets["full"] = args.data
    if args.sets in ("both", "small"):
        sets["128px"] = small_copy(args.data, args.work / "small128", 128)
    paths = sorted(p for p in args.data.rglob("*.jpg"))

    if not args.skip_network:
        net = network_alone(bb, paths, max(3, args.rounds * 2), args.batch, args.threads or cores)
        ghz, peak = cpu_peak(cores, args.flop_per_cycle)
        print(f"\n## network alone, {bb.name} {bb.preprocess.input_size} px, batch {args.batch} ({net['load']})")
        for k, v in net["ips"].items():
            print(f"  {k:22s} {v:7.1f} img/s  ({v / net['ips']['torch eager']:.2f}x eager)  "
                  f"{v * net['gflop']:6.1f} GFLOP/s")
        print(f"  {net['gflop']:.3f} GFLOP/image; peak {peak:.0f} GFLOP/s ({cores} cores x {ghz} GHz x "
              f"{args.flop_per_cycle} FLOP/cycle) = {peak / net['gflop']:.0f} img/s at most; onnxruntime reaches "
              f"{net['ips']['onnxruntime'] * net['gflop'] / peak:.0%} of it")
        p = net["parity"]
        print(f"  onnxruntime vs torch on {p['images']} images: largest difference {p['max_abs_diff']:.2g}, "
              f"cosine {p['cosine']:.7f}")

        side = input_side(bb, paths, 64)
        print(f"\n## input side, one core ({side['load']}): decode {side['decode']:.0f} img/s, resize+crop "
              f"{side['resize_crop']:.0f} img/s, both {side['both']:.0f} img/s")

    e2e = end_to_end(bb, sets, args.rounds, args.work, args.threads, engines)
    print("\n## extract, files -> store (featx's images_per_s, model loading excluded)")
    report(e2e)
    if not args.skip_predict:
        pr = predict(bb, sets, args.rounds, args.work, args.threads, engines)
        print("\n## predict, files -> table (logistic head; images_per_s: decode + network + head; "
              "call: the whole predict_folder call)")
        report(pr)


def report(res: dict) -> None:
    for (name, k), v in res.items():
        if "ips" in v:
            ratio = ""
            if v["ratios"]:
                ratio = (f"({v['ips'] / res[(name, 'torch')]['ips']:.2f}x --runtime torch; per round "
                         f"{', '.join(f'{r:.2f}' for r in v['ratios'])})")
            extra = f"  call {v['wall']:.2f} s" if "wall" in v else ""
            extra += f"  same labels: {v['same_labels']}" if v.get("same_labels") is not None else ""
            print(f"  {name:6s} {ENGINE_NAMES[k]:42s} {v['ips']:6.1f} img/s {ratio}  n={v['n']}  {v['load']}{extra}")
            if v["breakdown"]:
                print(f"  {'':6s} {'':42s} {v['breakdown']}")
        elif "seconds" in v:
            print(f"  {name:6s} {k}: {v['seconds']:.1f} s")
        else:
            print(f"  {name:6s} features onnxruntime vs torch: largest difference {v['max_abs_diff']:.2g}, "
                  f"cosine {v['cosine']:.7f}")


if __name__ == "__main__":
    main()
