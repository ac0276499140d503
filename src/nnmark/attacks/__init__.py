"""Removal attacks, one module a family, each a class on the protocol of :mod:`nnmark.attacks.base`.

Every attack maps one or more models to a new model (the inputs are never modified) and is
found by name in the component registry (:mod:`nnmark.components`) so configs and the CLI
can build it::

    from nnmark.attacks import build_attack
    stolen = build_attack("ftal", epochs=20).attack(model, attacker_data)
"""

from nnmark.attacks.base import Attack, AttackError, build_attack
from nnmark.attacks.collusion import Average, average_models, combine_models
from nnmark.attacks.finetune import FineTune
from nnmark.attacks.obfuscate import Permute, PermuteRescale, Rescale
from nnmark.attacks.prune import Prune, prune_by_magnitude

__all__ = ["Attack", "AttackError", "Average", "FineTune", "Permute", "PermuteRescale", "Prune", "Rescale",
           "average_models", "build_attack", "combine_models", "prune_by_magnitude"]
