"""`featx finetune BACKBONE IMAGES`: fine-tune a pretrained backbone; writes a run folder that predict accepts."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .app import app, run_boundary
from .common import err, out, print_json, styled, warn
from .plain_help import PlainHelpCommand
from ..features.sizing import parse_image_size


def is_main_rank() -> bool:
    """Under torchrun only rank 0 prints results (every rank runs the command)."""
    return int(os.environ.get("RANK", "0")) == 0


def epoch_line(row: dict) -> None:
    """One progress line per epoch on stderr; `*` marks a new best validation accuracy."""
    from ..training.callbacks import format_epoch

    star = " [green]*[/]" if row.get("improved") and row.get("val_accuracy") is not None else ""
    err.print(styled("{}" + star, format_epoch(row)))


def log_message(msg: str) -> None:
    if msg.startswith("warning: "):
        warn(msg[len("warning: "):])
    else:
        err.print(msg)


def print_result(res, json_: bool) -> None:
    from ..report import metrics_chance_note

    if not is_main_rank():
        return
    if json_:
        print_json(res.summary())
        return
    b = res.best
    if b.get("accuracy") is not None:
        score = styled("best val accuracy [bold green]{}[/] (balanced {}) at epoch {} ({} phase)",
                       f"{b['accuracy']:.4f}", f"{b['balanced_accuracy']:.4f}", b["epoch"], b.get("phase"))
    else:
        score = styled("no validation images; kept the last epoch ({})", b["epoch"])
    state = "" if res.completed else " [yellow](stopped early on request: continue with --resume)[/]"
    n_epochs = len(res.rows)
    out.print(score + styled(", {} epoch{} in {} s" + state, n_epochs, "" if n_epochs == 1 else "s",
                             f"{res.seconds:.1f}"))
    for what, m in (("val", res.metrics), ("test", res.test_metrics)):  # the one chance rule (featx.report)
        if m and m.get("majority_rate") is not None:
            line = f"{what}: majority-class rate {m['majority_rate']:.4f}"
            if m.get("beats_chance") is False:
                out.print(styled("[yellow]{}; {}[/]", line, metrics_chance_note(m, f"{what} accuracy")))
            else:
                out.print(line)
    for note in res.notes:  # which epoch the model keeps, and whether fine-tuning beat the head phase
        out.print(note)
    t = res.test_metrics
    if t:
        out.print(styled("test accuracy [bold]{}[/] (balanced {}) on {} images, scored once with the kept weights",
                         f"{t['accuracy']:.4f}", f"{t['balanced_accuracy']:.4f}", t["n"]))
    if res.skipped:
        out.print(f"{len(res.skipped)} image(s) could not be decoded and were skipped (listed in report.md)")
    out.print(styled("run folder: [bold]{}[/]  (featx predict IMAGES --model {})", res.run_dir, res.run_dir))


@app.command("finetune", cls=PlainHelpCommand)
@run_boundary
def finetune_cmd(
    backbone: str = typer.Argument(..., help="Backbone name, e.g. efficientnet_lite0, resnet18, tv/resnet18 (see `featx models`)."),
    images: Path = typer.Argument(..., help="Labelled image folder: class subfolders, optionally inside train/ and val/."),
    epochs: int = typer.Option(15, "--epochs", min=1, help="Total epochs (head phase + fine-tuning phase)."),
    head_epochs: int = typer.Option(3, "--head-epochs", min=0, help="Epochs training only the new head (capped at epochs/3)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch (per process under torchrun)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Crop size (default: the backbone's own), or auto: the backbone's own unless the images are small, then a smaller one (as `featx extract`)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate of the head in phase 2; lower layers get less."),
    head_lr: float = typer.Option(3e-3, "--head-lr", help="Learning rate of phase 1 (head on the frozen backbone)."),
    unfreeze: str = typer.Option("all", "--unfreeze", help="Layer groups to unfreeze in phase 2: N or 'all'."),
    layer_decay: float = typer.Option(0.7, "--layer-decay", help="LR multiplier per layer group going down."),
    scale_to_data: bool = typer.Option(True, "--scale-to-data/--no-scale-to-data", help="Below 1000 training images, phase 2 of a pretrained backbone unfreezes fewer groups at a lower LR (x sqrt(n/1000))."),
    augment: str = typer.Option("standard", "--augment", help="none | light | standard | strong."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | sgd (Nesterov momentum 0.9)."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="Decoupled weight decay (not on biases/norms)."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Label smoothing of the training loss."),
    patience: int = typer.Option(5, "--patience", min=0, help="Early stopping after N epochs without a better val accuracy (0: off)."),
    val_split: float = typer.Option(0.2, "--val-split", help="Held-out fraction (stratified, seeded) when there is no val/ folder."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file (.safetensors or torch state dict)."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Start from a random init instead of ImageNet weights."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the head init, shuffling and augmentation."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto = CUDA when present)."),
    precision: str = typer.Option("auto", "--precision", help="auto | bf16 | fp16 | fp32 (auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on the CPU)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes (default: one per CPU, at most 8)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Run folders go to RUNS_DIR/finetune/NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name (default: exp, exp2, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse an existing --name folder (featx replaces only the files it wrote there)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", hidden=True, help="Old name of --overwrite."),
    resume: bool = typer.Option(False, "--resume", help="Continue the --name run (or the latest one) from its last epoch."),
    max_epochs: Optional[int] = typer.Option(None, "--stop-after", min=1, help="Stop after this epoch (resumable), e.g. to time-box a job."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary (run_dir, model, best) on stdout."),
):
    """Fine-tune a pretrained backbone: head on the frozen net, then unfreeze with layer-wise learning rates."""
    from ..training import finetune

    _check_order(backbone, images)
    res = finetune(
        backbone, images, epochs=epochs, head_epochs=head_epochs, batch_size=batch_size, image_size=parse_image_size(image_size),
        lr=lr, head_lr=head_lr, unfreeze=unfreeze, layer_decay=layer_decay, scale_to_data=scale_to_data, augment=augment, optimizer=optimizer,
        weight_decay=weight_decay, label_smoothing=label_smoothing, patience=patience, val_split=val_split,
        weights=str(weights) if weights else None, pretrained=not no_pretrained, seed=seed, device=device, precision=precision,
        workers=workers, runs_dir=str(runs_dir), name=name, exist_ok=overwrite or exist_ok, resume=resume, stop_after=max_epochs,
        log=log_message if is_main_rank() else None, on_epoch=epoch_line,
    )
    print_result(res, json_)


def _check_order(backbone: str, images: Path) -> None:
    """`featx finetune IMAGES BACKBONE` (the order extract and scratch would suggest): one line with the command in
    the right order, before any work. Only when the first is a folder and the second a backbone featx knows."""
    from ..backbones import resolve_name
    from ..errors import FeatxError, UsageError

    if not Path(backbone).is_dir() or images.exists():
        return
    try:
        resolve_name(str(images))
    except FeatxError:
        return
    raise UsageError(f"featx finetune takes BACKBONE then IMAGES, and {backbone} is a folder while {images} is a "
                     f"backbone: did you mean `featx finetune {images} {backbone}`?")
