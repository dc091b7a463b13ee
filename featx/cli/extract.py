"""`featx extract IMAGES`: features from a pretrained backbone into one resumable, pickle-free feature store."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, run_boundary
from .common import out, print_json, progress_bar, styled, warn
from .plain_help import PlainHelpCommand


@app.command("extract", cls=PlainHelpCommand)
@run_boundary
def extract_cmd(
    images: Path = typer.Argument(..., help="Image folder: class subfolders give labels, train/ val/ test/ give splits."),
    output: str = typer.Option("featx-out/features.npz", "-o", "--output",
                               help="Feature store to write: .npz, .parquet, or a folder (ending in /) of shards."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone name (see `featx models`)."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random (seeded) initialisation instead of ImageNet weights."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file (.safetensors or torch state dict)."),
    layer: str = typer.Option("pooled", "--layer", help="'pooled' (classifier input), stageN, or a module name (globally pooled)."),
    image_size: Optional[str] = typer.Option(
        None, "--image-size",
        help="Crop size in pixels (default: the backbone's own, 256 for lite0), or auto: the backbone's own unless the "
             "images are small, then a smaller one from their median shorter side (faster; same resize/crop ratio; "
             "recorded for predict)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto = CUDA when present)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Images per batch (default 32 CPU, 256 CUDA; capped to what memory holds)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding processes (default: CPU count, at most 8); with the CPU runtime "
                                         "(onnxruntime), decoding threads (default: usable cores, at most 4)."),
    runtime: str = typer.Option("auto", "--runtime", help="auto | torch | onnx: how the network runs (auto = onnxruntime on the CPU, a graph built once and cached; torch on CUDA)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime threads (default: the cores this process may use)."),
    chunk_size: int = typer.Option(1024, "--chunk-size", min=1, help="Images per resumable chunk."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero if any file is skipped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing file that is not a featx store."),
    decoder: str = typer.Option(
        "auto", "--decoder",
        help="auto | pil | torchvision. auto = JPEGs decoded and resized batched on the GPU when on CUDA; "
             "pil forces CPU decoding in the workers.",
    ),
    compile_: bool = typer.Option(False, "--compile",
                                  help="torch.compile the network: faster batches after tens of seconds of compiling "
                                       "(pays on large folders only)."),
    format_: Optional[str] = typer.Option(
        None, "--format", help="npz | parquet | sharded (default: from -o; sharded = a folder of memory-mappable "
                               ".npy shards + manifest.json, for millions of images or many workers)."),
    shard: Optional[str] = typer.Option(
        None, "--shard", help="I/N: this worker extracts its share (every N-th chunk from the I-th) into the "
                              "sharded store; the last of the N workers merges them (default under torchrun: "
                              "RANK/WORLD_SIZE)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 (half the disk; npz and sharded stores)."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Extract features for every image in a folder (resumes if interrupted)."""
    from ..errors import interruptible
    from ..features.engine import RESUME_HINT, extract_features

    with interruptible(RESUME_HINT), progress_bar("extracting", unit="img") as update:
        res = extract_features(
            images, output, backbone=backbone, pretrained=not no_pretrained, weights=weights, layer=layer,
            device=device, batch_size=batch_size, workers=workers, chunk_size=chunk_size, strict=strict,
            overwrite=overwrite, progress=update, decoder=decoder, image_size=image_size, compile=compile_,
            format=format_, shard=shard, dtype=dtype, runtime=runtime, threads=threads,
        )
    for w in res.warnings:
        warn(w)
    for s in res.skipped[:20]:
        warn(f"skipped {s['path']}: {s['reason']}")
    if len(res.skipped) > 20:
        warn(f"... and {len(res.skipped) - 20} more skipped files, all listed in the store's meta['skipped']")
    for g in res.leakage:
        warn(f"{'/'.join(g['splits'])} leakage: identical files {', '.join(g['paths'])}")  # the splits it spans
    if res.leakage:
        warn("these are byte-identical copies only; run `featx audit` on the features to also find resized, "
             "re-encoded or cropped copies across splits")
    if json_:
        print_json(res.to_dict())
        return
    if res.already_complete:
        out.print(styled("already complete: [bold green]{}[/] images, [bold]{}[/] skipped, {}-d features from {} "
                         "at {} -> {} (same folder, files and options; nothing was run; --overwrite extracts again)",
                         res.n_images, res.n_skipped, res.feature_dim, res.backbone, _recipe(res), res.path))
        return
    resumed = f" ({res.resumed_images} resumed)" if res.resumed_images else ""
    out.print(styled(
        "[bold green]{}[/] images{}, [bold]{}[/] skipped, {}-d features from {} at {} on {} ({} decoding) in {} s "
        "({} img/s, {}) -> {}",
        res.n_images, resumed, res.n_skipped, res.feature_dim, res.backbone, _recipe(res), res.device, res.decoder,
        f"{res.seconds:.1f}", f"{res.images_per_s:.1f}", res.runtime, res.path))


def _recipe(res) -> str:
    """'256 px', or '224 px (auto: images' median shorter side 128 px)'."""
    size = res.image_size or {}
    text = f"{size.get('size')} px"
    if size.get("mode") == "auto" and size.get("size") != size.get("default"):
        text += f" (auto: images' median shorter side {size.get('median_short_side')} px)"
    return text
