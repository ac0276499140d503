"""The carrier of a customer fingerprint: the projection regulariser on one or more layers.

A fingerprint ``F`` (``(dim,)`` real; see :class:`nnmark.codes.FingerprintLayout`) is cut
into consecutive chunks, one per carrier layer, and chunk ``i`` is written into layer
``i``'s carrier ``theta_i`` (the filter mean of a conv weight; see
:mod:`nnmark.schemes.layers`) through a keyed projection: ``X_i theta_i ~= s F_i``,
with ``X_i`` ``(len(F_i), width_i)``, entries ``N(0, 1)``, derived from the product
key under ``fingerprint/carrier/<layer>``. ``s`` (the *scale*, default 1.0) is the
level of a ``+1`` entry in the model; the tracer divides by it.

Every customer of a product shares ``X`` (one key) and differs only in ``F``, so the
weight average of ``K`` copies carries ``X mean(theta) = s mean(F_j)``: the averaged
fingerprint the AND-ACC decoder traces.

Capacity: chunk ``i`` may hold at most ``width_i`` entries (a linear read-out of ``w``
values cannot realise more than ``w`` independent values); a code that does not fit
the layers gets a :class:`FingerprintError` naming both numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.errors import NNMarkError, SchemeError
from nnmark.keys import Key
from nnmark.schemes.layers import carrier_width, get_layer
from nnmark.schemes.projection import ProjectionRegularizer


class FingerprintError(NNMarkError):
    """A fingerprinting operation cannot be done (code does not fit, wrong suspect, bad product...)."""


def plan_chunks(model: nn.Module, layers: Sequence[str], dim: int) -> list[tuple[str, int, int]]:
    """Split ``dim`` fingerprint entries over ``layers`` in proportion to their carrier widths
    (largest remainders; consecutive chunks in the order given).

    Returns ``[(layer, start, stop), ...]`` (only layers that receive entries). Proportional
    rather than first-come: the correction constrains ``n_i`` of a layer's ``w_i`` filter-mean
    values, and a layer filled to its width loses all freedom (measured: 484 entries over
    conv3 + conv4 of the mnist5k CNN, conv3 filled first, left copies at 29-37% accuracy).
    Raises :class:`FingerprintError` when the layers hold fewer than ``dim`` values in total.
    """
    if not layers:
        raise FingerprintError("give at least one carrier layer")
    if len(set(layers)) != len(layers):
        raise FingerprintError(f"carrier layers repeat: {', '.join(layers)}")
    widths = {}
    for name in layers:
        try:
            get_layer(model, name)
        except SchemeError as exc:
            raise FingerprintError(str(exc)) from None
        widths[name] = carrier_width(model, name)
    total = sum(widths.values())
    if total < dim:
        have = ", ".join(f"{n}: {w}" for n, w in widths.items())
        raise FingerprintError(
            f"the fingerprint has {dim} entries but the carrier layer(s) hold only {total} values "
            f"({have}); choose a smaller code (e.g. ag:7 = 49 entries) or add layers"
        )
    share = {n: dim * w / total for n, w in widths.items()}
    counts = {n: int(v) for n, v in share.items()}
    for n in sorted(widths, key=lambda n: (counts[n] - share[n], list(widths).index(n)))[: dim - sum(counts.values())]:
        counts[n] += 1
    out, start = [], 0
    for name in layers:
        if counts[name]:
            out.append((name, start, start + counts[name]))
            start += counts[name]
    return out


class FingerprintCarrier:
    """Write and read a real fingerprint through the projection regulariser.

    Parameters
    ----------
    key: the product key (the projections derive from it; never stored here).
    model: a model of the product's architecture (only its layer shapes are read).
    layers: carrier layer names (default ``("conv4",)``); the fingerprint is split over them in
        proportion to their widths (:func:`plan_chunks`).
    dim: fingerprint length ``len(F)``.
    scale: level ``s`` of a ``+1`` entry (default 1.0).
    strength: ``mu`` of the regulariser used while fine-tuning (default 2,000: the issue's CPU trial).
    """

    def __init__(self, key: Key, model: nn.Module, layers: Sequence[str] = ("conv4",), *, dim: int,
                 scale: float = 1.0, strength: float = 2000.0) -> None:
        if not scale > 0:
            raise FingerprintError(f"scale must be positive, got {scale}")
        self.layers = tuple(layers)
        self.dim = int(dim)
        self.scale = float(scale)
        self.strength = float(strength)
        self.chunks = plan_chunks(model, self.layers, self.dim)
        self._key = key
        self._readers = [self._regulariser(name, None, model, stop - start) for name, start, stop in self.chunks]

    def _regulariser(self, layer: str, target: np.ndarray | None, model: nn.Module, n: int = 0
                     ) -> ProjectionRegularizer:
        sub = self._key.child(f"fingerprint/carrier/{layer}")
        width = carrier_width(model, layer)
        if target is None:  # a reader: only X matters
            return ProjectionRegularizer(sub, layer, width=width, bits=n, strength=self.strength)
        return ProjectionRegularizer(sub, layer, target=np.asarray(target, dtype=np.float32), width=width,
                                     strength=self.strength)

    def params(self) -> dict[str, Any]:
        """Plain description: layers, chunks, dim, scale, strength."""
        return {"layers": list(self.layers), "chunks": [list(c) for c in self.chunks], "dim": self.dim,
                "scale": self.scale, "strength": self.strength}

    @property
    def readers(self) -> list[ProjectionRegularizer]:
        """One read-out per chunk (its ``X`` and layer; targets unused), in the order of :attr:`chunks`."""
        return list(self._readers)

    # -- writing --------------------------------------------------------------------------
    def regularisers(self, fingerprint: np.ndarray, model: nn.Module) -> list[ProjectionRegularizer]:
        """One :class:`ProjectionRegularizer` per chunk, targeting ``scale * F`` (for fine-tuning hooks)."""
        f = self._check(fingerprint)
        return [self._regulariser(name, self.scale * f[a:b], model) for name, a, b in self.chunks]

    @torch.no_grad()
    def correct(self, model: nn.Module, fingerprint: np.ndarray,
                metrics: dict[str, torch.Tensor] | None = None) -> float:
        """Closed-form change of each carrier so that ``X theta = scale * F`` exactly (in place).

        Without ``metrics``: the minimum-norm change ``X^+ r`` (``r = scale F - X theta``).
        With ``metrics[layer] = M^+`` (``(width, width)``, from :func:`activation_metric`): the change
        ``delta = M^+ X^T (X M^+ X^T)^{-1} r`` minimising ``delta^T M delta`` -- for a conv layer's
        filter-mean carrier, the change the layer's inputs see least (see :func:`activation_metric`).
        Returns the norm of the total carrier change."""
        total = 0.0
        for reg in self.regularisers(fingerprint, model):
            metric = None if metrics is None else metrics.get(reg.layer)
            if metric is None:
                total += reg.correct(model) ** 2
                continue
            mod = get_layer(model, reg.layer)
            theta = reg.carrier(model).double()
            X = reg.X.double()
            r = reg.target.double() - X @ theta
            mx = metric.double() @ X.T  # (width, l)
            try:
                delta = mx @ torch.linalg.solve(X @ mx, r)
            except RuntimeError:  # fewer excited directions than entries: the minimum-norm change
                total += reg.correct(model) ** 2
                continue
            w = mod.weight
            if w.dim() > 2:  # filter-mean carrier: the same change in every filter
                w.add_(delta.to(w.dtype).view(w.shape[1:]).unsqueeze(0))
            else:
                w.add_(delta.to(w.dtype).view(w.shape))
            total += float(delta.norm()) ** 2
        return float(np.sqrt(total))

    # -- reading --------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, model: nn.Module) -> np.ndarray:
        """``(dim,)`` float64 ``X theta / scale``: the fingerprint read from ``model`` (about ``F`` for a copy)."""
        self.check_model(model)
        parts = [reg.projection(model).double().cpu().numpy() for reg in self._readers]
        return np.concatenate(parts) / self.scale

    def check_model(self, model: nn.Module) -> None:
        """:class:`FingerprintError` when ``model`` lacks a carrier layer or its carrier has another width."""
        for (name, _a, _b), reg in zip(self.chunks, self._readers, strict=True):
            try:
                w = carrier_width(model, name)
            except SchemeError as exc:
                raise FingerprintError(f"the suspect does not match the product's base model: {exc}") from None
            if w != reg.width:
                raise FingerprintError(f"the suspect does not match the product's base model: layer {name!r} "
                                       f"carries {w} values, the base model's {reg.width}")

    def _check(self, fingerprint: np.ndarray) -> np.ndarray:
        f = np.asarray(fingerprint, dtype=np.float64).ravel()
        if f.size != self.dim:
            raise FingerprintError(f"fingerprint has {f.size} entries, the carrier expects {self.dim}")
        return f


@torch.no_grad()
def patch_moment(model: nn.Module, layer: str, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor | None:
    """The second moment ``A`` (``(width, width)`` float64) of a conv layer's input patches over ``images``
    (``(n, C, H, W)``): the patches are unfolded with the layer's kernel, stride, padding and dilation, and
    ``A = mean(patch patch^T)`` over every patch of every image. Adding ``delta`` to a filter changes its output by
    ``delta . patch``, whose mean square is ``delta^T A delta``. ``None`` for a layer that is not an ungrouped 2-d
    convolution. ``model`` is put in eval mode for the pass and restored."""
    mod = get_layer(model, layer)
    if not isinstance(mod, nn.Conv2d) or mod.groups != 1:
        return None
    grabbed: list[torch.Tensor] = []
    handle = mod.register_forward_hook(lambda _m, i, _o: grabbed.append(i[0].detach()))
    was_training = model.training
    model.eval()
    width = mod.weight[0].numel()
    acc = torch.zeros(width, width, dtype=torch.float64)
    count = 0
    try:
        for start in range(0, images.shape[0], batch_size):
            grabbed.clear()
            model(images[start:start + batch_size])
            u = torch.nn.functional.unfold(grabbed[0], mod.kernel_size, dilation=mod.dilation,
                                           padding=mod.padding, stride=mod.stride)  # (n, width, L)
            u = u.permute(0, 2, 1).reshape(-1, width).double()
            acc += u.T @ u
            count += u.shape[0]
    finally:
        handle.remove()
        model.train(was_training)
    return acc / max(count, 1)


def live_eigen(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(eigenvalues, eigenvectors, live)`` of a patch moment ``A``: ``live`` marks the patches' range (eigenvalues
    above ``1e-9`` of the largest; below that is float64 round-off of directions the data never excite, e.g. input
    channels that are always 0 -- dead ReLUs)."""
    evals, evecs = torch.linalg.eigh(moment)
    return evals, evecs, evals > evals.max() * 1e-9


@torch.no_grad()
def activation_metric(model: nn.Module, layer: str, images: torch.Tensor, ridge: float = 0.1,
                      batch_size: int = 64, moment: torch.Tensor | None = None) -> torch.Tensor | None:
    """The inverse metric ``M^+`` (``(width, width)`` float64) for an output-preserving correction of a
    conv layer's filter-mean carrier, measured on ``images`` (``(n, C, H, W)``, the vendor's data).

    Adding ``delta`` to every filter of a conv layer changes each output by ``delta . patch``, whose mean
    square over the data is ``delta^T A delta`` with ``A`` the second moment of the layer's input patches
    (:func:`patch_moment`). The metric is
    ``M = A + ridge * (tr A / width) I`` restricted to the patches' range: directions the data never
    excite (input channels that are always 0 -- dead ReLUs) are excluded, because there the change would be
    free for an attacker to remove (prune those channels). ``ridge`` keeps part of the change isotropic;
    the default 0.1 comes from a sweep 0.01-10 on five (121,11,1) copies of the mnist5k CNN (mean accuracy
    drop 0.00 points at 0.1, 0.14 at 1, 0.18 at 10, and 0.18 for the minimum-norm change). Returns ``None`` for a
    layer that is not a 2-d convolution (the caller falls back to the minimum-norm change). ``moment``: a
    precomputed :func:`patch_moment` of the same layer and images (then ``images`` is not read).
    """
    a = patch_moment(model, layer, images, batch_size) if moment is None else moment
    if a is None:
        return None
    width = a.shape[0]
    evals, evecs, live = live_eigen(a)
    lam = ridge * float(evals.clamp(min=0).sum()) / width
    u_live = evecs[:, live]
    return (u_live / (evals[live] + lam)) @ u_live.T
