"""Any featx model as one torch module for export: uint8 NHWC pixels in, scores (and optionally features) out.

The graph holds everything after the resize/crop: the uint8 -> float normalisation (the same arithmetic as
``Preprocess.normalize``), the network, and for a head its StandardScaler and linear map folded into one ``Linear``.
Head kinds export through :data:`HEAD_GRAPHS`: a kind is one function registered with ``@head_graph(kind)``, called
as ``build(head, logits)``, that returns a module from features (N, D) float32 to (N, C) in ``head.classes`` order:
with ``logits=False`` the scores of an uncalibrated head exactly as ``Head.predict_scores`` reports them, with
``logits=True`` the logits temperature scaling divides (``featx.heads.calibration.logits``: the decision function,
two classes as ``[-s, s]``, for heads that have one, else ``log(probabilities + 1e-12)``). :func:`head_scorer` adds
the temperature of a calibrated head: ``softmax(logits / T)``, as ``Head.predict_scores`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import ArtifactError, UsageError

# head kind -> builder(head, logits) -> features-to-scores (or -to-logits) module
HEAD_GRAPHS: dict = {}


def head_graph(*kinds: str) -> Callable:
    """Register a builder for the head kinds ``kinds``."""
    def register(fn):
        for kind in kinds:
            HEAD_GRAPHS[kind] = fn
        return fn
    return register


# -- heads ---------------------------------------------------------------------------------------------------------
class FoldedLinear(nn.Module):
    """``scores = out(x @ W.T + b)`` where W, b already include the head's standardisation.

    ``out``: ``softmax`` (multinomial logistic), ``sigmoid2`` (binary logistic: [1 - p, p], as sklearn's predict_proba),
    ``pm`` (binary decision score s reported as [-s, s], as ``Head.predict_scores``) or ``none`` (one score per class).
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, out: str):
        super().__init__()
        self.linear = _linear(weight, bias)
        self.out = out

    def forward(self, x):
        z = self.linear(x)
        if self.out == "softmax":
            return torch.softmax(z, dim=1)
        if self.out == "sigmoid2":
            p = torch.sigmoid(z[:, :1])
            return torch.cat([1.0 - p, p], dim=1)
        if self.out == "pm":
            return torch.cat([-z, z], dim=1)
        return z


