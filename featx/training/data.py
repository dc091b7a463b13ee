"""Compatibility shim: the training input pipeline now lives in `featx.data` (one place for images in).

Old name -> new home: Split/make_split -> featx.data.split (split_records over plan_split); decode_all,
estimate_bytes, stack_uint8 -> featx.data.loader; TensorBatches, LoaderBatches, AugmentedBatches, channel_stats
-> featx.data.batches; train_transform, EvalCrop, device_augment -> featx.data.augment; default_workers ->
featx.devices. Import from there in new code.
"""
from __future__ import annotations

from ..data.augment import EvalCrop, device_augment, train_transform
from ..data.batches import AugmentedBatches, EpochSampler, LoaderBatches, TensorBatches, channel_stats
from ..data.datasets import DecodeDataset as _DecodeDataset
from ..data.datasets import LabelledDataset as _PilDataset
from ..data.datasets import collate_labelled as _filter_collate
from ..data.datasets import decode, shorter_side as _shorter_side
from ..data.loader import decode_all, estimate_bytes, stack_uint8
from ..data.split import VAL_NAMES, Split
from ..data.split import split_records as make_split
from ..devices import default_workers

__all__ = ["AugmentedBatches", "EpochSampler", "EvalCrop", "LoaderBatches", "Split", "TensorBatches", "VAL_NAMES",
           "channel_stats", "decode", "decode_all", "default_workers", "device_augment", "estimate_bytes",
           "make_split", "stack_uint8", "train_transform", "_DecodeDataset", "_PilDataset", "_filter_collate",
           "_shorter_side"]
