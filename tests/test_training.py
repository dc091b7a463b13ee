"""The shared training loop's pieces: LR schedule, on-device augmentation, splits, zoo, run folders, checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from featx.errors import ArtifactError, DataError, UsageError
from featx.training import checkpoint, zoo
from featx.data.augment import device_augment
from featx.data.split import split_records as make_split
from featx.training.optim import make_optimizer, make_scheduler, param_groups
from featx.training.runs import resolve_run_dir


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lr_factors(total: int, warmup: float) -> list:
    """The learning rate before each optimizer step of a phase, as a fraction of the peak (timm's scheduler)."""
    opt = make_optimizer(param_groups([torch.nn.Linear(2, 2)], 0.0), "adamw", 1.0, 0.0, 0.9)
    sched = make_scheduler(opt, total, warmup, 1.0)
    out = []
    for step in range(total):
        sched.step_update(step + 1)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_lr_schedule_warms_up_then_decays_to_one_percent():
    total = 100
    f = lr_factors(total, 0.1)
    assert f[0] == pytest.approx(0.1)  # first of 10 warm-up steps
    assert f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone cosine decay after the warm-up
    assert f[-1] == pytest.approx(0.01)
    assert lr_factors(1, 0.0) == [pytest.approx(0.01)]  # a single step without warm-up is the end of the cosine


def test_device_augment_crops_and_flips_without_inventing_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 16, 16)
    assert torch.equal(device_augment(x, "none", g), x)
    out = device_augment(x.repeat(64, 1, 1, 1), "standard", g)
    assert out.shape == (128, 3, 16, 16) and out.dtype == torch.uint8
    assert not torch.equal(out[:2], x)  # something moved
    # a crop of the reflect-padded image keeps most of the original pixels in a shifted window
    shifted = [any(torch.equal(o[:, 2:-2, 2:-2], src[:, 2 + dy:14 + dy, 2 + dx:14 + dx])
                   or torch.equal(o.flip(2)[:, 2:-2, 2:-2], src[:, 2 + dy:14 + dy, 2 + dx:14 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))
               for o, src in zip(out[:8], x.repeat(4, 1, 1, 1))]
    assert all(shifted)
    light = device_augment(x.repeat(64, 1, 1, 1), "light", torch.Generator().manual_seed(1))
    assert light.shape == out.shape


def _records(n_per_class, classes=("a", "b", "c"), split=None):
    return [SimpleNamespace(path=Path(f"{c}/{i}.png"), relpath=f"{c}/{i}.png", label=c, split=split)
            for c in classes for i in range(n_per_class)]


def test_stratified_split_is_seeded_and_keeps_every_class():
    folder = SimpleNamespace(root=Path("x"), records=_records(10), classes=["a", "b", "c"], has_splits=False)
    s1 = make_split(folder, 0.2, seed=0)
    s2 = make_split(folder, 0.2, seed=0)
    s3 = make_split(folder, 0.2, seed=1)
    assert [r.relpath for r in s1.val] == [r.relpath for r in s2.val]
    assert [r.relpath for r in s1.val] != [r.relpath for r in s3.val]
    assert sorted(r.label for r in s1.val) == ["a", "a", "b", "b", "c", "c"]
    assert not {r.relpath for r in s1.val} & {r.relpath for r in s1.train}
    assert s1.classes == ["a", "b", "c"]


def test_split_uses_folders_and_refuses_one_class():
    recs = _records(3, split="train") + _records(2, split="val")
    s = make_split(SimpleNamespace(root=Path("x"), records=recs, classes=["a", "b", "c"], has_splits=True), 0.2, 0)
    assert (len(s.train), len(s.val), s.source) == (9, 6, "folders")
    one = SimpleNamespace(root=Path("x"), records=_records(4, classes=("a",)), classes=["a"], has_splits=False)
    with pytest.raises(DataError, match="at least 2 classes"):
        make_split(one, 0.2, 0)
    unlabeled = SimpleNamespace(root=Path("x"), records=[SimpleNamespace(path="p", relpath="p", label=None, split=None)],
                                classes=[], has_splits=False)
    with pytest.raises(DataError, match="no labelled images"):
        make_split(unlabeled, 0.2, 0)


@pytest.mark.parametrize("name", zoo.list_archs())
def test_zoo_nets_run_at_their_default_size_and_others(name):
    arch = zoo.get_arch(name)
    for size in (arch.image_size, 48):
        m = zoo.build(name, 5, size)
        assert m(torch.zeros(2, 3, size, size)).shape == (2, 5)


def test_unknown_arch_suggests_a_close_name():
    with pytest.raises(UsageError, match="did you mean lenet5"):
        zoo.get_arch("lenet")


def test_run_dirs_increment_and_refuse_reuse(tmp_path):
    a, _ = resolve_run_dir(tmp_path, "scratch")
    b, _ = resolve_run_dir(tmp_path, "scratch")
    assert (a.name, b.name) == ("exp", "exp2")
    named, _ = resolve_run_dir(tmp_path, "scratch", "mine")
    (named / "metrics.csv").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        resolve_run_dir(tmp_path, "scratch", "mine")
    assert resolve_run_dir(tmp_path, "scratch", "mine", exist_ok=True)[0] == named
    with pytest.raises(UsageError, match="no resumable run"):
        resolve_run_dir(tmp_path, "finetune", resume=True)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    checkpoint.save_resume(tmp_path / "resume.safetensors", model, opt, {"epoch": 3, "best": {"accuracy": 0.5}})
    loop, sd = checkpoint.load_resume(tmp_path / "resume.safetensors")
    assert loop == {"epoch": 3, "best": {"accuracy": 0.5}}
    assert "state.weight.exp_avg" in sd  # keyed by parameter name, not by position in the optimizer
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    checkpoint.restore_optimizer(model, opt2, sd)  # the model still holds gradients: they must not block the load
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][k], opt.state_dict()["state"][0][k])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_load_model_rejects_garbage_and_tampering(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="model.json is missing"):
        checkpoint.load_model(tmp_path)
    model = zoo.build("lenet5", 2)
    checkpoint.save_weights(tmp_path / "best.safetensors", model.state_dict())
    from featx.data.preprocess import Preprocess

    checkpoint.write_model_json(tmp_path, {"kind": "scratch", "arch": "lenet5", "image_size": 32, "classes": ["x", "y"],
                                           "preprocess": Preprocess(32, 32).to_dict(), "best": {}})
    tm = checkpoint.load_model(tmp_path)
    assert tm.classes == ["x", "y"] and not tm.model.training
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    assert tm.predict_uint8(x).sum().item() == pytest.approx(1.0)
    (tmp_path / "best.safetensors").write_bytes((tmp_path / "best.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="SHA-256"):
        checkpoint.load_model(tmp_path)
    (tmp_path / "best.safetensors").write_bytes(b"not safetensors")
    doc = json.loads((tmp_path / "model.json").read_text())
    doc["weights"]["sha256"] = None
    (tmp_path / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        checkpoint.load_model(tmp_path)
    # a pickle named .safetensors is never unpickled
    import pickle

    (tmp_path / "best.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ArtifactError):
        checkpoint.load_model(tmp_path)


def test_run_folders_of_older_featx_still_load(tmp_path):
    """model.json and weights as featx wrote them before the written_by marks (no stamp, plain JSON)."""
    from safetensors.torch import save_file

    from featx._io import sha256_file
    from featx.data.preprocess import Preprocess

    model = zoo.build("lenet5", 2, 32)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "best.safetensors"),
              metadata={"epoch": "3"})
    doc = {"format": "featx.model", "format_version": 1, "kind": "scratch", "arch": "lenet5", "image_size": 32,
           "classes": ["x", "y"], "preprocess": Preprocess(32, 32).to_dict(), "best": {"accuracy": 0.5, "epoch": 3},
           "num_classes": 2, "weights": {"file": "best.safetensors", "sha256": sha256_file(tmp_path / "best.safetensors")},
           "versions": {"featx": "0.1.0"}}
    (tmp_path / "model.json").write_text(json.dumps(doc))
    tm = checkpoint.load_model(tmp_path)
    assert tm.classes == ["x", "y"] and tm.kind == "scratch"
    assert tm.predict_uint8(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 2)
    # and a reused (--exist-ok) old folder counts as featx's own: its files may be replaced
    from featx._io import check_outputs
    from featx.training.runs import run_outputs

    (tmp_path / "config.json").write_text(json.dumps({"kind": "scratch", "epochs": 3}))
    (tmp_path / "report.md").write_text("# featx scratch: lenet5\n")
    check_outputs(run_outputs(tmp_path))
    assert checkpoint.safetensors_is_ours(tmp_path / "best.safetensors")
