"""Fine-tuning as practitioners run it, weight shifting, and fine-pruning.

- :class:`ScheduledFineTune` (``"ft-sgd"``): all layers, SGD with momentum and weight decay, and a learning
  rate schedule (``step``: times ``gamma`` every ``step_epochs``; ``cosine``: annealed to 0 over the run;
  ``constant``), the recipe of a practitioner adapting a downloaded model;
- :class:`WeightShift` (``"weight-shift"``): the same with a large learning rate (default 0.05 instead of
  0.01) that moves the weights far from where training left them, then anneals (cosine);
- :class:`FinePrune` (``"fine-prune"``, Liu et al. 2018): the ``fraction`` of one hidden layer's units
  least active on the attacker's clean data (mean ReLU output) removed -- their incoming weights, bias and
  norm zeroed and held at zero -- then ``epochs`` of fine-tuning (Adam).

All three need attacker data; the budget is optimisation steps (``max_batches``) or epochs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.alignment import unit_chain
from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params
from nnmark.tasks import task_of
from nnmark.train import TrainConfig, TrainingHook, train

SCHEDULES = ("constant", "step", "cosine")


def _sgd_finetune(model: nn.Module, data: ImageDataset, *, epochs: int, max_batches: int | None, lr: float,
                  momentum: float, weight_decay: float, schedule: str, step_epochs: int, gamma: float,
                  batch_size: int, seed: int) -> int:
    """SGD fine-tuning of all of ``model``'s parameters in place with a per-step learning-rate schedule;
    returns the steps taken."""
    per_epoch = -(-len(data) // batch_size)
    total = epochs * per_epoch if max_batches is None else min(epochs * per_epoch, max_batches)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    task = task_of(model)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for epoch in range(epochs):
            for x, y in data.batches(batch_size, shuffle=True, generator=gen):
                if step >= total:
                    break
                if schedule == "cosine":
                    rate = 0.5 * lr * (1 + math.cos(math.pi * step / max(1, total)))
                elif schedule == "step":
                    rate = lr * gamma ** (epoch // max(1, step_epochs))
                else:
                    rate = lr
                for group in opt.param_groups:
                    group["lr"] = rate
                loss = task.loss(model(x), y, None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            if step >= total:
                break
    model.eval()
    return step


_COMMON = (
    Param("epochs", int, 10, "passes over the attacker's data", low=0),
    Param("max_batches", int, None, "budget: optimisation steps in total (None: epochs decide)", optional=True,
          low=0),
    Param("momentum", float, 0.9, "SGD momentum", low=0.0, high=1.0),
    Param("weight_decay", float, 5e-4, "L2 weight decay", low=0.0),
    Param("step_epochs", int, 5, "step schedule: epochs between learning-rate drops", low=1),
    Param("gamma", float, 0.1, "step schedule: factor of each drop", low=0.0, high=1.0),
    Param("batch_size", int, 64, "samples per step", low=1),
    SEED,
)


class ScheduledFineTune(Attack):
    """Fine-tune all layers of a copy with SGD (momentum, weight decay) under a learning-rate schedule."""

    name = "ft-sgd"
    needs_data = True
    budget = "max_batches"
    PARAMS = Params(
        Param("lr", float, 0.01, "initial learning rate", low=0.0),
        Param("schedule", str, "cosine", "learning-rate schedule", choices=SCHEDULES),
        *_COMMON,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        assert data is not None
        stolen = copy.deepcopy(models[0])
        self.cost["steps"] = _sgd_finetune(
            stolen, data, epochs=self.epochs, max_batches=self.max_batches, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, schedule=self.schedule, step_epochs=self.step_epochs, gamma=self.gamma,
            batch_size=self.batch_size, seed=self.seed)
        return stolen


class WeightShift(ScheduledFineTune):
    """:class:`ScheduledFineTune` with a large initial learning rate (default 0.05, cosine-annealed): the
    weights are shifted far from the trained ones before the schedule brings accuracy back."""

    name = "weight-shift"
    PARAMS = Params(
        Param("lr", float, 0.05, "initial (large) learning rate", low=0.0),
        Param("schedule", str, "cosine", "learning-rate schedule", choices=SCHEDULES),
        *_COMMON,
    )


class _HoldPruned(TrainingHook):
    """Keeps pruned units' incoming weights, biases and norms at zero after every step."""

    def __init__(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.tensors = tensors

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for t, keep in self.tensors:
            t.mul_(keep.view((-1,) + (1,) * (t.dim() - 1)).to(t.dtype))


@torch.no_grad()
def mean_activations(model: nn.Module, layer: str, data: ImageDataset, batch_size: int = 256) -> torch.Tensor:
    """Each unit's mean ReLU output ``(units,)`` of hidden layer ``layer`` (after its batch norm, if any) over
    ``data`` (conv units: averaged over positions too), eval mode."""
    chain = unit_chain(model)
    link = next((lk for lk in chain.links if lk.name == layer), None)
    if link is None:
        raise AttackError(f"{layer!r} is not a hidden layer (hidden: {', '.join(chain.names)})")
    mods = dict(model.named_modules())
    sums: list[torch.Tensor] = []

    def hook(_m, _i, out):
        z = F.relu(out.detach().double())
        sums.append(z.transpose(0, 1).reshape(z.shape[1], -1).mean(1) * z.shape[0])

    h = mods[link.bn or link.name].register_forward_hook(hook)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(data), batch_size):
            model(data.x[i: i + batch_size])
    finally:
        h.remove()
        model.train(was)
    return torch.stack(sums).sum(0) / max(1, len(data))


class FinePrune(Attack):
    """Fine-pruning: remove the ``fraction`` of hidden layer ``layer``'s units least active on the attacker's
    data, then fine-tune ``epochs`` with them held at zero (see the module docs)."""

    name = "fine-prune"
    needs_data = True
    budget = "epochs"
    PARAMS = Params(
        Param("fraction", float, 0.5, "fraction of the layer's units removed (least active first)", low=0.0,
              high=1.0),
        Param("layer", str, None, "hidden layer to prune (default: the last hidden conv layer, else the last hidden "
              "layer)", optional=True),
        Param("epochs", int, 5, "budget: epochs of fine-tuning after pruning (0: prune only)", low=0),
        Param("lr", float, 1e-3, "fine-tuning learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "samples per step", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        assert data is not None
        stolen = copy.deepcopy(models[0])
        chain = unit_chain(stolen)
        mods = dict(stolen.named_modules())
        layer = self.layer
        if layer is None:
            convs = [lk.name for lk in chain.links if not isinstance(mods[lk.name], nn.Linear)]
            layer = (convs or chain.names)[-1]
        link = next((lk for lk in chain.links if lk.name == layer), None)
        if link is None:
            raise AttackError(f"{layer!r} is not a hidden layer (hidden: {', '.join(chain.names)})")
        act = mean_activations(stolen, layer, data)
        k = int(round(self.fraction * link.units))
        keep = torch.ones(link.units)
        keep[torch.argsort(act, stable=True)[:k]] = 0
        tensors = [(mods[layer].weight, keep)]
        if mods[layer].bias is not None:
            tensors.append((mods[layer].bias, keep))
        if link.bn:
            bn = mods[link.bn]
            tensors += [(t, keep) for t in (bn.weight, bn.bias) if t is not None]
        hold = _HoldPruned(tensors)
        hold.after_step(stolen, 0)
        if self.epochs > 0:
            cfg = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                              progress=False)
            train(stolen, data, cfg, hooks=[hold], description="fine-prune")
        self.cost["units_pruned"] = {layer: k}
        return stolen.eval()
