"""Issue black-box copies by a keyed linear tilt of the model's output layer (no training per copy).

Every copy answers the triggers through the logit difference ``d_i = z_b(x_i) - z_a(x_i)`` of its two keyed
labels. Here copy ``u`` is the base with its output layer (the last ``nn.Linear``, whose output must be the
model's output) moved by ``delta * sum_i s_ui G_i``, ``s_ui = +1`` where codeword bit ``i`` is 1 and ``-1``
where it is 0. The directions ``G`` ``(K (H + 1), m)`` (``K`` classes, ``H`` input features of the layer, its
bias) are solved once per product, in closed form, from the base's features ``f`` of the triggers and of the
vendor's clean training images:

    ``G = (A^T A + ridge Q)^-1 A^T``,

with ``A`` ``(m, K (H + 1))`` the map from a weight change to the triggers' logit differences
(``row i = (e_b_i - e_a_i) (x) [f_i, 1]``) and ``Q = I_K (x) C`` the clean images' second-moment matrix ``C`` of
``[f, 1]``: the change of the clean images' logits, ``||dW [f, 1]||^2`` averaged, is what ``ridge`` (default
1) trades against fitting ``A dW = delta s`` exactly. So a copy's triggers move by about ``+- delta`` in
``d`` (``A G`` is near the identity), the clean logits move as little as that allows, and no copy is trained.

Why: the output layer is linear in its weights, so a **weight average of copies** (the collusion the
fine-tuned copies of :mod:`nnmark.blackbox.issue` resist least) answers with exactly the average of its members'
tilts: ``d_i - d0_i = delta (A G mean_u s_u)_i`` -- the fraction of the coalition holding each bit, which the
Tardos score reads at its best. The fine-tuned copies lose most of it, because an average of networks is not
the average of their answers on memorised inputs (measured: the average of 3 fine-tuned copies keeps a
correlation of 0.7-0.8 with its members' mean logit difference, a third of its size).

Reading: the tracer subtracts the base's own logit differences ``d0`` on the triggers
(:attr:`nnmark.blackbox.product.BlackBoxProduct.reference`): soft answer weights ``tanh((d - d0) / (2 T))``.
``d0`` is fixed by the key and the base, so it is independent of every customer's codeword and the exact null
of :mod:`nnmark.blackbox.null` is untouched.

Limits (measured, ``experiments/results/blackbox/README.md``): the tilt lives in the scores, not in the arg-max
labels, so tracing needs an API that shows probabilities or logits; re-training the output layer (RTLL) or
fine-tuning all layers (FTAL) moves the base's logit differences by more than ``delta`` and removes it; weight
pruning keeps it. For label-only APIs and fine-tuning thieves, the fine-tuned copies
(``BlackBoxIssueConfig(method="finetune")``) remain the choice.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nnmark.blackbox.triggers import TriggerSet
from nnmark.errors import NNMarkError

MAX_SOLVE_DIM = 20_000  # K (H + 1) above this: the normal equations would not fit in memory
CLEAN_BATCH = 512


def output_layer(model: nn.Module, probe: torch.Tensor) -> tuple[str, nn.Linear]:
    """The model's output layer: its last ``nn.Linear`` module, checked on ``probe`` ``(N, C, H, W)`` to produce
    the model's output itself. Raises :class:`NNMarkError` when the output is anything else (a softmax, a
    normalisation or any layer after it)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NNMarkError("tilt issuing needs a model whose output comes from an nn.Linear layer; it has none "
                          "(issue with method='finetune')")
    name, layer = linears[-1]
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("out", out.detach()))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = model(probe)
        model.train(was)
    finally:
        hook.remove()
    if "out" not in seen or seen["out"].shape != out.shape or not torch.allclose(seen["out"], out, atol=1e-6):
        raise NNMarkError(f"tilt issuing needs the model's output to be its last Linear layer's ({name!r}); this "
                          "model transforms it further (issue with method='finetune')")
    return name, layer


def _features(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> np.ndarray:
    """Inputs of ``layer`` ``(N, H)`` float64 for images ``x``, in eval mode."""
    got: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda mod, inp, out: got.append(inp[0].detach().reshape(len(inp[0]), -1)))
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x), CLEAN_BATCH):
                model(x[i:i + CLEAN_BATCH])
        model.train(was)
    finally:
        hook.remove()
    return torch.cat(got).double().numpy()


