"""Shared helpers of the white-box (weight-space) schemes.

A white-box mark is carried by one named layer of the host. Its *carrier* is a
1-D view of that layer's weight (biases are never used):

- ``"mean"`` -- the filter mean of Uchida et al. 2017 / SecureMark-DL: a conv
  weight ``(out, in, kh, kw)`` is averaged over the ``out`` filters and flattened
  to ``in * kh * kw`` values (a linear weight ``(out, in)``: ``in`` values). The
  mean is invariant to permuting the filters.
- ``"flat"`` -- every weight, flattened (``out * in * kh * kw`` values), as Wang
  et al. use for the MLP's 640 hidden-to-output weights.
- ``"auto"`` (default) -- ``"mean"`` for conv layers, ``"flat"`` for linear layers.

Capacity: a linear read-out ``X @ c`` of a carrier ``c`` with ``w`` values can
realise every one of the ``2**l`` sign patterns only when ``l <= w`` (``X`` has rank
at most ``w``), so :func:`check_capacity` refuses ``bits > w``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.data.dataset import ImageDataset
from nnmark.errors import KeyFileError, SchemeError
from nnmark.io import spec_difference
from nnmark.keys import Key
from nnmark.params import Param, Params
from nnmark.schemes.base import Scheme
from nnmark.stats import Verdict, bit_match_verdict
from nnmark.train import TrainConfig, TrainRecord, train

REDUCTIONS = ("auto", "mean", "flat")

#: parameters every weight-space scheme declares (see :mod:`nnmark.params`)
LAYER = Param("layer", str, None, "carrier layer (default: the last conv layer, else 'head')", optional=True)
BITS = Param("bits", int, 256, "message length (at most the layer's carrier values)", low=1)
REDUCE = Param("reduce", str, "auto", "carrier: filter mean (conv) / flat weights (linear) / auto", choices=REDUCTIONS)
STRICT = Param("strict_capacity", bool, True, "refuse more bits than carrier values (False: capacity experiments)")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside wrappers such as ``DistributedDataParallel`` (``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
        model = model.module
    return model


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv / linear layers of ``model`` by module name (those a mark can use)."""
    return {n: m for n, m in unwrap(model).named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and n}


def default_layer(model: nn.Module) -> str:
    """The last conv layer of ``model`` if it has one, otherwise ``"head"`` (or the
    last linear layer)."""
    layers = weighted_layers(model)
    convs = [n for n, m in layers.items() if not isinstance(m, nn.Linear)]
    if convs:
        return convs[-1]
    if "head" in layers:
        return "head"
    if not layers:
        raise SchemeError("the model has no conv or linear layer to carry a mark")
    return list(layers)[-1]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The conv / linear module called ``name``; :class:`SchemeError` naming the
    available layers if there is none."""
    layers = weighted_layers(model)
    if name not in layers:
        raise SchemeError(f"the model has no conv/linear layer named {name!r} "
                          f"(available: {', '.join(layers) or 'none'})")
    return layers[name]


def resolve_reduce(module: nn.Module, reduce: str) -> str:
    if reduce not in REDUCTIONS:
        raise SchemeError(f"carrier reduction must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if reduce == "auto":
        return "flat" if isinstance(module, nn.Linear) else "mean"
    return reduce


def carrier(model: nn.Module, layer: str, reduce: str = "auto") -> torch.Tensor:
    """The layer's carrier vector ``(w,)`` (differentiable; see the module docs)."""
    mod = get_layer(model, layer)
    weight = mod.weight
    how = resolve_reduce(mod, reduce)
    if how == "mean":
        return weight.mean(dim=0).flatten()
    return weight.flatten()


def carrier_width(model: nn.Module, layer: str, reduce: str = "auto") -> int:
    """Number of values in the carrier of ``layer``."""
    mod = get_layer(model, layer)
    how = resolve_reduce(mod, reduce)
    shape = tuple(mod.weight.shape)
    n = 1
    for s in shape[1:] if how == "mean" else shape:
        n *= int(s)
    return n


def check_capacity(bits: int, width: int, layer: str, reduce: str) -> None:
    """Refuse messages longer than the carrier (see the module docs)."""
    if bits < 1:
        raise SchemeError("the message needs at least one bit")
    if bits > width:
        raise SchemeError(
            f"layer {layer!r} is too small for {bits} bits: its {reduce} carrier has only {width} values, and a "
            f"linear read-out of w weights cannot carry more than w independent bits "
            f"(choose a larger layer, reduce='flat', or at most {width} bits)")


