"""Pruning attacks: zero a fraction of the weights, optionally then fine-tune.

Only weight matrices / kernels (tensors with >= 2 dims) of conv and linear layers
are pruned, as in the papers; biases and normalisation parameters are left alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnmark.attacks.base import SEED, Attack
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params
from nnmark.train import TrainConfig, TrainingHook, train

ORDERS = ("smallest", "largest", "random")


def _prunable(model: nn.Module, layers: list[str] | None) -> dict[str, nn.Parameter]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and (layers is None or name in layers):
            out[name] = mod.weight
    if layers is not None:
        missing = sorted(set(layers) - set(out))
        if missing:
            raise ValueError(f"no conv/linear layer named {', '.join(missing)}")
    return out


@torch.no_grad()
def prune_by_magnitude(model: nn.Module, fraction: float, order: str = "smallest", scope: str = "global",
                       layers: list[str] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Zero ``fraction`` (0..1) of the weights of ``model`` **in place**.

    ``order``: ``"smallest"`` |w| first (magnitude pruning), ``"largest"`` first,
    or ``"random"``. ``scope``: ``"global"`` ranks all selected weights together,
    ``"layer"`` removes ``fraction`` of each layer. ``layers``: module names to
    prune (default: every conv / linear layer). Returns the keep-masks by layer
    (1 = kept), e.g. for sparse fine-tuning.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must be in [0, 1]")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}")
    if scope not in ("global", "layer"):
        raise ValueError("scope must be 'global' or 'layer'")
    weights = _prunable(model, layers)
    gen = torch.Generator().manual_seed(seed)

    def scores(w: torch.Tensor) -> torch.Tensor:
        if order == "random":
            return torch.rand(w.shape, generator=gen)
        return w.abs() if order == "smallest" else -w.abs()

    masks: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for name, w in weights.items():
            s = scores(w).flatten()
            k = int(round(fraction * s.numel()))
            mask = torch.ones_like(s)
            if k:
                mask[torch.argsort(s, stable=True)[:k]] = 0
            masks[name] = mask.view_as(w)
    else:
        all_s = {n: scores(w) for n, w in weights.items()}
        flat = torch.cat([s.flatten() for s in all_s.values()])
        k = int(round(fraction * flat.numel()))
        keep = torch.ones_like(flat)
        if k:
            keep[torch.argsort(flat, stable=True)[:k]] = 0
        i = 0
        for name, w in weights.items():
            masks[name] = keep[i : i + w.numel()].view_as(w)
            i += w.numel()
    for name, w in weights.items():
        w.mul_(masks[name])
    return masks


class _KeepPruned(TrainingHook):
    """Re-applies pruning masks after every step (sparse fine-tuning)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
        self.pairs = [(mod.weight, masks[name]) for name, mod in model.named_modules() if name in masks]

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for w, m in self.pairs:
            w.mul_(m)


class Prune(Attack):
    """Prune a copy of the model, then optionally fine-tune it with the pruned weights held at zero
    (sparse fine-tuning); see :func:`prune_by_magnitude`."""

    name = "prune"
    budget = "finetune_epochs"
    PARAMS = Params(
        Param("fraction", float, 0.7, "fraction of the conv/linear weights set to zero", low=0.0, high=1.0),
        Param("order", str, "smallest", "which weights go first: smallest |w|, largest, random", choices=ORDERS),
        Param("scope", str, "global", "rank all layers together or each layer alone", choices=("global", "layer")),
        Param("layers", list, None, "module names to prune (default: every conv/linear layer)", optional=True,
              item=str),
        Param("finetune_epochs", int, 0, "budget: epochs of sparse fine-tuning afterwards (0: none)", low=0),
        Param("lr", float, 1e-3, "fine-tuning learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "fine-tuning samples per step", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(models[0])
        masks = prune_by_magnitude(stolen, self.fraction, self.order, self.scope, self.layers, self.seed)
        if self.finetune_epochs > 0:
            if data is None or len(data) == 0:
                raise ValueError("pruning with fine-tuning needs attacker data")
            cfg = TrainConfig(epochs=self.finetune_epochs, lr=self.lr, batch_size=self.batch_size,
                              seed=self.seed, progress=False)
            train(stolen, data, cfg, hooks=[_KeepPruned(stolen, masks)], description="sparse fine-tune")
        return stolen.eval()