@dataclass
class HeadTilt:
    """The solved tilt directions of one base model and trigger set (module doc).

    ``layer``: the output layer's module name; ``directions`` ``(K (H + 1), m)`` float64 (row-major over
    ``(class, feature)``, the bias last); ``response`` ``(m,)``: the diagonal of ``A G`` (how much of ``delta``
    each trigger gets); ``clean_rms``: the clean logits' RMS change per unit of ``delta`` for a random codeword;
    ``seconds``: solve time."""

    layer: str
    classes: int
    features: int
    directions: np.ndarray
    response: np.ndarray
    clean_rms: float
    seconds: float

    @classmethod
    def solve(cls, base: nn.Module, triggers: TriggerSet, clean_x: torch.Tensor, ridge: float = 1.0) -> HeadTilt:
        """Solve ``G`` for ``base`` (left untouched), its ``triggers`` and the vendor's clean images ``clean_x``
        ``(N, C, H, W)`` (module doc; ``ridge > 0``)."""
        if not ridge > 0:
            raise NNMarkError("the tilt's ridge must be positive")
        start = time.perf_counter()
        name, layer = output_layer(base, clean_x[:2])
        if layer.bias is None:
            raise NNMarkError(f"tilt issuing needs the output layer {name!r} to have a bias")
        k, h1 = int(layer.out_features), int(layer.in_features) + 1
        if k * h1 > MAX_SOLVE_DIM:
            raise NNMarkError(f"the output layer has {k} x {h1 - 1} weights: too many for the tilt's closed form "
                              f"(at most {MAX_SOLVE_DIM}); issue with method='finetune'")
        if int(triggers.a.max()) >= k or int(triggers.b.max()) >= k:
            raise NNMarkError("the triggers' labels exceed the model's classes")
        fc = _features(base, layer, clean_x)
        ft = _features(base, layer, triggers.x)
        fc1, ft1 = np.c_[fc, np.ones(len(fc))], np.c_[ft, np.ones(len(ft))]
        c = fc1.T @ fc1 / len(fc1)
        c += 1e-6 * np.trace(c) / h1 * np.eye(h1)
        m = triggers.m
        a_mat = np.zeros((m, k * h1))
        rows = np.arange(m)
        for lab, sign in ((triggers.b, 1.0), (triggers.a, -1.0)):
            for j in range(h1):
                a_mat[rows, lab * h1 + j] += sign * ft1[:, j]
        q = np.kron(np.eye(k), c)
        g = np.linalg.solve(a_mat.T @ a_mat + ridge * q, a_mat.T)
        resp = np.einsum("ij,ji->i", a_mat, g)
        s = np.random.default_rng(0).choice([-1.0, 1.0], size=m)
        dw = (g @ s).reshape(k, h1)
        clean_rms = float(np.sqrt(np.mean((fc1 @ dw.T) ** 2)))
        return cls(name, k, h1 - 1, g, resp, clean_rms, time.perf_counter() - start)

    def weight_change(self, bits: np.ndarray, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dW (K, H), db (K,))`` float32 of codeword ``bits`` ``(m,)`` bool at tilt ``delta`` (logit units)."""
        s = np.where(np.asarray(bits, dtype=bool), 1.0, -1.0)
        if s.shape != (self.directions.shape[1],):
            raise NNMarkError(f"a codeword of {s.size} bits for {self.directions.shape[1]} triggers")
        dw = (float(delta) * (self.directions @ s)).reshape(self.classes, self.features + 1)
        return torch.from_numpy(dw[:, :-1]).float(), torch.from_numpy(dw[:, -1]).float()

    def apply(self, base: nn.Module, bits: np.ndarray, delta: float) -> nn.Module:
        """A copy of ``base`` (untouched) with its output layer tilted by codeword ``bits`` (eval mode)."""
        model = copy.deepcopy(base)
        layer = dict(model.named_modules()).get(self.layer)
        if not isinstance(layer, nn.Linear) or layer.out_features != self.classes or \
                layer.in_features != self.features:
            raise NNMarkError(f"the model has no output layer {self.layer!r} of {self.classes} x {self.features}")
        dw, db = self.weight_change(bits, delta)
        if layer.bias is None:
            raise NNMarkError("tilt issuing needs the output layer to have a bias")
        with torch.no_grad():
            layer.weight += dw.to(layer.weight.dtype)
            layer.bias += db.to(layer.bias.dtype)
        return model.eval()
