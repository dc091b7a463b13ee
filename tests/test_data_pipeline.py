"""featx.data as the one input pipeline: the loader factory's worker policy, samplers, and the split over records."""
from __future__ import annotations

import ctypes
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from featx.data.batches import EpochSampler, TensorBatches, train_sampler, val_indices
from featx.data.loader import make_loader
from featx.data.split import split_records
from featx.devices import Dist, default_workers


class _WorkerFacts(torch.utils.data.Dataset):
    """Each item reports what the worker process was set up with."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        return {"pdeathsig": sig.value, "threads": torch.get_num_threads(),
                "worker": torch.utils.data.get_worker_info() is not None}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_loader_workers_die_with_their_parent_and_use_one_thread():
    facts = list(make_loader(_WorkerFacts(), workers=1, batch_size=None, collate_fn=lambda x: x))
    assert facts == [{"pdeathsig": int(signal.SIGKILL), "threads": 1, "worker": True}] * 2


def test_loader_defaults_and_tensor_sharing():
    assert make_loader(_WorkerFacts()).num_workers == default_workers(None)
    assert make_loader(_WorkerFacts(), workers=0).num_workers == 0
    make_loader(_WorkerFacts(), workers=1, returns_tensors=True)
    assert torch.multiprocessing.get_sharing_strategy() == "file_system"  # no fd passing ("Bad file descriptor")


def test_training_order_is_torch_distributed_sampler_equal_shards_every_image_at_most_once():
    ranks = [Dist(rank=r, world_size=2) for r in range(2)]
    shards = []
    for d in ranks:
        s = train_sampler(17, d, seed=3)
        s.set_epoch(1)
        shards.append(list(s))
    assert [len(x) for x in shards] == [8, 8] and not set(shards[0]) & set(shards[1])  # DDP: same step count
    again = train_sampler(17, ranks[0], seed=3)
    again.set_epoch(1)
    assert list(again) == shards[0]  # seeded
    again.set_epoch(2)
    assert list(again) != shards[0]  # reshuffled per epoch
    single = EpochSampler(17, True, Dist(), seed=0)
    assert sorted(i for i, _ in single) == list(range(17))  # one process: nothing dropped


def test_validation_shards_score_every_image_exactly_once():
    got = sorted(sum((val_indices(17, Dist(rank=r, world_size=3)) for r in range(3)), []))
    assert got == list(range(17))
    x, y = torch.zeros(17, 3, 4, 4, dtype=torch.uint8), torch.arange(17)
    seen = [int(i) for r in range(3)
            for _, _, idx in TensorBatches(x, y, 4, train=False, dist=Dist(rank=r, world_size=3)).epoch(0) for i in idx]
    assert sorted(seen) == list(range(17))


def _records(split, classes=("a", "b"), n=10):
    return [SimpleNamespace(path=Path(f"{split}/{c}/{i}.png"), relpath=f"{split}/{c}/{i}.png", label=c, split=split)
            for c in classes for i in range(n)]


def test_train_and_test_without_val_validate_on_a_holdout_of_train_and_score_test_at_the_end():
    folder = SimpleNamespace(root=Path("x"), records=_records("train") + _records("test", n=3), classes=["a", "b"],
                             has_splits=True)
    s = split_records(folder, 0.2, seed=0)
    assert len(s.test) == 6 and {r.split for r in s.test} == {"test"}
    assert {r.split for r in s.val} == {"train"} and len(s.val) == 4 and len(s.train) == 16
    assert not {r.relpath for r in s.val} & {r.relpath for r in s.train}
    assert "hold-out of 'train'" in s.source
    # the same images as featx.data.split.plan_split picks for fit
    from featx.data.split import plan_split

    plan = plan_split([r.relpath for r in folder.records], [r.label for r in folder.records],
                      [r.split for r in folder.records], val_fraction=0.2, seed=0)
    assert [r.relpath for r in s.val] == [folder.records[i].relpath for i in plan.val]
