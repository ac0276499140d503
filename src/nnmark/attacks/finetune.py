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

from nnmark.attacks.base import Attack, register_attack
from nnmark.data.dataset import ImageDataset
from nnmark.models import head_of
from nnmark.train import TrainConfig, train

MODES = ("FTLL", "FTAL", "RTLL", "RTAL")


class FineTune(Attack):
    """Fine-tune a copy of the model on the attacker's data.

    Parameters: ``mode`` one of FTLL/FTAL/RTLL/RTAL; ``epochs`` (default 20);
    ``max_batches`` (total optimisation steps, ``None`` = no limit); ``lr``
    (default 1e-3); ``optimizer`` ``"adam"`` (default) or ``"sgd"``;
    ``batch_size`` (default 64); ``seed`` (shuffling and head re-initialisation).
    """

    name = "finetune"

    def __init__(self, mode: str = "FTAL", epochs: int = 20, max_batches: int | None = None,
                 lr: float = 1e-3, optimizer: str = "adam", batch_size: int = 64, seed: int = 0,
                 progress: bool | None = False) -> None:
        mode = mode.upper()
        if mode not in MODES:
            raise ValueError(f"fine-tuning mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.epochs, self.max_batches = mode, int(epochs), max_batches
        self.lr, self.optimizer, self.batch_size, self.seed = float(lr), optimizer, int(batch_size), int(seed)
        self.progress = progress

    def attack(self, model: nn.Module, data: ImageDataset | None = None) -> nn.Module:
        if data is None or len(data) == 0:
            raise ValueError("fine-tuning needs attacker data")
        stolen = copy.deepcopy(model)
        head = head_of(stolen)
        if self.mode.startswith("RT"):
            gen = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                bound = 1.0 / head.in_features**0.5
                head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
                head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
        params = head.parameters() if self.mode.endswith("LL") else stolen.parameters()
        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer=self.optimizer,
                          lr=self.lr, max_steps=self.max_batches, seed=self.seed, progress=self.progress)
        train(stolen, data, cfg, params=params, description=f"attack {self.mode}")
        return stolen.eval()


for _mode in MODES:
    register_attack(_mode.lower(), FineTune, mode=_mode)
