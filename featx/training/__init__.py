"""One training loop for `featx finetune` and `featx scratch`, the small CNN zoo, run folders and checkpoints.

    import featx
    res = featx.finetune("efficientnet_lite0", "data/", epochs=10)       # -> TrainResult (res.run_dir, res.best)
    res = featx.train_scratch("data/", arch="lenet5", image_size=32)
    tm = featx.load_model(res.run_dir)                                  # -> TrainedModel (.model, .preprocess, .classes)
"""
from __future__ import annotations

from .checkpoint import TrainedModel, load_model
from .config import FinetuneConfig, ScratchConfig, TrainConfig
from .finetune import finetune
from .loop import TrainResult
from .scratch import train_scratch
from .zoo import list_archs

__all__ = ["finetune", "train_scratch", "load_model", "TrainedModel", "TrainResult", "FinetuneConfig",
           "ScratchConfig", "TrainConfig", "list_archs"]