def fold_scaler(pipeline) -> tuple:
    """(mean, scale) of the pipeline's StandardScaler steps composed (zeros/ones without one); refuses other steps."""
    from sklearn.preprocessing import StandardScaler

    steps = [est for _, est in pipeline.steps[:-1] if est not in (None, "passthrough")]
    if len(steps) > 1 or (steps and not isinstance(steps[0], StandardScaler)):
        names = ", ".join(type(s).__name__ for s in steps)
        raise ArtifactError(f"cannot fold the head's preprocessing steps ({names}) into a linear map")
    d = pipeline.n_features_in_
    if not steps:
        return np.zeros(d), np.ones(d)
    sc = steps[0]
    mean = sc.mean_ if sc.with_mean else np.zeros(d)
    scale = sc.scale_ if sc.with_std else np.ones(d)
    return np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """A float32 Linear holding ``weight`` (out, in) and ``bias`` (out,)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float32)))
        lin.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
    return lin


@head_graph("logistic", "svm", "linear")
def linear_head(head, logits: bool = False) -> nn.Module:
    """Logistic regression, linear SVM and ridge: ``clf(scaler(x))`` is ``x @ (coef / scale).T + b'``, one Linear.

    ``logits``: the decision function (``[-s, s]`` for two classes), which is what calibration divides by T for all
    three (each has ``decision_function``), instead of a logistic head's probabilities."""
    clf = head.pipeline.steps[-1][1]
    if not hasattr(clf, "coef_"):
        raise ArtifactError(f"{head.kind} head holds a {type(clf).__name__}, which has no linear map to export")
    mean, scale = fold_scaler(head.pipeline)
    coef = np.atleast_2d(np.asarray(clf.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(clf.intercept_, dtype=np.float64))
    # Folded in float64, then cast once: the ONNX graph does one matmul instead of subtract, divide, matmul.
    weight = coef / scale
    bias = intercept - weight @ mean
    binary = coef.shape[0] == 1
    if head.score_kind == "probability" and not logits:
        if getattr(clf, "multi_class", "auto") == "ovr" and not binary:  # pragma: no cover - sklearn < 1.7 heads
            raise ArtifactError("one-vs-rest logistic heads do not export; re-fit the head with this featx")
        out = "sigmoid2" if binary else "softmax"
    else:
        out = "pm" if binary else "none"
    return FoldedLinear(weight, bias, out)


class LogProbabilities(nn.Module):
    """``log(softmax(z) + eps)``: the logits calibration divides by T for heads without a decision function
    (``featx.heads.calibration.logits``), in the same arithmetic.

    Written literally on purpose: against float64 featx (``log(p + 1e-12)``, two-class p as MLPClassifier's
    ``[1 - sigmoid(z), sigmoid(z)]``) on random logits of scale 1-100, 2/3/10 classes, T 0.3-20, the calibrated
    probabilities differ by at most 5.4e-6 in float32 (CPU, 2026-11-30), the same as a ``logaddexp(log_softmax(z),
    log eps)`` form: ``softmax([0, z])`` keeps a small probability exact in float32, where ``1 - sigmoid(z)`` would
    round it to 0."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = float(eps)

    def forward(self, z):
        return torch.log(torch.softmax(z, dim=1) + self.eps)


class MLPScores(nn.Module):
    """``layers`` (Linear, activation, ..., Linear) then softmax, or ``LogProbabilities`` for calibration."""

    def __init__(self, layers: list, logits: bool):
        super().__init__()
        from ..heads.calibration import _EPS

        self.net = nn.Sequential(*layers)
        self.out = LogProbabilities(_EPS) if logits else nn.Softmax(dim=1)

    def forward(self, x):
        return self.out(self.net(x))


# sklearn.neural_network's hidden activations (ACTIVATIONS in sklearn/neural_network/_base.py) as torch modules
_MLP_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid, "identity": nn.Identity}


@head_graph("mlp")
def mlp_head(head, logits: bool = False) -> nn.Module:
    """The mlp head (``Pipeline(StandardScaler, MLPClassifier)``, attributes as featx/heads/mlp.py lists them): the
    scaler folded into the first Linear, the hidden activation, the output Linear, softmax over the classes.

    MLPClassifier stores two classes as one logistic output z (p = [1 - sigmoid(z), sigmoid(z)]); that is
    ``softmax([0, z])``, so the last Linear gets a zero row in front and every kind ends in the same softmax.
    ``logits``: ``log(p + 1e-12)``, what calibration divides by T (an MLPClassifier has no decision function)."""
    clf = head.pipeline.steps[-1][1]
    coefs, intercepts = getattr(clf, "coefs_", None), getattr(clf, "intercepts_", None)
    act = _MLP_ACTIVATIONS.get(getattr(clf, "activation", None))
    out_act = getattr(clf, "out_activation_", None)
    if not coefs or len(coefs) != len(intercepts or ()) or act is None or out_act not in ("softmax", "logistic"):
        raise ArtifactError(f"the {head.kind} head holds a {type(clf).__name__} featx cannot export (activation "
                            f"{getattr(clf, 'activation', None)!r}, output {out_act!r}); re-fit it with `featx fit`")
    coefs = [np.asarray(w, dtype=np.float64) for w in coefs]
    intercepts = [np.asarray(b, dtype=np.float64) for b in intercepts]
    if out_act == "logistic":
        if coefs[-1].shape[1] != 1 or len(head.classes) != 2:
            raise ArtifactError(f"the {head.kind} head is multi-label (logistic outputs), which featx does not export")
        coefs[-1] = np.hstack([np.zeros_like(coefs[-1]), coefs[-1]])
        intercepts[-1] = np.concatenate([[0.0], intercepts[-1]])
    mean, scale = fold_scaler(head.pipeline)
    # (x - mean) / scale @ W + b == x @ (W / scale[:, None]) + (b - (mean / scale) @ W), folded in float64
    w0 = coefs[0] / scale[:, None]
    layers = [_linear(w0.T, intercepts[0] - mean @ w0)]
    for w, b in zip(coefs[1:], intercepts[1:]):
        layers += [act(), _linear(w.T, b)]
    return MLPScores(layers, logits)


class TemperatureSoftmax(nn.Module):
    """``softmax(logits / T)``: a calibrated head's probabilities (featx.heads.calibration.probabilities)."""

    def __init__(self, logits: nn.Module, temperature: float):
        super().__init__()
        self.logits = logits
        self.temperature = float(temperature)

    def forward(self, x):
        return torch.softmax(self.logits(x) / self.temperature, dim=1)


def _temperature(head) -> float:
    """The temperature T of a calibrated head; ArtifactError (nothing exported) for a record featx did not write."""
    from ..heads.store import calibration_temperature

    return calibration_temperature(head.calibration, f"head {head.path}" if head.path else "the head")


def head_scorer(head) -> nn.Module:
    """The head's features -> scores module (calibrated heads: ``softmax(logits / T)``), or UsageError naming the
    head kinds that export."""
    build = HEAD_GRAPHS.get(head.kind)
    if build is None:
        kinds = ", ".join(sorted(HEAD_GRAPHS))
        raise UsageError(
            f"a {head.kind} head cannot be exported to ONNX: it is not a fixed torch graph (k-NN keeps every training "
            f"feature, an RBF-SVM sums over its support vectors). Heads that export (calibrated or not): {kinds}; "
            f"re-fit with `featx fit --head logistic` (or one of those), or export a fine-tuned run")
    if not head.calibration:
        return build(head, logits=False).eval()
    return TemperatureSoftmax(build(head, logits=True), _temperature(head)).eval()


# -- networks --------------------------------------------------------------------------------------------------------
class Capture(nn.Module):
    """Runs ``model`` and returns the activation at ``module``: its input (``use_input``) or output, pooled to (N, D)
    exactly as ``Backbone.forward_features`` pools it. Hooks trace into both ONNX exporters; the unused rest of the
    network is dropped from the exported graph."""

    def __init__(self, model: nn.Module, module: nn.Module, use_input: bool):
        super().__init__()
        self.model = model
        self._seen: dict = {}
        if use_input:
            self._handle = module.register_forward_pre_hook(lambda _m, args: self._seen.__setitem__("x", args[0]))
        else:
            self._handle = module.register_forward_hook(lambda _m, _a, out: self._seen.__setitem__("x", out))

    def remove(self) -> None:
        self._handle.remove()

    def forward(self, x):
        out = self.model(x)
        feats = self._seen.pop("x")
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if feats.ndim == 4:
            feats = feats.float().mean(dim=(2, 3))
        elif feats.ndim == 3:
            feats = feats.float().mean(dim=1)
        return out, feats.flatten(1).float()


class HeadBody(nn.Module):
    """Backbone features -> head scores."""

    def __init__(self, capture: Capture, scorer: nn.Module):
        super().__init__()
        self.capture = capture
        self.scorer = scorer

    def forward(self, x):
        _, feats = self.capture(x)
        return self.scorer(feats), feats


class TrainedBody(nn.Module):
    """A fine-tuned or scratch network: softmax of its logits (as predict reports them); features = the input of its
    last Linear layer (the classifier), captured only when asked for."""

    def __init__(self, model: nn.Module, capture: Optional[Capture]):
        super().__init__()
        self.model = model
        self.capture = capture

    def forward(self, x):
        if self.capture is None:
            return torch.softmax(self.model(x).float(), dim=1), None
        logits, feats = self.capture(x)
        return torch.softmax(logits.float(), dim=1), feats


class PixelGraph(nn.Module):
    """uint8 (N, S, S, 3) -> scores (N, C) [, features (N, D)]: the one graph that is exported."""

    def __init__(self, preprocess: Preprocess, body: nn.Module, with_features: bool):
        super().__init__()
        # Same constants and order of operations as Preprocess.normalize, so torch and ONNX see identical inputs.
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.body = body
        self.with_features = with_features

    def forward(self, pixels):
        x = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        scores, feats = self.body(x)
        return (scores, feats) if self.with_features else scores


@dataclass
class Exportable:
    """A graph ready for export plus what its metadata must say."""

    graph: PixelGraph
    preprocess: Preprocess
    classes: list
    score_kind: str  # "probability" | "decision" (as Head.score_kind / predict)
    kind: str  # "head" | "finetune" | "scratch"
    description: str
    provenance: dict
    reference: Callable  # uint8 NHWC torch batch -> (scores numpy N x C, features numpy or None): featx's own path
    captures: list
    calibration: Optional[dict] = None  # {"method": "temperature", "temperature": T} for a calibrated head

    def release(self) -> None:
        """Remove the forward hooks this export put on the model."""
        for c in self.captures:
            c.remove()
        self.captures = []


def _head_description(head, backbone: str) -> str:
    """``mlp head on efficientnet_lite0 features, calibrated (temperature 1.84)``."""
    how = f", calibrated (temperature {_temperature(head):.4g})" if head.calibration else ""
    return f"{head.kind} head on {backbone} features{how}"


def head_exportable(head, *, weights=None, with_features: bool = False) -> Exportable:
    """A head plus the backbone its provenance names (weights hash checked, preprocessing restored)."""
    from ..backbones import POOLED, backbone_from_meta

    scorer = head_scorer(head)  # refuse k-NN / RBF-SVM before building any network
    if not head.feature_meta.get("backbone"):
        raise ArtifactError(f"head {head.path or ''} records no backbone provenance; re-fit it with `featx fit`")
    bb = backbone_from_meta(head.feature_meta, weights=weights)
    head.check_compatible(bb.meta(), bb.feature_dim)
    bb.model.eval()
    if bb.layer == POOLED:
        capture = Capture(bb.model, bb.classifier(), use_input=True)
    else:
        capture = Capture(bb.model, bb.model.get_submodule(bb.layer), use_input=False)
    graph = PixelGraph(bb.preprocess, HeadBody(capture, scorer), with_features).eval()

    def reference(pixels: torch.Tensor):
        # featx's own predict path: normalise, Backbone.forward_features, then the sklearn pipeline.
        feats = bb.forward_features(bb.preprocess.normalize(pixels.permute(0, 3, 1, 2)).contiguous())
        capture._seen.clear()  # our hook saw that pass too; keep no tensor from it
        feats = feats.cpu().numpy()
        return head.predict_scores(feats)[0], feats

    return Exportable(graph=graph, preprocess=bb.preprocess, classes=list(head.classes), score_kind=head.score_kind,
                      kind="head", description=_head_description(head, bb.name),
                      provenance={"head": head.meta, "backbone": bb.meta()}, reference=reference, captures=[capture],
                      calibration={"method": "temperature", "temperature": _temperature(head)}
                      if head.calibration else None)


def trained_exportable(tm, *, with_features: bool = False) -> Exportable:
    """A fine-tuned or scratch network (``featx.training.TrainedModel``)."""
    model = tm.model.eval().cpu()
    capture = None
    if with_features:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UsageError(f"{tm.name} has no Linear classifier, so --with-features cannot tell its features")
        capture = Capture(model, linears[-1], use_input=True)
    graph = PixelGraph(tm.preprocess, TrainedBody(model, capture), with_features).eval()

    def reference(pixels: torch.Tensor):
        # featx's own predict path for trained models: TrainedModel.predict_uint8 on NCHW uint8.
        probs = tm.predict_uint8(pixels.permute(0, 3, 1, 2).contiguous()).cpu().numpy().astype(np.float64)
        feats = None
        if capture is not None:
            with torch.inference_mode():
                _, feats = capture(tm.preprocess.normalize(pixels.permute(0, 3, 1, 2)).contiguous())
            feats = feats.cpu().numpy()
        return probs, feats

    meta = {k: v for k, v in tm.meta.items() if k != "written_by"}
    return Exportable(graph=graph, preprocess=tm.preprocess, classes=[str(c) for c in tm.classes],
                      score_kind="probability", kind=tm.kind or "trained",
                      description=f"{tm.kind or 'trained'} model {tm.name}", provenance={"model": meta},
                      reference=reference, captures=[capture] if capture is not None else [])
