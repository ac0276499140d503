"""The projection regulariser of SecureMark-DL (Xu et al.): a real-valued code
``F`` written into one layer's weights.

The carrier ``theta`` of the chosen layer (the filter mean of a conv weight,
flattened -- the paper's "weights averaged over channels"; a linear layer's
flattened weight; see :mod:`nnmark.schemes.layers`) is projected by a secret keyed
matrix ``X`` ``(l, width)`` with ``X_ij ~ N(0, 1)``. Training adds

    mu * MSE(F - X theta)          (mean over the l code entries; mu = strength)

to the host loss, and extraction is ``F_hat = X theta`` (:meth:`ProjectionRegularizer.extract_real`);
the bits are the signs (``F_hat > 0``). ``F`` is by default a keyed random ±1 code
(a message ``m`` modulated as ``2m - 1``); a given real vector (e.g. a customer's
anti-collusion fingerprint) can be embedded instead with ``target=``.

Custom targets are not evidence. A target that is not derived from the key can be
chosen after seeing any model -- ``F = sign(X theta)`` of a clean model matches every
bit (measured: p = 9e-78 for 256 bits of a clean MLP) -- so :meth:`ProjectionRegularizer.verify`
of a custom-target key always refuses (status ``custom-target``, ``owned`` False), with the
read-out (BER, correlation) still in the details; even a committed one, since nnmark
cannot tell a target fixed in advance from one fitted afterwards without a trusted date.
``target=`` stays for carrying codes whose evidence is tested elsewhere: the fingerprint
carrier (:mod:`nnmark.fingerprint.carrier`) writes customer codes with it and traces them
with its own tests. Only the keyed ±1 code is ownership evidence.

Defaults: ``strength`` (mu) 2.0 -- the paper's mu = 0.2 pulls a tenth as hard and,
with ``X`` ~ N(0, 1), left codes of a few hundred entries short of their signs
within a normal CPU-scale training run here. The MSE pins ``X theta`` to exact
values, i.e. ``l`` linear equality constraints on the carrier: on a filter-mean
carrier (a conv layer, or ``reduce="mean"`` on a linear layer) the individual
filters stay free and fidelity is kept; on a flat carrier (e.g. the MLP head's 640
weights with 512 entries) only ``width - l`` directions are left to the task and
accuracy suffers -- prefer a mean carrier with room.

:meth:`ProjectionRegularizer.correct` is a closed-form alternative to training:
it adds the minimum-norm change ``X^+ (F - X theta)`` to the carrier in place
(spread equally over the filters), so ``X theta = F`` exactly afterwards (when
``l <= width``). Useful for issuing per-customer codes from one trained model,
followed by a short fine-tune to restore accuracy.

In your own PyTorch loop::

    scheme = ProjectionRegularizer.create(key, model, layer="conv4", bits=512)
    hook = scheme.training_hook()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + hook.loss(model)
        opt.zero_grad(); loss.backward(); opt.step()
    print(scheme.verify(model).summary())
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.params import Param, Params
from nnmark.schemes.layers import (
    BITS,
    LAYER,
    REDUCE,
    STRICT,
    WhiteBoxScheme,
    carrier_width,
    default_layer,
    get_layer,
    resolve_reduce,
    unwrap,
    with_alignment_null,
)
from nnmark.schemes.uchida import RegularizerHook
from nnmark.stats import Verdict, bit_match_verdict
from nnmark.train import TrainingHook


class ProjectionRegularizer(WhiteBoxScheme):
    """SecureMark-DL's projection regulariser.

    Parameters
    ----------
    key: the owner's key (derives ``X`` and the default code).
    layer: name of the conv / linear layer that carries the code.
    bits: code length ``l`` (at most the carrier width); ignored when ``target`` is given.
    width: number of carrier values of the layer (set by :meth:`create`).
    target: the real code ``F`` ``(l,)`` to embed; default: keyed random ±1. A custom
        target is never ownership evidence: :meth:`verify` refuses it (module docs).
    strength: ``mu`` (default 2.0).
    reduce: carrier, ``"auto"`` / ``"mean"`` / ``"flat"``.
    strict_capacity: refuse ``bits > width`` (default); ``False`` allows it for
        capacity experiments (such codes cannot all be embedded).
    """

    name = "projection"
    PARAMS = Params(LAYER, BITS, Param("strength", float, 2.0, "mu, the regulariser's weight", low=0.0), REDUCE,
                    STRICT)

    def __init__(self, key: Key, layer: str, target: np.ndarray | torch.Tensor | None = None, *, width: int,
                 bits: int | None = None, strength: float = 2.0, reduce: str = "auto",
                 strict_capacity: bool = True) -> None:
        if target is not None:
            t = torch.as_tensor(np.asarray(target, dtype=np.float32)).flatten()
            if t.numel() == 0 or not torch.isfinite(t).all():
                raise SchemeError("the target code must be a non-empty finite real vector")
            if bits is not None and int(bits) != t.numel():
                raise SchemeError(f"bits={bits} but the target code has {t.numel()} entries")
            bits = t.numel()
        if bits is None:
            raise SchemeError("give bits or a target code")
        super().__init__(key, layer=layer, bits=int(bits), width=width, reduce=reduce,
                         strict_capacity=strict_capacity)
        if not float(strength) > 0:
            raise SchemeError("strength must be positive")
        self.strength = float(strength)
        self.custom_target = target is not None
        self.target = t if target is not None else torch.from_numpy(2.0 * super().message - 1.0).float()
        self.X = torch.randn(self.bits, self.width, generator=self.key.torch_generator(f"{self.name}/X"))

    @classmethod
    def build(cls, key: Key, model: nn.Module, data: Any = None, *, layer: str | None, bits: int, strength: float,
              reduce: str, strict_capacity: bool) -> ProjectionRegularizer:
        """Build for host ``model`` from parsed :attr:`PARAMS` (the keyed +-1 code; a custom target --
        the fingerprint carrier's -- is given to the constructor and is never evidence)."""
        layer = layer or default_layer(model)
        get_layer(model, layer)
        width = carrier_width(model, layer, reduce)
        scheme = cls(key, layer=layer, width=width, bits=bits, strength=strength, reduce=reduce,
                     strict_capacity=strict_capacity)
        scheme.remember_model(model)
        return scheme

    @property
    def message(self) -> np.ndarray:
        """The bits the code carries: ``F > 0`` (0/1 int64, ``(l,)``)."""
        return (self.target > 0).numpy().astype(np.int64)

    # -- embedding ------------------------------------------------------------------
    def projection(self, model: nn.Module) -> torch.Tensor:
        """``X theta`` ``(l,)`` (differentiable)."""
        c = self.carrier(unwrap(model))
        return self.X.to(c.device, c.dtype) @ c

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """``mu * MSE(F - X theta)``."""
        z = self.projection(model)
        return self.strength * F.mse_loss(z, self.target.to(z.device, z.dtype))

    def training_hook(self) -> TrainingHook:
        return RegularizerHook(self)

    # -- extraction -----------------------------------------------------------------
    @torch.no_grad()
    def extract_real(self, model: nn.Module) -> np.ndarray:
        """``F_hat = X theta`` ``(l,)`` float64: the real code read from ``model``."""
        self.check_model(model)
        return self.projection(model).double().cpu().numpy()

    def extract(self, model: nn.Module) -> np.ndarray:
        """Bits ``F_hat > 0`` (``(l,)`` 0/1 int64)."""
        return (self.extract_real(model) > 0).astype(np.int64)

    def evidence_refusal(self) -> tuple[str, str] | None:
        """A custom target is never ownership evidence (see the module docs)."""
        if not self.custom_target:
            return None
        return ("custom-target", "this projection key carries a custom target code, which is not derived from the "
                                 "key's secret and could have been fitted to the suspect (sign(X theta) matches every "
                                 "bit of any model); only the keyed +-1 code is evidence")

    def verify(self, target: Any, *, alpha: float = 1e-6, align: bool = True,
               tensors: dict[str, str] | None = None, **kwargs: Any) -> Verdict:
        """Binomial bit-match test of the signs of ``F_hat`` against those of ``F``
        (entries where ``F == 0`` carry no bit and are skipped). H0: the model was
        not marked with this key -- ``X`` is drawn independently of the model, so
        each sign matches with probability 1/2. A custom-target key is refused
        (:meth:`evidence_refusal`); the read-out stays in the details. ``align``
        (default on): read ``target`` after aligning it to the marked model's unit
        order and scales (:meth:`~nnmark.schemes.layers.WhiteBoxScheme.align_target`)."""
        if kwargs:
            raise SchemeError(f"unknown verify option(s): {', '.join(sorted(kwargs))}")
        target, alignment = self.aligned_suspect(target, align, tensors)
        real = self.extract_real(target)
        used = (self.target != 0).numpy()
        corr = float(np.corrcoef(real, self.target.numpy())[0, 1]) if self.bits > 1 else float("nan")
        got = (real[used] > 0).astype(np.int64)
        return with_alignment_null(bit_match_verdict(
            got, self.message[used], scheme=self.name, alpha=alpha,
            details={"matched_bits": int((got == self.message[used]).sum()), "layer": self.layer,
                     "key_id": self.key.key_id, "code_correlation": corr,
                     "mse": float(np.mean((real - self.target.numpy()) ** 2)), "alignment": alignment}), alignment)

    # -- closed form -------------------------------------------------------------------
    @torch.no_grad()
    def correct(self, model: nn.Module, fraction: float = 1.0) -> float:
        """Move the layer's weights so that ``X theta`` equals ``F`` (``fraction`` of
        the way), by the minimum-norm carrier change ``X^+ (F - X theta)``; a conv's
        filter-mean carrier is changed by adding the same change to every filter.
        In place; returns the norm of the carrier change."""
        self.check_model(model)
        mod = get_layer(model, self.layer)
        theta = self.carrier(model).double()
        X = self.X.double()
        delta = fraction * (torch.linalg.pinv(X) @ (self.target.double() - X @ theta))
        how = resolve_reduce(mod, self.reduce)
        w = mod.weight
        if how == "mean":
            w.add_(delta.to(w.dtype).view(w.shape[1:]).unsqueeze(0))
        else:
            w.add_(delta.to(w.dtype).view(w.shape))
        return float(delta.norm())

    # -- persistence ----------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "bits": self.bits, "width": self.width, "strength": self.strength,
                "reduce": self.reduce, "custom_target": self.custom_target,
                "strict_capacity": self.strict_capacity}

    def material(self) -> dict[str, torch.Tensor]:
        return {"target": self.target} if self.custom_target else {}

    @classmethod
    def from_params(cls, key: Key, params: dict[str, Any], material: dict[str, torch.Tensor]
                    ) -> ProjectionRegularizer:
        params = dict(params)
        custom = bool(params.pop("custom_target", False))
        if custom and "target" not in material:
            raise ValueError("the custom target code is missing from the key material")
        return cls(key, target=material["target"].numpy() if custom else None, **params)
