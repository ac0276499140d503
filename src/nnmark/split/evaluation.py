"""The privacy evaluation of a finished partitioned run: every attacker against the owners' images.

:func:`privacy_report` trains each learning attacker of :mod:`nnmark.split.attackers` on the public
``attacker`` split as the server would (through the final local part, with the owners' noise when they add
noise), reconstructs the first ``n_targets`` of the owners' training images from their activations, and
scores the reconstructions (:mod:`nnmark.split.metrics`): MSE, SSIM (skimage's uniform 7x7 window and the
Gaussian one), the judge's perceptual distance and reprint accuracy. Beside them: the *floor* (the mean
public image, what an attacker that learns nothing outputs) and, optionally, the UnSplit inversion.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from nnmark.split.attackers import AttackConfig, attacker_table, reconstruct, train_attacker, unsplit_attack
from nnmark.split.baselines import NOISES, add_noise
from nnmark.split.metrics import floor_scores, judge_for, mse, ssim
from nnmark.split.partition import split_model
from nnmark.split.protocol import SplitConfig, initial_model


def scores(x: torch.Tensor, r: torch.Tensor, y: torch.Tensor, data: str) -> dict[str, float]:
    """MSE, SSIM (both windows), perceptual distance and reprint accuracy of reconstructions ``r``."""
    judge = judge_for(data)
    return {"mse": mse(x, r), "ssim": ssim(x, r), "ssim_gaussian": ssim(x, r, gaussian=True),
            "dpd": judge.distance(x, r), "reprint_accuracy": judge.reprint_accuracy(r, y)}


def privacy_report(model: nn.Module, cfg: SplitConfig, attackers: list[str] | None = None, *,
                   n_targets: int = 500, attack: AttackConfig | None = None, unsplit: bool = False,
                   seed: int = 0) -> dict[str, Any]:
    """Attack a finished run's model (module doc). ``attackers``: names from the attacker table of the cut's
    activations (default all). Returns ``{"attackers": {name: scores}, "best": ..., "floor": ..., ...}``."""
    from nnmark.split.datasets import load_split_data as load_splits

    splits = load_splits(cfg.data)
    local, _ = split_model(copy.deepcopy(model), cfg.at)
    local.eval()
    gen = torch.Generator().manual_seed(seed + 7)

    @torch.no_grad()
    def observe(x: torch.Tensor) -> torch.Tensor:
        h = local(x)
        return add_noise(h, cfg.defense, cfg.strength, gen) if cfg.defense in NOISES else h

    x_t, y_t = splits.train.x[:n_targets], splits.train.y[:n_targets]
    h_t = observe(x_t)
    table = attacker_table(tuple(h_t.shape[1:]))
    names = attackers or list(table)
    out: dict[str, Any] = {"attackers": {}, "floor": floor_scores(x_t, splits.attacker.x),
                           "judge_accuracy": judge_for(cfg.data).accuracy, "n_targets": int(x_t.shape[0])}
    for name in names:
        dec = train_attacker(table.get(name, name), observe, splits.attacker.x, splits.image_shape, attack)
        out["attackers"][name] = scores(x_t, reconstruct(dec, h_t), y_t, cfg.data)
    if unsplit:
        def make_local(s: int) -> nn.Module:
            fresh = initial_model(SplitConfig.from_dict({**cfg.to_dict(), "seed": 1000 + s}), splits.image_shape,
                                  splits.num_classes)
            part = split_model(fresh, cfg.at)[0]
            part.eval()
            return part

        n = min(64, x_t.shape[0])
        r = unsplit_attack(make_local, h_t[:n], splits.image_shape, seed=seed)
        out["attackers"]["unsplit"] = scores(x_t[:n], r, y_t[:n], cfg.data)
    learned = {k: v for k, v in out["attackers"].items() if k != "unsplit"}
    if learned:
        best = max(learned, key=lambda k: learned[k]["ssim"])
        out["best"] = {"attacker": best, **learned[best]}
    return out
