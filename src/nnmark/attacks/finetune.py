"""Fine-tuning attacks (Adi et al. 2018 naming): FTLL, FTAL, RTLL, RTAL.

- FTLL: fine-tune the last layer only.
- FTAL: fine-tune all layers.
- RTLL: re-initialise the last layer, then train it only.
- RTAL: re-initialise the last layer, then train all layers.

The attacker trains on its own data (disjoint from the owner's) under a budget in
epochs and/or optimisation steps (batches).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnmark.attacks.base import SEED, Attack
from nnmark.data.dataset import ImageDataset
from nnmark.models import head_of
from nnmark.params import Param, Params
from nnmark.train import TrainConfig, train

MODES = ("FTLL", "FTAL", "RTLL", "RTAL")


class FineTune(Attack):
    """Fine-tune a copy of the model on the attacker's data (FTLL / FTAL / RTLL / RTAL)."""

    name = "finetune"
    needs_data = True
    budget = "max_batches"
    PARAMS = Params(
        Param("mode", str, "FTAL", "which layers: FTLL / FTAL (fine-tune last / all), RTLL / RTAL (re-initialise "
              "the head first)", choices=MODES),
        Param("epochs", int, 20, "passes over the attacker's data", low=0),
        Param("max_batches", int, None, "budget: optimisation steps in total (None: epochs decide)",
              optional=True, low=0),
        Param("lr", float, 1e-3, "learning rate", low=0.0),
        Param("optimizer", str, "adam", "optimiser (sgd: with momentum)", choices=("adam", "sgd")),
        Param("momentum", float, 0.9, "SGD momentum", low=0.0, high=1.0),
        Param("weight_decay", float, 0.0, "L2 weight decay", low=0.0),
        Param("batch_size", int, 64, "samples per step", low=1),
        SEED,
    )

    def prepare(self, given: dict) -> dict:
        if isinstance(given.get("mode"), str):
            given = {**given, "mode": given["mode"].upper()}
        return given

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(models[0])
        head = head_of(stolen)
        if self.mode.startswith("RT"):
            gen = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                bound = 1.0 / head.in_features**0.5
                head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
                head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
        params = head.parameters() if self.mode.endswith("LL") else stolen.parameters()
        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer,
                          lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                          max_steps=self.max_batches, seed=self.seed, progress=False)
        train(stolen, data, cfg, params=params, description=f"attack {self.mode}")
        return stolen.eval()
