"""Issue 22.10 (all but the case-twin classes): messages name only options their command has; `--cv` is 0 (off) or
>= 2 folds, 1 refused; audit warns that its label-issue list is meaningless at chance-level CV accuracy."""
from __future__ import annotations

import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from featx.cli.app import app
from featx.errors import Interrupted, UsageError
from featx.features.store import FeatureSet
from tests.imagegen import make_folder

runner = CliRunner()
META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 64}


def options_of(command: str) -> set:
    cmd = typer.main.get_command(app).commands[command]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}


def named_options(text: str) -> set:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))


def assert_words_exist(command: str, text: str) -> None:
    extra = named_options(text) - options_of(command)
    assert not extra, f"`featx {command}` message names {sorted(extra)}, which it does not have: {text}"


ARGS = {"scratch": lambda im: [str(im)],
        "finetune": lambda im: ["timm/test_resnet", str(im), "--no-pretrained"],
        "compare": lambda im: [str(im), "--skip-heads", "--skip-finetune", "--arch", "lenet5"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("w") / "imgs", classes=("a", "b"), n_per_class=4, splits=None, size=24)


# -- options named in messages ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["scratch", "finetune", "compare"])
def test_an_existing_run_folder_message_names_only_real_options(images, tmp_path, command):
    run = tmp_path / command / "x"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine\n")
    r = runner.invoke(app, [command, *ARGS[command](images), "--runs-dir", str(tmp_path), "--name", "x",
                            "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "already exists" in r.output and "--overwrite" in r.output
    assert_words_exist(command, r.output)
    assert (run / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("command", ["scratch", "finetune", "compare"])
def test_a_foreign_file_in_a_reused_run_folder_names_only_real_options(images, tmp_path, command):
    run = tmp_path / command / "x"
    run.mkdir(parents=True)
    (run / "report.md").write_text("my own notes\n")
    r = runner.invoke(app, [command, *ARGS[command](images), "--runs-dir", str(tmp_path), "--name", "x", "--exist-ok",
                            "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert "report.md exists and was not written by featx" in " ".join(r.output.split())
    assert_words_exist(command, r.output)
    assert (run / "report.md").read_text() == "my own notes\n"


def test_an_interrupted_compare_does_not_suggest_resume(images, tmp_path, one_torch_thread):
    """compare cannot resume: Ctrl-C inside its scratch run must not say `--resume` (scratch's own words)."""
    from featx.comparison import compare

    def stop(row):  # after epoch 2: epoch 1 is saved, so scratch's own hint would say "--resume"
        if row["epoch"] >= 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as e:
        compare(images, skip_heads=True, skip_finetune=True, archs=("lenet5",), scratch_epochs=3, device="cpu",
                workers=0, runs_dir=str(tmp_path), name="c", on_epoch=stop)
    msg = str(e.value)
    assert msg.startswith("stopped by Ctrl-C;") and e.value.exit_code == 130, msg
    assert_words_exist("compare", msg)
    assert "re-run" in msg


# -- --cv ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:200], y[:200]
    d = tmp_path_factory.mktemp("cv")
    FeatureSet(X, [f"{i}.png" for i in range(len(X))], labels=np.array([f"d{v}" for v in y]),
               classes=sorted({f"d{v}" for v in y}), meta=META).save(d / "f.npz")
    return d / "f.npz"


@pytest.mark.parametrize("cv", [1, -1])
def test_cv_below_two_folds_is_refused_with_a_hint(feats, cv):
    from featx.heads import fit_head

    with pytest.raises(UsageError, match=r"--cv must be 0 \(off\) or a number of folds >= 2"):
        fit_head(feats, "logistic", cv=cv)
    r = runner.invoke(app, ["fit", str(feats), "--cv", str(cv), "--json"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and f"got {cv}" in r.output


def test_cv_zero_is_off_and_two_is_two_folds(feats):
    from featx.heads import fit_head

    assert fit_head(feats, "logistic", cv=0).cv is None
    assert fit_head(feats, "logistic", cv=2).cv["folds"] == 2


# -- audit at chance level ---------------------------------------------------------------------------------------------
def _random_store(n=300, seed=0) -> FeatureSet:
    """Random features, labels unrelated to them (70 % one class): a head cannot beat the majority rate."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < 0.7, "ant", "bee")
    return FeatureSet(rng.standard_normal((n, 32)).astype(np.float32), [f"{i}.png" for i in range(n)],
                      labels=labels, classes=["ant", "bee"], meta=META)


def test_audit_warns_that_label_issues_are_meaningless_at_chance_level(tmp_path):
    from featx.audit import audit

    fs = _random_store()
    fs.save(tmp_path / "f.npz")
    res = audit(tmp_path / "f.npz", report_dir=tmp_path / "rep", checks=["labels"])
    lab = res.info["labels"]
    assert lab["chance_level"] is True and lab["majority_rate"] == pytest.approx((fs.labels == "ant").mean(), abs=1e-4)
    assert any("chance level" in n for n in res.info["notes"])
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "chance level" in md and "meaningless" in md
    r = runner.invoke(app, ["audit", str(tmp_path / "f.npz"), "--checks", "labels", "--no-report"])
    assert r.exit_code == 0, r.output
    assert "Warning:" in r.output and "chance level" in " ".join(r.output.split())


def test_audit_gives_no_chance_warning_when_the_head_learns(tmp_path):
    from sklearn.datasets import load_digits

    from featx.audit import audit

    X, y = load_digits(return_X_y=True)
    fs = FeatureSet(X[:300].astype(np.float32), [f"{i}.png" for i in range(300)],
                    labels=np.array([f"d{v}" for v in y[:300]]), classes=sorted({f"d{v}" for v in y}), meta=META)
    res = audit(fs, report_dir=False, checks=["labels"])
    assert res.info["labels"]["chance_level"] is False
    assert not any("chance level" in n for n in res.info["notes"])
