"""`featx scratch IMAGES --arch NAME`: train a small CNN from scratch (the no-pretraining baseline)."""
from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Optional

import typer

from .app import app, run_boundary
from .finetune import epoch_line, is_main_rank, log_message, print_result
from .plain_help import PlainHelpCommand
from ..features.sizing import parse_image_size

# A literal copy of featx.training.zoo.ARCHS (name, default size, description), not imported: the zoo imports torch,
# every command module is imported at start-up, and `featx predict --model model.onnx` must run on a machine without
# torch. tests/test_predict_onnx.py checks that the two agree.
_Arch = namedtuple("_Arch", "name image_size description")
ARCHS = {a.name: a for a in (
    _Arch("lenet5", 32, "LeNet-5 (ReLU, max-pool), 62k parameters at 10 classes; digits, tiny icons"),
    _Arch("vgg_small", 64, "VGG-style 3x3 conv stacks with BatchNorm and dropout, 1.1M parameters"),
    _Arch("resnet20", 32, "CIFAR-style ResNet-20 (3 stages x 3 basic blocks), 0.27M parameters"),
)}
_ARCH_HELP = ", ".join(f"{a.name} ({a.image_size} px)" for a in ARCHS.values())
# the first paragraph is the one-line summary `featx --help` lists; the architectures follow in `featx scratch --help`
_HELP = ("Train a small CNN from random init: the no-pretraining baseline.\n\nArchitectures (--arch):\n\n"
         + "\n\n".join(f"{a.name}: {a.description} (default --image-size {a.image_size})" for a in ARCHS.values()))


@app.command("scratch", help=_HELP, cls=PlainHelpCommand)
@run_boundary
def scratch_cmd(
    images: Path = typer.Argument(..., help="Labelled image folder: class subfolders, optionally inside train/ and val/."),
    arch: str = typer.Option("lenet5", "--arch", help=f"Architecture: {_ARCH_HELP}."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="Epochs (early stopping may end sooner)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per batch (default: about n_train/16, 32-512)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Input size (default: the architecture's, e.g. 32 for lenet5), or auto: the architecture's unless the images are smaller."),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate (warm-up, then cosine)."),
    augment: str = typer.Option("standard", "--augment", help="none | light (random crop) | standard (crop + flip)."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw | sgd (Nesterov momentum 0.9)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="Decoupled weight decay (not on biases/norms)."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Label smoothing of the training loss."),
    patience: int = typer.Option(10, "--patience", min=0, help="Early stopping after N epochs without a better val accuracy (0: off)."),
    val_split: float = typer.Option(0.2, "--val-split", help="Held-out fraction (stratified, seeded) when there is no val/ folder."),
    in_memory: Optional[bool] = typer.Option(None, "--in-memory/--stream", help="Force decoding once into memory, or streaming (default: in memory when it fits)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the init, shuffling and augmentation."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto = CUDA when present)."),
    precision: str = typer.Option("auto", "--precision", help="auto | bf16 | fp16 | fp32 (auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on the CPU)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding processes (default: one per CPU, at most 8)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Run folders go to RUNS_DIR/scratch/NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name (default: exp, exp2, ...)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Reuse an existing --name folder (featx replaces only the files it wrote there)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", hidden=True, help="Old name of --overwrite."),
    resume: bool = typer.Option(False, "--resume", help="Continue the --name run (or the latest one) from its last epoch."),
    max_epochs: Optional[int] = typer.Option(None, "--stop-after", min=1, help="Stop after this epoch (resumable)."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary (run_dir, model, best) on stdout."),
):
    from ..training import train_scratch

    res = train_scratch(
        images, arch=arch, epochs=epochs, batch_size=batch_size, image_size=parse_image_size(image_size), lr=lr, augment=augment,
        optimizer=optimizer, weight_decay=weight_decay, label_smoothing=label_smoothing, patience=patience,
        val_split=val_split, in_memory=in_memory, seed=seed, device=device, precision=precision, workers=workers, runs_dir=str(runs_dir),
        name=name, exist_ok=overwrite or exist_ok, resume=resume, stop_after=max_epochs,
        log=log_message if is_main_rank() else None, on_epoch=epoch_line,
    )
    print_result(res, json_)
