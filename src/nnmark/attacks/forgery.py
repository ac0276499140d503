"""Ambiguity (forgery) attacks: without the owner's key, find a key that "verifies" on the owner's model.

These are not removal attacks (they return p-values, not models). The attacker holds the owner's model
and its own data, never the key.

- :func:`key_search` (white-box marks): try ``tries`` fresh keys with the scheme's own construction --
  each a new random projection matrix and a new message, both derived from the key -- and keep the
  smallest p-value the owner's model gives. Under the scheme's null every try's p-value is (discretely)
  uniform, so the search reaches about ``1 / tries``: a forger needs ``~1 / alpha`` tries to claim a model at
  ``alpha`` (``1e6`` at nnmark's default) and cannot fit the message, which comes from the key. Wang's
  schemes are the exception: their secret network is trained after the host (it is key material, not
  derived from the key), so a forger trains it on the owner's model and the raw statistic claims it -- only
  the commitment rule refuses such a key (``tests/test_forgery.py``).
- :func:`adversarial_trigger_forgery` (trigger sets): the model's own adversarial examples as a trigger
  set (the weakness Zhang et al. point out in frontier stitching): attacker images pushed by targeted PGD
  (L-infinity ``eps``) to labels of the forger's choosing. The owner's model answers them as the forger
  says, so the raw statistic claims it at any level; what refuses the claim is the commitment rule -- a
  key committed after the model existed is no evidence (:mod:`nnmark.commitment`) -- and, measured beside
  it, how far such a trigger set transfers to independently trained models (it should not claim them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.keys import Key


def key_search(scheme: str, model: nn.Module, tries: int, *, seed: int = 0, fit_steps: int = 40,
               **params: Any) -> dict[str, Any]:
    """``tries`` fresh keys (from ``seed``) of white-box ``scheme`` built for ``model`` with ``params`` and
    verified on it in memory (alignment off: a fresh key has no reference). Wang's schemes carry a secret
    network, which the forger trains on ``model``'s own carrier (``fit_steps`` steps; MANU with every weight
    selected), as the scheme's own finalisation does. Returns ``{"p_values": [...], "min_p": ..., "tries": ...,
    "share_below": {0.05: ..., 0.01: ..., 0.001: ...}}``."""
    import torch

    from nnmark.components import get_component

    cls = get_component("scheme", scheme).load()
    ps = []
    for i in range(int(tries)):
        s = cls.create(Key.from_seed(f"nnmark-forger-{scheme}-{seed}-{i}"), model, **params)
        if scheme.startswith("wang"):
            if scheme == "wang-manu":
                s.select(torch.arange(s.width))
            s.training_hook().finalize(model, steps=fit_steps)  # the secret network fitted to this model
        ps.append(float(s.verify(model, align=False).p_value))
    arr = np.asarray(ps)
    return {"p_values": ps, "min_p": float(arr.min()), "tries": int(tries),
            "share_below": {str(a): float((arr < a).mean()) for a in (0.05, 0.01, 0.001)}}


def targeted_pgd(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float = 0.1, steps: int = 20,
                 step_size: float | None = None) -> torch.Tensor:
    """Targeted L-infinity PGD: ``x`` ``(N, C, H, W)`` moved at most ``eps`` per pixel (within [0, 1]) towards
    being classified as ``labels`` ``(N,)`` by ``model`` (eval mode). Returns the adversarial images."""
    step_size = step_size if step_size is not None else 2.5 * eps / max(1, steps)
    was = model.training
    model.eval()
    adv = x.clone().detach()
    try:
        for _ in range(int(steps)):
            adv.requires_grad_(True)
            loss = F.cross_entropy(model(adv), labels)
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv - step_size * grad.sign()
                adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
            adv = adv.detach()
    finally:
        model.train(was)
    return adv


def adversarial_trigger_forgery(model: nn.Module, images: torch.Tensor, num_classes: int, *, eps: float = 0.1,
                                steps: int = 20, seed: int = 0) -> Any:
    """A :class:`~nnmark.schemes.TriggerSetWatermark` under a fresh forger's key whose trigger images are
    ``model``'s own targeted adversarial examples of ``images`` (labels: the forger's key's uniform labels,
    each differing from the model's clean answer). Never committed: it exists after the model."""
    from nnmark.schemes import TriggerSetWatermark

    key = Key.from_seed(f"nnmark-forger-trigger-{seed}")
    rng = key.numpy_rng("forgery/labels")
    with torch.no_grad():
        clean = model.eval()(images).argmax(1).numpy()
    shift = rng.integers(1, num_classes, size=len(images))
    labels = torch.as_tensor((clean + shift) % num_classes, dtype=torch.long)
    adv = targeted_pgd(model, images, labels, eps=eps, steps=steps)
    return TriggerSetWatermark(key, adv, labels, num_classes, generator="unrelated", label_mode="keyed",
                               null_rate=1.0 / (num_classes - 1))


def uniformity(p_values: list[float]) -> float:
    """Kolmogorov-Smirnov p-value of ``p_values`` against the uniform distribution on [0, 1] (nulls that hold
    give uniform p-values; a search that games them does not)."""
    from scipy.stats import kstest

    return float(kstest(np.asarray(p_values, dtype=float), "uniform").pvalue)
