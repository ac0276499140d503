"""The owners' defenders: decoders that simulate the attacker during training, and who holds which.

Named defender kinds (the spec strings of :mod:`nnmark.split.decoders`):

- for vector activations (the MLP split), the paper's four (Section VI-A): ``d1`` ``900 -> Tanh -> 900 ->
  Sigmoid`` (``"900:tanh"``), ``d2`` ``900 -> Sigmoid`` (linear + sigmoid, ``""``), ``d3`` listed by the
  paper exactly as ``d1`` (same architecture, another initialisation), ``d4`` ``900 -> Sigmoid -> 900 ->
  Sigmoid`` (``"900:sigmoid"``);
- for activation maps (the CNN at pool1 / pool2), four deconvolution decoders ``c1`` .. ``c4``.

:func:`assign_defenders` gives each owner its defenders: ``"single"`` -- every owner the same one kind (the
paper's Table I); ``"multiple"`` -- the kinds dealt round-robin over the owners, one each (the paper's
Table II: four kinds over twenty owners); ``"all"`` -- every owner trains every kind at once.
"""

from __future__ import annotations

from nnmark.split.partition import SplitError

VECTOR_DEFENDERS = {"d1": "900:tanh", "d2": "", "d3": "900:tanh", "d4": "900:sigmoid"}
MAP_DEFENDERS = {"c1": "deconv:64", "c2": "deconv:32:tanh", "c3": "deconv:64,32", "c4": "deconv:16:sigmoid"}
SETTINGS = ("none", "single", "multiple", "all")


def defender_table(act_shape: tuple[int, ...]) -> dict[str, str]:
    """The named kinds that fit activations of ``act_shape`` (maps: ``c1..c4``; vectors: ``d1..d4``)."""
    return MAP_DEFENDERS if len(act_shape) == 3 else VECTOR_DEFENDERS


def defender_spec(name: str, act_shape: tuple[int, ...]) -> str:
    """A kind's decoder spec; a string that is not a kind name is taken as a decoder spec itself."""
    table = {**VECTOR_DEFENDERS, **MAP_DEFENDERS}
    return table.get(name, name)


def assign_defenders(setting: str, n_owners: int, act_shape: tuple[int, ...],
                     kinds: list[str] | None = None) -> list[list[str]]:
    """Per owner, the list of defender kinds it trains (see the module doc). ``kinds``: the kinds to use
    (default the table's four; ``"single"`` uses the first)."""
    if setting not in SETTINGS:
        raise SplitError(f"defender setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    kinds = list(kinds or defender_table(act_shape))
    if setting == "none":
        return [[] for _ in range(n_owners)]
    if setting == "single":
        return [[kinds[0]] for _ in range(n_owners)]
    if setting == "multiple":
        return [[kinds[i % len(kinds)]] for i in range(n_owners)]
    return [list(kinds) for _ in range(n_owners)]
