"""Overwriting: the attacker embeds its own mark with the same scheme under a new key.

The thief fine-tunes the stolen model with the scheme's own embedding (its hook, on the attacker's data)
under a key of its own, so that both parties can present a key that "verifies". Which claim prevails is
then a question of evidence the scheme cannot settle alone: whose key was committed before the other
model existed (:mod:`nnmark.commitment`), and whose key also verifies on the other party's model -- the
owner's original model, made before the attacker's key, must not verify under the attacker's key.

After :meth:`Overwrite.attack` the attacker's scheme (its key in memory) is ``attack.attacker_scheme``.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.data.dataset import ImageDataset
from nnmark.keys import Key
from nnmark.params import Param, Params, parse_assignments
from nnmark.train import TrainConfig


class Overwrite(Attack):
    """Embed the attacker's own mark (scheme ``scheme``, parameters ``scheme_params`` as ``KEY=VALUE``) under a
    key derived from ``seed`` into a copy of the model, fine-tuning ``epochs`` on the attacker's data."""

    name = "overwrite"
    needs_data = True
    budget = "epochs"
    PARAMS = Params(
        Param("scheme", str, "uchida", "the scheme the attacker embeds with (a registered scheme name)"),
        Param("scheme_params", list, [], "the attacker's scheme parameters as KEY=VALUE", item=str),
        Param("epochs", int, 10, "budget: epochs of embedding fine-tune on the attacker's data", low=1),
        Param("lr", float, 1e-3, "learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "samples per step", low=1),
        SEED,
    )
    attacker_scheme: Any = None

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        from nnmark.components import get_component

        assert data is not None
        cls = get_component("scheme", self.scheme).load()
        params: dict[str, Any] = parse_assignments(list(self.scheme_params))
        stolen = copy.deepcopy(models[0])
        key = Key.from_seed(f"nnmark-overwrite-attacker-{self.seed}")
        try:
            scheme = cls.create(key, stolen, data, **params)
        except TypeError as exc:
            raise AttackError(f"overwrite cannot build scheme {self.scheme!r}: {exc}") from None
        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed, progress=False)
        scheme.embed(stolen, data, cfg)
        self.attacker_scheme = scheme
        self.cost["key_id"] = key.key_id
        return stolen.eval()
