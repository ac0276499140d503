"""Removal attacks, one module a family, each an object with one ``attack`` method.

Every attack maps a model to a new model (the input is never modified) and is
registered by name in :data:`ATTACKS` so configs and the CLI can build it::

    from nnmark.attacks import build_attack
    stolen = build_attack("ftal", epochs=20).attack(model, attacker_data)
"""

from nnmark.attacks.base import ATTACKS, Attack, build_attack
from nnmark.attacks.collusion import Average, average_models
from nnmark.attacks.finetune import FineTune
from nnmark.attacks.obfuscate import Permute, PermuteRescale, Rescale
from nnmark.attacks.prune import Prune, prune_by_magnitude

__all__ = ["ATTACKS", "Attack", "Average", "FineTune", "Permute", "PermuteRescale", "Prune", "Rescale",
           "average_models", "build_attack", "prune_by_magnitude"]
