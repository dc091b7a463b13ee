"""What helps frozen-feature accuracy on small photos (issue 15.4): each candidate on the full-size folder and on a copy
downscaled to 128 px on the shorter side (JPEG quality 75), through featx's own extract and fit paths.

    python benchmarks/bench_small_images.py [--data ../shared/data/hymenoptera] [--work bench-out/small] [--device cpu]

Every candidate is one `featx.extract_features` call (cached in --work: a rerun skips finished stores) and one
`featx.fit_head(..., head="all")` (5-fold CV on train, scored on the folder's val split; the logistic and mlp rows
are the heads of that call, "best" the head with the best val accuracy, i.e. chosen on val itself, so optimistic).

The table in BENCHMARKS.md also has rows for horizontal-flip averaging and appended stage3/stage4 features: those were
measured with this script and the --tta/--concat options of commit 0dc39de, removed since because they did not help
on either version of the data; this script no longer runs them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHORT_SIDE, QUALITY = 128, 75

# (label, extract kwargs, versions it runs on). image_size None = the backbone's own (featx's
# default), "auto" = featx.features.sizing's choice. Ordered by what decides most, so a cut-short run still informs.
CANDIDATES = [
    ("default: lite0 256", dict(image_size=None), ("full", "128px")),
    ("size 224", dict(image_size=224), ("full", "128px")),
    ("size 192", dict(image_size=192), ("128px",)),
    ("size 160", dict(image_size=160), ("full", "128px")),
    ("size 128", dict(image_size=128), ("128px",)),
    ("--image-size auto", dict(image_size="auto"), ("full", "128px")),
    ("lite1 272", dict(backbone="efficientnet_lite1", image_size=None), ("full", "128px")),
    ("lite2 296", dict(backbone="efficientnet_lite2", image_size=None), ("full", "128px")),
    ("lite2 auto", dict(backbone="efficientnet_lite2", image_size="auto"), ("128px",)),
    ("lite1 auto", dict(backbone="efficientnet_lite1", image_size="auto"), ("128px",)),
]


def downscale_copy(src: Path, dst: Path) -> Path:
    """src's tree with every image resized to SHORT_SIDE px on its shorter side (Lanczos), saved as JPEG q75."""
    from PIL import Image, ImageOps

    done = dst / ".complete"
    if done.is_file():
        return dst
    for p in sorted(src.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"):
            continue
        out = (dst / p.relative_to(src)).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            scale = SHORT_SIDE / min(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
            im.save(out, "JPEG", quality=QUALITY)
    done.write_text("ok")
    return dst


def resolved(kwargs: dict, folder: Path) -> dict:
    """The extraction kwargs with image_size made concrete (auto resolved on this folder), for the cache key."""
    import featx
    from featx.data.discover import discover
    from featx.features.sizing import choose_image_size

    name = kwargs.get("backbone", "efficientnet_lite0")
    pp = featx.create_backbone(name).preprocess
    choice = choose_image_size([r.path for r in discover(folder).records], pp, kwargs.get("image_size"))
    return {**kwargs, "backbone": name, "size": choice.size, "auto": choice.to_dict()}


def extract(kwargs: dict, folder: Path, work: Path, version: str, device: str) -> tuple:
    """(FeatureSet, extraction info, cache key) for one configuration; stores and seconds cached in `work`."""
    import featx

    r = resolved(kwargs, folder)
    key = f"{version}-{r['backbone']}-{r['size']}"
    store, info = work / f"{key}.npz", work / f"{key}.json"
    if not (store.is_file() and info.is_file()):
        t = time.perf_counter()
        res = featx.extract_features(folder, store, backbone=r["backbone"], image_size=kwargs.get("image_size"),
                                     device=device, overwrite=True)
        info.write_text(json.dumps({"seconds": time.perf_counter() - t, "size": res.image_size,
                                    "load": os.getloadavg()}))
        print(f"  extracted {key}: {res.n_images} images in {res.seconds:.0f} s", flush=True)
    return featx.load_features(store), json.loads(info.read_text()), key


def heads(fs, cache: Path) -> dict:
    """val accuracy of logistic / mlp / the best head of `fit_head(head="all")`, and logistic's CV accuracy."""
    import featx

    if cache.is_file():
        return json.loads(cache.read_text())
    best = featx.fit_head(fs, head="all", cv=5, seed=0, device="cpu")
    by = {r.kind: r for r in best.results}
    out = {"logistic": by["logistic"].score, "logistic_cv": float(by["logistic"].cv["mean"]),
           "logistic_C": by["logistic"].head.meta.get("params"), "mlp": by["mlp"].score,
           "best": best.score, "best_head": best.kind, "all": {k: r.score for k, r in by.items()}}
    cache.write_text(json.dumps(out))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--work", type=Path, default=Path("bench-out") / "small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="labels of candidates to run (default: all)")
    args = ap.parse_args(argv)
    os.environ.setdefault("FEATX_NO_PROGRESS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    folders = {"full": args.data, "128px": downscale_copy(args.data, args.work / f"data-{SHORT_SIDE}")}
    rows = []
    for label, kwargs, versions in CANDIDATES:
        if args.only and label not in args.only:
            continue
        row = {"label": label}
        for version in versions:
            print(f"{label} / {version}", flush=True)
            fs, info, key = extract(kwargs, folders[version], args.work, version, args.device)
            row[version] = {**heads(fs, args.work / f"heads-{key}.json"), "seconds": info["seconds"],
                            "dim": fs.dim, "size": info["size"]}
        rows.append(row)
    print_table(rows, args)


def print_table(rows: list, args) -> None:
    base = {v: next((r[v] for r in rows if r["label"].startswith("default") and v in r), None) for v in ("full", "128px")}
    print(f"\n{args.data.name}: val accuracy (n = 153), full size and a {SHORT_SIDE}-px JPEG-q{QUALITY} copy; "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print("| candidate | data | crop px | dim | logistic | logistic CV | mlp | best head (on val) | extract s "
          "| gain vs default (logistic, pts) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for v in ("full", "128px"):
            if v not in r:
                continue
            c, b = r[v], base[v]
            gain = f"{100 * (c['logistic'] - b['logistic']):+.1f}" if b else "-"
            print(f"| {r['label']} | {v} | {c['size']['size']} | {c['dim']} | {c['logistic']:.3f} | "
                  f"{c['logistic_cv']:.3f} | {c['mlp']:.3f} | {c['best']:.3f} ({c['best_head']}) | "
                  f"{c['seconds']:.0f} | {gain} |")


if __name__ == "__main__":
    main()
