"""`featx compare IMAGES`: frozen-feature heads vs fine-tuning vs scratch CNNs on one split, as a table and report."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .app import app, run_boundary
from .common import out, print_json, styled
from .finetune import epoch_line, log_message


@app.command("compare")
@run_boundary
def compare_cmd(
    images: Path = typer.Argument(..., help="Labelled image folder: class subfolders, optionally inside train/ and val/."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone for the heads and for fine-tuning."),
    arch: Optional[List[str]] = typer.Option(None, "--arch", help="Scratch architecture(s); repeat for several (default: lenet5 and resnet20)."),
    quick: bool = typer.Option(False, "--quick", help="Small budget: 4 fine-tuning epochs, 8 scratch epochs, 3-fold CV."),
    skip_heads: bool = typer.Option(False, "--skip-heads", help="Do not fit heads on frozen features."),
    skip_finetune: bool = typer.Option(False, "--skip-finetune", help="Do not fine-tune."),
    skip_scratch: bool = typer.Option(False, "--skip-scratch", help="Do not train CNNs from scratch."),
    finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", min=1, help="Fine-tuning epochs (default 15, or 4 with --quick)."),
    scratch_epochs: Optional[int] = typer.Option(None, "--scratch-epochs", min=1, help="Scratch epochs (default 30, or 8 with --quick)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Crop size for extraction and fine-tuning (default: the backbone's)."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random-init backbone (a sanity check, not a real comparison)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local weights file for the backbone."),
    val_split: float = typer.Option(0.2, "--val-split", help="Held-out fraction (stratified, seeded) when there is no val/ folder."),
    seed: int = typer.Option(0, "--seed", help="One seed for the split and every method."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Data-loading processes."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="The report goes to RUNS_DIR/compare/NAME."),
    name: Optional[str] = typer.Option(None, "--name", help="Run folder name (default: exp, exp2, ...)."),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="Allow overwriting an existing --name folder."),
    json_: bool = typer.Option(False, "--json", help="Print one entry per method (method, accuracy, balanced_accuracy, seconds, trainable_params)."),
):
    """Is transfer learning worth it here? Heads on frozen features vs fine-tuning vs small CNNs from scratch."""
    from ..comparison import compare

    kw = {"archs": tuple(arch)} if arch else {}
    res = compare(
        images, backbone=backbone, quick=quick, skip_heads=skip_heads, skip_finetune=skip_finetune,
        skip_scratch=skip_scratch, finetune_epochs=finetune_epochs, scratch_epochs=scratch_epochs,
        image_size=image_size, pretrained=not no_pretrained, weights=str(weights) if weights else None,
        val_split=val_split, seed=seed, device=device, workers=workers, runs_dir=str(runs_dir), name=name,
        exist_ok=exist_ok, log=log_message, on_epoch=None if json_ else epoch_line, **kw,
    )
    if json_:
        print_json(res.to_json())
        return
    t = Table(title=f"validation: {res.n_val} images ({res.split})")
    for col in ("method", "val accuracy", "balanced accuracy", "seconds", "trainable params"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for r in res.rows:
        if r.error:
            t.add_row(r.method, styled("[red]failed[/]"), "", f"{r.seconds:.1f}", "")
            continue
        label = r.method if r.best_in_family or r.family != "heads" else styled("[dim]{}[/]", r.method)
        t.add_row(label, f"{r.accuracy:.4f}", f"{r.balanced_accuracy:.4f}", f"{r.seconds:.1f}",
                  "-" if r.trainable_params is None else f"{r.trainable_params:,}")
    out.print(t)
    out.print(styled("report: [bold]{}[/]{}", res.report_path, f", chart: {res.chart_path}" if res.chart_path else ""))
