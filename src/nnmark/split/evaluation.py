"""The privacy evaluation of a finished partitioned run: every attacker against the owners' images.

:func:`privacy_report` trains each learning attacker of :mod:`nnmark.split.attackers` on the public
``attacker`` split as the server would (through the final local part, with the owners' noise when they add
noise), reconstructs the first ``n_targets`` of the owners' training images from their activations, and
scores the reconstructions (:mod:`nnmark.split.metrics`): MSE, SSIM (skimage's uniform 7x7 window and the
Gaussian one), the judge's perceptual distance and reprint accuracy. Beside them: the floors of
:func:`~nnmark.split.metrics.floor_scores` -- the mean public image (an attacker that learns nothing), the
*label floor* (the class template of the label the server receives with every activation) and the
*predicted-label floor* (the template of the class the server part predicts) -- and, optionally, label-aware
attackers (the same decoders reading the activations and the label) and the UnSplit inversion.

``best`` is the learning attacker with the highest SSIM (activations only, as in every earlier table);
``best_with_labels`` is the best of everything a server that holds the labels can output: the learning
attackers, the label-aware ones and the label floor's templates.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nnmark.split.attackers import (
    AttackConfig,
    append_labels,
    attacker_table,
    reconstruct,
    train_attacker,
    unsplit_attack,
)
from nnmark.split.baselines import NOISES, add_noise
from nnmark.split.metrics import floor_scores, judge_for, mse, ssim
from nnmark.split.partition import split_model
from nnmark.split.protocol import SplitConfig, initial_model


def scores(x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, data: str, perceptual: bool = True
           ) -> dict[str, float]:
    """MSE, SSIM (both windows) and, with ``perceptual``, the judge's perceptual distance and reprint accuracy of
    reconstructions ``r``."""
    out = {"mse": mse(x, r), "ssim": ssim(x, r), "ssim_gaussian": ssim(x, r, gaussian=True)}
    if perceptual:
        judge = judge_for(data)
        out |= {"dpd": judge.distance(x, r), "reprint_accuracy": judge.reprint_accuracy(r, y)}
    return out


def data_floors(data: str, n_targets: int = 500) -> dict[str, Any]:
    """The floors (:func:`~nnmark.split.metrics.floor_scores`: mean image and label floor; no predicted-label
    floor, which needs a model) of the first ``n_targets`` owners' training images of dataset ``data`` -- the
    targets :func:`privacy_report` attacks."""
    from nnmark.split.datasets import load_split_data as load_splits

    s = load_splits(data)
    x, y = s.train.x[:n_targets], s.train.y[:n_targets]
    return floor_scores(x, s.attacker.x, y, s.attacker.y, s.num_classes)


def privacy_report(model: nn.Module, cfg: SplitConfig, attackers: list[str] | None = None, *,
                   n_targets: int = 500, attack: AttackConfig | None = None, unsplit: bool = False,
                   label_attackers: list[str] | None = None, perceptual: bool = True, seed: int = 0
                   ) -> dict[str, Any]:
    """Attack a finished run's model (module doc). ``attackers``: names from the attacker table of the cut's
    activations (default all); ``label_attackers``: names trained again as label-aware attackers (reported as
    ``"<name>+y"``); ``perceptual=False`` skips the judge (no DPD, no reprint accuracy). Returns
    ``{"attackers": {name: scores}, "best": ..., "best_with_labels": ..., "floor": ..., "predicted_accuracy": ...}``
    (``floor`` holds ``label`` and ``predicted_label``)."""
    from nnmark.split.datasets import load_split_data as load_splits

    splits = load_splits(cfg.data)
    local, remote = split_model(copy.deepcopy(model), cfg.at)
    local.eval()
    remote.eval()
    gen = torch.Generator().manual_seed(seed + 7)

    @torch.no_grad()
    def observe(x: torch.Tensor) -> torch.Tensor:
        h = local(x)
        return add_noise(h, cfg.defense, cfg.strength, gen) if cfg.defense in NOISES else h

    x_t, y_t = splits.train.x[:n_targets], splits.train.y[:n_targets]
    h_t = observe(x_t)
    with torch.no_grad():
        predicted = remote(h_t).argmax(1)
    k = splits.num_classes
    table = attacker_table(tuple(h_t.shape[1:]))
    names = attackers or list(table)
    out: dict[str, Any] = {"attackers": {},
                           "floor": floor_scores(x_t, splits.attacker.x, y_t, splits.attacker.y, k, predicted),
                           "predicted_accuracy": float((predicted == y_t).float().mean()),
                           "n_targets": int(x_t.shape[0])}
    if perceptual:
        out["judge_accuracy"] = judge_for(cfg.data).accuracy
    for name in names:
        dec = train_attacker(table.get(name, name), observe, splits.attacker.x, splits.image_shape, attack)
        out["attackers"][name] = scores(x_t, reconstruct(dec, h_t), y_t, cfg.data, perceptual)
    for name in label_attackers or []:
        dec = train_attacker(table.get(name, name), observe, splits.attacker.x, splits.image_shape, attack,
                             splits.attacker.y, k)
        out["attackers"][f"{name}+y"] = scores(x_t, reconstruct(dec, append_labels(h_t, y_t, k)), y_t, cfg.data,
                                                  perceptual)
    if unsplit:
        def make_local(s: int) -> nn.Module:
            fresh = initial_model(SplitConfig.from_dict({**cfg.to_dict(), "seed": 1000 + s}), splits.image_shape,
                                  splits.num_classes)
            part = split_model(fresh, cfg.at)[0]
            part.eval()
            return part

        n = min(64, x_t.shape[0])
        r = unsplit_attack(make_local, h_t[:n], splits.image_shape, seed=seed)
        out["attackers"]["unsplit"] = scores(x_t[:n], r, y_t[:n], cfg.data, perceptual)
    learned = {k: v for k, v in out["attackers"].items() if k != "unsplit" and not k.endswith("+y")}
    if learned:
        best = max(learned, key=lambda k: learned[k]["ssim"])
        out["best"] = {"attacker": best, **learned[best]}
    candidates = {**{n: v for n, v in out["attackers"].items() if n != "unsplit"},
                  **{f"label {t}": v for t, v in out["floor"]["label"].items() if t != "best"}}
    top = max(candidates, key=lambda n: candidates[n]["ssim"])
    out["best_with_labels"] = {"attacker": top, "ssim": candidates[top]["ssim"], "mse": candidates[top]["mse"]}
    return out
