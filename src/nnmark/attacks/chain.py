"""Combined attacks: registered attacks applied one after another.

``steps`` lists the attacks in order, each as its registered name followed by its parameters as
``KEY=VALUE`` words, e.g. in a config::

    attack: chain
    params:
      steps: ["permute", "prune fraction=0.5", "ftal epochs=5", "distill queries=2000 student=lenet5"]

or ``--param 'steps=permute,prune fraction=0.5,ftal epochs=5'`` on a command line. Each step gets the
previous step's model and the same attacker data; the chain's own ``seed`` is added to every step's seed,
so one chain seed varies every step. ``cost`` adds up the steps' seconds and queries (``samples``: the most
any step used) and lists each step's cost under ``steps``. Every step is checked (name and parameters)
when the chain is built, before anything runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params, parse_assignments


def parse_step(step: str) -> tuple[str, dict[str, str]]:
    """``"prune fraction=0.5 order=random"`` -> ``("prune", {"fraction": "0.5", "order": "random"})``."""
    words = str(step).split()
    if not words:
        raise AttackError("an empty step in the chain")
    return words[0], parse_assignments(words[1:])


class ChainAttack(Attack):
    """Apply the attacks of ``steps`` in order (see the module docs)."""

    name = "chain"
    budget = None
    PARAMS = Params(
        Param("steps", list, ["permute", "prune fraction=0.5", "ftal epochs=5"],
              "the attacks in order: NAME KEY=VALUE ... each", item=str),
        SEED,
    )

    def __init__(self, *args: Any, **params: Any) -> None:
        super().__init__(*args, **params)
        from nnmark.attacks.base import build_attack

        if not self.steps:
            raise AttackError("a chain needs at least one step")
        self.attacks: list[Attack] = []
        for step in self.steps:
            name, given = parse_step(step)
            if name.lower() == "chain":
                raise AttackError("a chain cannot contain a chain")
            attack = build_attack(name, **given)
            attack.seed = int(attack.seed) + int(self.seed)
            self.attacks.append(attack)
        self.needs_data = any(a.needs_data for a in self.attacks)
        self.models = (self.attacks[0].models[0], self.attacks[0].models[1])

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        current: nn.Module | list[nn.Module] = models if len(models) > 1 else models[0]
        costs = []
        for attack in self.attacks:
            current = attack.attack(current, data)
            costs.append({"attack": attack.name, **attack.cost})
        self.cost["seconds"] = sum(float(c.get("seconds", 0.0)) for c in costs)
        self.cost["queries"] = sum(int(c.get("queries", 0)) for c in costs)
        self.cost["samples"] = max(int(c.get("samples", 0)) for c in costs)
        self.cost["steps"] = costs
        assert isinstance(current, nn.Module)
        return current
