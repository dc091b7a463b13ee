"""`featx export SOURCE -o OUT`: a model to one ONNX file (parity-checked), or a feature store to Parquet."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, run_boundary
from .common import out, print_json, styled, warn
from .plain_help import PlainHelpCommand

FEATURE_SUFFIXES = (".npz", ".parquet")  # a feature store; anything else is a model


@app.command("export", cls=PlainHelpCommand)
@run_boundary
def export_cmd(
    source: Path = typer.Argument(..., help="A head file (.skops), a run folder / model.json from `featx finetune` / "
                                  "`featx scratch`, or a feature store (.npz, .parquet, a sharded folder)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="model.onnx for a model; features.parquet "
                                          "(or .npz) for a feature store. Default: featx-out/model.onnx or "
                                          "featx-out/features.parquet."),
    check: Optional[Path] = typer.Option(None, "--check", help="Folder of images for the parity check "
                                         "(default: 12 photos shipped with featx)."),
    check_limit: int = typer.Option(64, "--check-limit", min=0, help="At most this many check images, spread "
                                    "evenly over the folder (0 = all)."),
    with_features: bool = typer.Option(False, "--with-features", help="Also output the features (second output)."),
    exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo, else TorchScript) | dynamo | torchscript."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights file, for a head fitted on "
                                           "features from a local weights file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing file featx did not write."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
):
    """Export a model to ONNX (checked against featx on real images) or a feature store to Parquet."""
    if source.suffix.lower() in FEATURE_SUFFIXES or (source / "manifest.json").is_file():  # a sharded store folder
        from ..errors import UsageError
        from ..export.parquet import DEFAULT_PARQUET_OUTPUT, export_features

        model_only = {"--check": check is not None, "--with-features": with_features, "--weights": weights is not None,
                      "--exporter": exporter != "auto", "--check-limit": check_limit != 64}
        if any(model_only.values()):
            raise UsageError(f"{', '.join(k for k, v in model_only.items() if v)} apply to model exports, not to a "
                             "feature store")

        res = export_features(source, output or DEFAULT_PARQUET_OUTPUT, overwrite=overwrite)
        if json_:
            print_json(res.to_dict())
            return
        out.print(styled("{} rows x {} features -> [bold]{}[/bold] ({} bytes)", res.n, res.dim, res.output, res.bytes))
        return
    from ..export.onnx_export import DEFAULT_MODEL_OUTPUT, export_model

    res = export_model(source, output or DEFAULT_MODEL_OUTPUT, check=check, check_limit=check_limit,
                       with_features=with_features, exporter=exporter, weights=weights, overwrite=overwrite)
    if res.exporter.get("fallback_reason"):
        warn(f"the dynamo exporter failed ({res.exporter['fallback_reason']}); used the TorchScript exporter")
    if json_:
        print_json(res.to_dict())
        return
    p = res.parity
    out.print(styled("[bold]{}[/bold] ({} classes, {} out) exported with the {} exporter (opset {})",
                     res.description, len(res.classes), "probabilities" if res.score_kind == "probability"
                     else "decision scores", res.exporter["name"], res.exporter["opset"]))
    out.print(styled("parity on {} images of {} (batch sizes {}): top-1 agreement {}, max |difference| {} "
                     "(limit {}){}", p["images"], p["folder"], ", ".join(map(str, p["batch_sizes"])),
                     f"{p['top1_agreement']:.3f}", f"{p['max_abs_diff']:.2e}", f"{p['tolerance']:g}",
                     f", {p['skipped']} unreadable skipped" if p["skipped"] else ""))
    out.print(styled("input uint8 (N, {}, {}, 3); outputs {} -> [bold]{}[/bold]", res.input_size, res.input_size,
                     ", ".join(res.outputs), res.output))