def _as_bool(value: Any) -> bool:
    """Parse a boolean given as a bool or a command-line string."""
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SchemeError(f"expected a boolean, got {value!r}")
    return bool(value)


def check_spec(scheme_name: str, expected: dict[str, Any] | None, model: nn.Module) -> None:
    """:class:`KeyFileError` when ``model``'s architecture differs from the one the key
    was made for (``expected``: the scheme's ``model_spec``; ``None``: no check)."""
    spec = getattr(unwrap(model), "spec", None)
    if expected is None or spec is None:
        return
    diff = spec_difference(dict(spec), dict(expected))
    if diff:
        raise KeyFileError(f"this {scheme_name} key was made for another architecture ({diff})")



class WhiteBoxScheme(Scheme):
    """Common part of the weight-space schemes: a message of ``bits`` bits carried by
    layer ``layer`` (carrier ``reduce``, ``width`` values), extracted as bits by
    :meth:`extract` and tested with the binomial bit-match test."""

    access = "white-box"
    VERIFY_PARAMS = Params(Param("align", bool, True, "undo hidden-unit permutations and rescalings against the "
                                 "key's unit signature before reading the carrier"))

    def __init__(self, key: Key, *, layer: str, bits: int, width: int, reduce: str = "auto",
                 strict_capacity: bool = True) -> None:
        super().__init__(key)
        self.layer = str(layer)
        self.bits = int(bits)
        self.width = int(width)
        self.reduce = str(reduce)
        self.strict_capacity = bool(strict_capacity)
        if self.reduce not in REDUCTIONS:
            raise SchemeError(f"carrier reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")
        if self.strict_capacity or self.bits < 1:
            check_capacity(self.bits, self.width, self.layer, self.reduce)

    @property
    def message(self) -> np.ndarray:
        """The owner's message: ``bits`` keyed uniform random bits (0/1, int64)."""
        return self.key.numpy_rng(f"{self.name}/message").integers(0, 2, size=self.bits).astype(np.int64)

    def carrier(self, model: nn.Module) -> torch.Tensor:
        """This scheme's carrier ``(width,)`` of ``model`` (differentiable)."""
        return carrier(model, self.layer, self.reduce)

    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model`` cannot carry this key's mark: another architecture
        (:class:`KeyFileError`), a missing layer or another carrier size (:class:`SchemeError`)."""
        check_spec(self.name, self.model_spec, model)
        w = carrier_width(model, self.layer, self.reduce)
        if w != self.width:
            raise KeyFileError(f"this {self.name} key reads {self.width} values from layer {self.layer!r}; "
                               f"the model's layer has {w} (key made for another architecture)")

    def remember_model(self, model: nn.Module) -> None:
        spec = getattr(unwrap(model), "spec", None)
        if spec:
            self.model_spec = dict(spec)

    def remember_reference(self, model: nn.Module, in_shape: tuple[int, ...] | None = None) -> None:
        """Record the finished marked ``model``'s unit signature as this key's reference (saved
        in the key file; see :mod:`nnmark.alignment`), so that :meth:`verify` can bring a
        permuted / rescaled suspect back to this unit order. :meth:`embed` calls it; in your own
        loop call it after training, before saving the key. ``in_shape``: the input shape
        (default: the model spec's). A model whose layers form no chain gets no reference
        (``reference_note`` says why) and is verified without alignment."""
        from nnmark.alignment import AlignmentError, unit_signature

        try:
            self.reference = unit_signature(model, self.key.child("alignment"), in_shape=in_shape)
            self.reference_note = ""
        except AlignmentError as exc:
            self.reference, self.reference_note = None, str(exc)

    def suspect_module(self, target: Any, tensors: dict[str, str] | None = None, check: bool = True
                       ) -> tuple[nn.Module, bool]:
        """The module to read the carrier from, and whether it runs (alignment needs activations).

        ``target``: an ``nn.Module``, a :class:`~nnmark.targets.Target` (a model file, a bare state dict, an
        ONNX export, an int8 copy: read through its dequantised weights when it has no runnable module), or a
        path. ``tensors``: ``{layer: tensor name}`` where the suspect names the carrier layer's weight
        differently (default ``"<layer>.weight"``)."""
        from nnmark.targets import Target, open_target
        from nnmark.targets.view import carrier_module

        if not isinstance(target, (nn.Module, Target)):
            if callable(target):
                raise SchemeError(f"{self.name} is a white-box scheme: verify needs the model's weights, "
                                  "not only its answers")
            target = open_target(target)
        model, runnable = carrier_module(target, [self.layer], tensors)
        if check:
            self.check_model(model)
        return model, runnable

    def align_target(self, target: nn.Module, align: bool = True) -> tuple[nn.Module, dict[str, Any]]:
        """``target`` brought to the reference's unit order and scales (a copy), or ``target``
        itself when ``align`` is off, the key holds no reference, or no chain of layers is found;
        and the report that goes into ``verdict.details["alignment"]``."""
        from nnmark.alignment import align_model

        if not align:
            return target, {"alignment": "off", "reason": "turned off by the caller"}
        if self.reference is None:
            why = getattr(self, "reference_note", "") or "the key holds no unit signature (made before alignment)"
            return target, {"alignment": "off", "reason": f"no reference: {why}; read in the model's own order"}
        aligned, report = align_model(target, self.reference, self.key.child("alignment"), carriers=[self.layer])
        return aligned, report.to_dict()

    def aligned_suspect(self, target: Any, align: bool = True, tensors: dict[str, str] | None = None
                        ) -> tuple[nn.Module, dict[str, Any]]:
        """:meth:`suspect_module` then :meth:`align_target` (alignment only when the suspect runs). With
        alignment on, a runnable suspect whose hidden layers are wider than the key's reference is first
        brought back to the reference's widths when that is function-preserving (split units merged, dummy
        units dropped: :func:`nnmark.unit_surgery.restore_widths`; ``details["alignment"]["widths"]``)."""
        model, runnable = self.suspect_module(target, tensors, check=False)
        widths: dict[str, Any] = {"widths": "as given", "reason": "not needed"}
        if runnable and align and self.reference is not None:
            from nnmark.unit_surgery import restore_widths

            target_widths = {n: int(sig.pattern.shape[1]) for n, sig in self.reference.layers.items()}
            model, report = restore_widths(model, target_widths, self.key.child("alignment"),
                                           in_shape=self.reference.in_shape)
            widths = report.to_dict()
        self.check_model(model)
        if not runnable:
            return model, {"alignment": "off", "reason": "weights only (no runnable module): read in the suspect's "
                                                         "own order"}
        aligned, alignment = self.align_target(model, align)
        return aligned, {**alignment, "widths": widths}

    def embed(self, model: nn.Module, data: ImageDataset, config: TrainConfig | None = None, *,
              val: ImageDataset | None = None, description: str = "embedding") -> TrainRecord:
        """Train ``model`` on ``data`` with this scheme's hook, in place -- from scratch
        (train-to-embed) or from a finished model (fine-tune-to-embed) -- and record the marked
        model's unit signature (:meth:`remember_reference`)."""
        self.check_model(model)
        self.remember_model(model)
        hook = self.training_hook()
        rec = train(model, data, config, val=val, hooks=[hook], description=description)
        hook.finalize(model)
        return rec

    @abstractmethod
    def extract(self, model: nn.Module) -> np.ndarray:
        """The ``bits`` extracted bits (0/1 int64 array) of ``model``."""

    def verify(self, target: Any, *, alpha: float = 1e-6, align: bool = True,
               tensors: dict[str, str] | None = None, **kwargs: Any) -> Verdict:
        """Extract the bits of ``target`` and test them against the message.

        H0: the model was not marked with this key, so each extracted bit matches the
        key's uniformly drawn message bit with probability 1/2 independently
        (``p = P[Binomial(bits, 1/2) >= matches]``); ``owned`` is ``p < alpha``.
        ``target``: a model, a :class:`~nnmark.targets.Target` or a path (:meth:`suspect_module`;
        ``tensors`` names the carrier's tensor in a bare state dict). ``align`` (default on): first
        bring ``target`` to the marked model's unit order and scales (:meth:`align_target`; only for a
        runnable suspect); the verdict's null then says what that changes."""
        if kwargs:
            raise SchemeError(f"unknown verify option(s): {', '.join(sorted(kwargs))}")
        target, alignment = self.aligned_suspect(target, align, tensors)
        bits = self.extract(target)
        v = bit_match_verdict(bits, self.message, scheme=self.name, alpha=alpha,
                              details={"matched_bits": int((bits == self.message).sum()),
                                       "layer": self.layer, "key_id": self.key.key_id, "alignment": alignment})
        return with_alignment_null(v, alignment)


def with_alignment_null(verdict: Verdict, alignment: dict[str, Any]) -> Verdict:
    """``verdict`` with the alignment's effect on the null appended to its null hypothesis
    (unchanged when the suspect was read in its own order)."""
    from dataclasses import replace

    from nnmark.alignment import ALIGNED_NULL

    if alignment.get("alignment") != "on":
        return verdict
    return replace(verdict, null_hypothesis=f"{verdict.null_hypothesis}. {ALIGNED_NULL}")
