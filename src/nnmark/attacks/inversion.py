"""Model inversion against trigger sets: recover a trigger from the model alone (Zhang et al. 2018, sec. 6).

The attacker knows a trigger set's label (or guesses it) and optimises an input so that the model
assigns it that label with high confidence, starting from a real image of its own, a blank image or
noise; Adam on the input, clamped to [0, 1], with a total-variation penalty for smooth images. The
result is compared with the real triggers of that label by the structural similarity index (SSIM,
:func:`skimage.metrics.structural_similarity`; 1: identical) -- the best match among them -- and, as a
baseline, with the attacker's clean images of that class: a recovered image that is no closer to the
triggers than to natural images has recovered nothing of the trigger.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STARTS = ("real", "blank", "noise")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of ``x`` ``(N, C, H, W)``."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert(model: nn.Module, label: int, start: torch.Tensor, steps: int = 200, lr: float = 0.05,
           tv: float = 0.05) -> torch.Tensor:
    """An input ``(1, C, H, W)`` in [0, 1] optimised from ``start`` ``(1, C, H, W)`` to be classified as
    ``label`` (cross-entropy plus ``tv`` times the total variation)."""
    was = model.training
    model.eval()
    x = start.clone().detach().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    target = torch.tensor([int(label)])
    try:
        for _ in range(int(steps)):
            loss = F.cross_entropy(model(x.clamp(0, 1)), target) + tv * total_variation(x.clamp(0, 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        model.train(was)
    return x.detach().clamp(0, 1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two images ``(C, H, W)`` in [0, 1] (window 7, or the image side if smaller and odd)."""
    from skimage.metrics import structural_similarity

    side = min(a.shape[-1], a.shape[-2])
    win = min(7, side if side % 2 else side - 1)
    x, y = a.permute(1, 2, 0).numpy().astype(np.float64), b.permute(1, 2, 0).numpy().astype(np.float64)
    return float(structural_similarity(x, y, data_range=1.0, win_size=win, channel_axis=2))


def start_image(kind: str, real: torch.Tensor, seed: int) -> torch.Tensor:
    """A starting input ``(1, C, H, W)``: ``real`` itself, a blank (mid-grey) image, or uniform noise."""
    if kind == "real":
        return real.unsqueeze(0).clone()
    if kind == "blank":
        return torch.full((1, *real.shape), 0.5)
    if kind == "noise":
        return torch.rand((1, *real.shape), generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"start must be one of {', '.join(STARTS)}")


def trigger_inversion(model: nn.Module, triggers: torch.Tensor, trigger_labels: torch.Tensor,
                      attacker_x: torch.Tensor, attacker_y: torch.Tensor, *, labels: list[int] | None = None,
                      starts: tuple[str, ...] = STARTS, steps: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """For each ``label`` (default: the trigger labels present) and each start, invert ``model`` and report:
    ``ssim_trigger`` (best SSIM to a real trigger of that label), ``ssim_natural`` (best SSIM to an attacker
    image of that class), ``ssim_start_trigger`` (the start's own best SSIM to a trigger: what the
    optimisation added), and the model's confidence in ``label`` for the result."""
    rows = []
    wanted = sorted(set(int(v) for v in trigger_labels.tolist())) if labels is None else labels
    for label in wanted:
        trig = triggers[trigger_labels == label]
        natural = attacker_x[attacker_y == label]
        if len(trig) == 0:
            continue
        real = attacker_x[(attacker_y != label).nonzero().flatten()[0]]
        for i, kind in enumerate(starts):
            start = start_image(kind, real, seed + 31 * label + i)
            rec = invert(model, label, start, steps=steps)
            with torch.no_grad():
                conf = float(F.softmax(model.eval()(rec), dim=1)[0, label])
            rows.append({"label": label, "start": kind, "confidence": conf,
                         "ssim_trigger": max(ssim(rec[0], t) for t in trig),
                         "ssim_natural": max(ssim(rec[0], t) for t in natural) if len(natural) else float("nan"),
                         "ssim_start_trigger": max(ssim(start[0], t) for t in trig)})
    return rows
