"""Training for `featx finetune` and `featx scratch`: one Trainer with callbacks, two recipes that configure it,
the small CNN zoo, run folders and checkpoints.

    import featx
    res = featx.finetune("efficientnet_lite0", "data/", epochs=10)       # -> TrainResult (res.run_dir, res.best)
    res = featx.train_scratch("data/", arch="lenet5", image_size=32)
    tm = featx.load_model(res.run_dir)                                  # -> TrainedModel (.model, .preprocess, .classes)

Both print one progress line per epoch to stderr; pass ``verbose=False`` for silence, or ``log=`` / ``on_epoch=``
to receive the messages and per-epoch rows yourself.
"""
from __future__ import annotations

from .checkpoint import TrainedModel, load_model
from .config import FinetuneConfig, ScratchConfig, TrainConfig
from .finetune import finetune
from .result import TrainResult
from .scratch import train_scratch
from .trainer import Callback, Phase, Trainer
from .zoo import list_archs

__all__ = ["finetune", "train_scratch", "load_model", "TrainedModel", "TrainResult", "FinetuneConfig",
           "ScratchConfig", "TrainConfig", "Trainer", "Callback", "Phase", "list_archs"]
