"""Settings for `featx finetune` and `featx scratch`: every default on one commented screen.

Precedence: these defaults < the keyword arguments / CLI flags given. A resumed run takes its settings from the
run folder's ``config.json`` (only the device may change), so that a resumed run is the run that was started.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional, Union

from ..features.sizing import parse_image_size
from ..devices import PRECISIONS
from ..errors import UsageError

AUGMENT_PRESETS = ("none", "light", "standard", "strong")
SMALL_DATA = 1000  # training images from which fine-tuning's phase 2 runs at the full --lr / --unfreeze
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Settings shared by the one training loop (finetune and scratch)."""

    epochs: int = 15  # total epochs over all phases; early stopping may end the run sooner
    batch_size: Optional[int] = None  # None: a per-command default (32 for finetune, auto for scratch)
    # None: the backbone's own input size / the architecture's default; "auto": that, unless the images are small,
    # then a smaller one (featx.features.sizing, the rule `featx extract --image-size auto` uses)
    image_size: Optional[Union[int, str]] = None
    lr: Optional[float] = None  # peak learning rate of the (last) phase; None: a per-command default
    optimizer: str = "adamw"  # adamw | sgd (SGD uses Nesterov momentum `momentum`)
    momentum: float = 0.9
    weight_decay: float = 0.01  # decoupled (AdamW); not applied to biases and norm layers
    warmup: float = 0.1  # fraction of each phase's steps spent warming the LR up linearly, then cosine to ~0
    label_smoothing: float = 0.1  # softer targets: better calibrated and more robust on small, noisy folders
    patience: int = 5  # early stopping: epochs without a better val accuracy (last phase only); 0 = off
    augment: str = "standard"  # none | light | standard | strong
    val_split: float = 0.2  # fraction held out (stratified, seeded) when the folder has no train/val split
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: Optional[int] = None  # DataLoader worker processes; None: min(8, CPU count - 1)
    # auto: fp32 on the CPU; on CUDA bf16 autocast where the GPU supports it, else fp16 with a gradient scaler
    # (featx.devices.resolve_precision); channels_last on CUDA whenever autocast runs. fp32 | bf16 | fp16 force one.
    precision: str = "auto"
    in_memory: Optional[bool] = None  # None: decode once into memory when the dataset fits; True/False: force
    memory_budget_gb: float = 2.0  # the "fits in memory" threshold for decoded uint8 pixels (on the device on GPU)
    runs_dir: str = "runs"  # run folders go to <runs_dir>/<finetune|scratch>/<name>
    name: Optional[str] = None  # run folder name; None: exp, exp2, exp3, ...
    exist_ok: bool = False  # allow writing into an existing --name folder (its files are replaced)
    resume: bool = False  # continue the run in --name (or the latest run) from its last checkpoint
    stop_after: Optional[int] = None  # stop (as if interrupted) after this epoch; for tests and time-boxed jobs
    # featx compare --shots: train on these training images only (relative paths; validation and test unchanged),
    # repeated so that each epoch holds at least fill_epoch images (as many steps per epoch as the full run)
    train_subset: Optional[list] = None
    fill_epoch: Optional[int] = None

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.image_size is not None:  # a number, or "auto": chosen from the images once they are known
            self.image_size = parse_image_size(self.image_size)
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.augment not in AUGMENT_PRESETS:
            raise UsageError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}, got {self.augment!r}")
        if not 0.0 <= self.val_split < 1.0:
            raise UsageError(f"--val-split must be in [0, 1), got {self.val_split}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.warmup < 1.0:
            raise UsageError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.fill_epoch is not None and self.fill_epoch < 1:
            raise UsageError(f"fill_epoch must be at least 1, got {self.fill_epoch}")
        if self.patience < 0:
            raise UsageError(f"--patience must be >= 0, got {self.patience}")
        if self.name is not None and (not self.name or "/" in self.name or "\\" in self.name or self.name in (".", "..")):
            raise UsageError(f"--name must be a plain folder name, got {self.name!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        if d.get("amp") is False and "precision" not in d:  # config.json of runs from before --precision
            d = {**d, "precision": "fp32"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **kw):
        unknown = set(kw) - {f.name for f in fields(self)}
        if unknown:
            raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        d = self.to_dict()
        d.update(kw)
        return type(self).from_dict(d)


@dataclass
class FinetuneConfig(TrainConfig):
    """Two-phase fine-tuning (fastai-style `fine_tune`): head on the frozen backbone, then unfreeze with lower LRs."""

    backbone: str = "efficientnet_lite0"
    weights: Optional[str] = None  # a local weights file (safetensors, or a weights-only torch file)
    pretrained: bool = True  # False: random init (the recipe still runs; accuracy on small data will be poor)
    epochs: int = 15
    head_epochs: int = 3  # phase 1 (frozen backbone); capped at a third of --epochs so short runs still fine-tune
    head_lr: float = 3e-3  # phase 1 LR: only a fresh linear layer learns, so it can take a large step
    lr: Optional[float] = 1e-3  # phase 2 peak LR for the head; layer groups below get lr * layer_decay**depth
    # "all" unfreezes every layer group: on small nets (EfficientNet-Lite, ResNet-18) with layer-wise decay this
    # beat unfreezing only the top blocks in fastai's and timm's small-data recipes; use N to unfreeze the top N.
    unfreeze: Union[int, str] = "all"
    layer_decay: float = 0.7  # LR multiplier per layer group going down (top group 0.7x, next 0.49x, ...)
    # Below SMALL_DATA training images a pretrained backbone's phase 2 is scaled down by f = sqrt(n / SMALL_DATA):
    # lr * f, and the top floor(groups * f) (>= 1) of the groups --unfreeze allows. On the bundled 48-photo folder
    # (32 train) the unscaled phase 2 fell from the head phase's 0.94 to 0.56 val accuracy; scaled, it held 0.94
    # while its val loss kept falling (BENCHMARKS.md). False: --lr and --unfreeze apply as given.
    scale_to_data: bool = True
    # Update BatchNorm running statistics in phase 2? None: only for a random-init backbone. With pretrained
    # weights the ImageNet statistics are kept (BN scale/shift still learn): re-estimating them from a few
    # hundred images in batches of 32 made validation accuracy collapse in our small-data runs, while train
    # loss kept falling (the Keras transfer-learning guide gives the same advice).
    train_bn_stats: Optional[bool] = None
    batch_size: Optional[int] = 32  # small folders: more, noisier steps generalise better than few large ones

    def check(self) -> None:
        super().check()
        if isinstance(self.unfreeze, str) and self.unfreeze != "all":
            try:
                self.unfreeze = int(self.unfreeze)
            except ValueError:
                raise UsageError(f"--unfreeze must be a number of layer groups or 'all', got {self.unfreeze!r}") from None
        if isinstance(self.unfreeze, int) and self.unfreeze < 0:
            raise UsageError(f"--unfreeze must be >= 0, got {self.unfreeze}")
        if self.head_epochs < 0:
            raise UsageError(f"head epochs must be >= 0, got {self.head_epochs}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"layer decay must be in (0, 1], got {self.layer_decay}")


@dataclass
class ScratchConfig(TrainConfig):
    """A small CNN trained from random init; fast when the decoded images fit in memory (airbench-style)."""

    arch: str = "lenet5"
    epochs: int = 30  # small nets on small data need more passes than fine-tuning; early stopping trims
    patience: int = 10
    lr: Optional[float] = 3e-3  # AdamW peak LR; a warm-up + cosine schedule makes it safe without tuning
    weight_decay: float = 0.05
    # standard = random crop with padding + horizontal flip (on the device). Use "light" (crop only) for
    # images whose meaning changes when mirrored: digits, text, road signs.
    augment: str = "standard"
    batch_size: Optional[int] = None  # None: about n_train/16, a power of two in [32, 512]

    def check(self) -> None:
        super().check()
        if self.augment == "strong":
            # on-device augmentation has crop + flip only; say so rather than silently training weaker
            raise UsageError("scratch supports --augment none|light|standard (strong is for finetune)")

