"""Per-copy secret components: each customer's own keyed random direction in the carrier layers.

Why
---
A copy's code part is the base plus a *linear* function of the customer's code (the closed-form correction of
:mod:`nnmark.fingerprint.issue`), so copies combined with weights summing to 1 are again a "valid copy" -- of
whatever code the weights add up to. In AG(2, q) the lines of a parallel class sum to the same vector, so one
class at +1 and the next class minus a line at -1 (13 colluders for q = 7) rebuild that line's copy exactly,
and the code decoder names an innocent. No code can prevent this: any affine combination of codewords is
reachable. What a combination of *other* copies cannot contain is a secret that only the innocent's own copy
carries. Every copy therefore also gets its customer's own random direction, and the tracer names a customer
only on evidence of that direction.

Construction (one carrier layer; several layers are stacked into one vector)
---------------------------------------------------------------------------
The layer's weight is viewed as ``W`` (``F x w``: ``F`` filters of ``w = in * kh * kw`` values; a linear
layer's ``F`` rows of ``w`` inputs). ``A`` (``w x w``) is the second moment of the layer's input patches on
the vendor's data (:func:`~nnmark.fingerprint.carrier.patch_moment`), ``A = U diag(lambda) U^T``, *live*
directions ``lambda_j > 1e-9 lambda_max``. Customer ``u`` (holder of code ``c``) gets

    ``D_u = sigma P0 G_u S``,   ``S = U diag(s) U^T``,   ``s_j = (lambda_j + r tr(A) / w)^(-1/2)`` (live), 0 (dead),

- ``G_u`` (``F x w``): i.i.d. standard normal, drawn from the product key under
  ``fingerprint/own`` / ``"<layer>:<codebook>:<c>"``; never stored, in no other copy;
- ``P0 = I - 1 1^T / F`` centres every column over the filters: the filter mean -- the code's carrier --
  is unchanged (``X theta = s F`` stays exact), and ``D_u`` is orthogonal to every change the correction
  makes (the same change in every filter): it lies outside the code subspace;
- ``S`` shapes the direction by the activation metric the correction uses, with ridge ``r`` (default 10:
  nearly isotropic over the directions the data excite; dead directions, which an attacker could zero for
  free, get nothing). Measured on the mnist5k CNN (``experiments/results/securemark/framing.md``): with
  ``r = 0.1`` the component sits mostly where the layer's inputs barely reach, and an attacker who projects
  each filter onto the 50 most excited patch directions (accuracy unchanged) removes it; with ``r = 10``
  enough of it lies in the excited directions to survive that;
- ``sigma`` from the strength ``rho`` (default 0.05): ``rho`` is the RMS change of the layer's
  pre-activations (bias excluded) relative to their RMS over the data,
  ``sigma^2 (1 - 1/F) tr(S A S) = rho^2 mean_f W_f^T A W_f``. Without data (no ``A``): ``U = I``, ``s = 1``
  and ``rho`` is relative to the weights' RMS.

A layer whose carrier is its flat weight vector (a linear layer) gets ``D_u = sigma Pi G_u`` with ``Pi`` the
projection onto the kernel of the code read-out ``X`` (so ``X vec(D_u) = 0``), ``rho`` relative to the
weights' RMS, and the unweighted read-out below.

The test and why its null is exact
----------------------------------
For a suspect, ``delta = W(suspect) - W(base)`` in each carrier layer (after any alignment to the base). The
read-out ``a(delta)`` is a function of ``delta`` and of fixed things (the base, the data, the design): with
``c_j = P0 delta u_j`` (an ``F``-vector per patch direction ``j``) and ``n_j = |c_j|^2``,

    ``a = sum_j omega_j c_j u_j^T``,   ``omega_j = s_j / max(n_j, 1e-6 median(n))``   (``"adaptive"``, default)

or ``omega_j = s_j`` (``"plain"``: ``a = P0 delta S``). Then

    ``z_u = <a, G_u> / |a|``,   ``p_u = P[N(0, 1) >= z_u]``.

In the terms ``d_u = L g_u`` (``L = sigma (P0 (x) S)``, symmetric): the plain read-out is
``z_u = <delta, d_u> / |L^T delta|``; the adaptive one is the same with ``delta`` re-weighted per direction by
a function of itself, which down-weights directions in which the suspect moved much further than the
components do (an attacker's noise there, or a projection that discarded them).

H0_u: *the suspect was made without access to customer u's copy and without the product key.* Then
``delta`` -- whatever was done to whichever other copies, with any weights, any number of them, then
fine-tuned, pruned, aligned -- is independent of ``G_u``: the copies used carry the components and codes of
other customers, drawn from the key under other purposes (modelling HMAC-SHA256 as a pseudo-random
function, i.e. the draws as independent). For any fixed ``a != 0`` and ``G ~ N(0, I)``, ``<a, G> / |a|`` is
exactly standard normal (rotational invariance), so conditionally on ``delta`` -- hence also
unconditionally -- ``z_u ~ N(0, 1)`` and ``P[p_u <= t] = t`` for every ``t``, exactly, over the randomness
of ``G_u``. Nothing about the coalition is assumed. (A suspect equal to the base on the carriers has ``a = 0``:
it gets ``z = 0``, ``p = 1/2``: no evidence.)

The tracer names a customer only when ``p_u <= alpha / n_codes``; by the union bound over the customers
whose copies were not used, the probability that *any* of them is named is at most ``alpha`` (default
``1e-3``), whatever the colluders did. The guarantee needs the key to stay secret: a key holder can build
``G_u`` into any model.

Power: an average of ``K`` copies carries ``D_u / K`` for each colluder ``u``; with the other ``K - 1``
components as the only noise, ``z_u ~ sqrt((F - 1) w_live / K)`` (conv4 of the mnist5k CNN: ``F = 64``,
``w = 576``: about 70 for ``K = 6``), against ``z >= 4.1`` needed at ``alpha / n_codes = 1e-3 / 56``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps
from torch import nn

from nnmark.fingerprint.carrier import FingerprintCarrier, FingerprintError, live_eigen
from nnmark.keys import Key
from nnmark.schemes.layers import get_layer, resolve_reduce

DEFAULT_STRENGTH = 0.05
DEFAULT_RIDGE = 10.0
WEIGHTINGS = ("adaptive", "plain")
KEY_PURPOSE = "fingerprint/own"
TINY_P = 5e-324

OWN_NULL_HYPOTHESIS = (
    "H0_u: the suspect was made without access to customer u's copy and without the product key. Then u's "
    "secret component (a key-derived standard-normal direction in the carrier layers, in u's copy only) is "
    "independent of the suspect's weight change delta = suspect - base, so z_u = <a(delta), G_u> / |a(delta)| "
    "is exactly N(0, 1) for the read-out a(delta) used (a function of delta alone) and p_u = P[N(0,1) >= z_u]: "
    "a probability over the draw of u's component, whatever the suspect's makers did with other copies"
)


def z_to_p(z: float) -> float:
    """One-sided standard-normal tail ``P[N(0, 1) >= z]`` (floored at the smallest float, 5e-324)."""
    logp = float(sps.norm.logsf(z))
    return max(math.exp(logp), TINY_P) if logp > -745 else TINY_P


def z_level(p: float) -> float:
    """The ``z`` at which ``P[N(0, 1) >= z] = p`` (e.g. 4.14 for ``p = 1e-3 / 56``)."""
    return float(sps.norm.isf(p))


@dataclass
class _LayerPlan:
    name: str
    kind: str  # "conv" (filter-mean carrier: P0 centring, shaped) | "flat" (kernel of the read-out)
    shape: tuple[int, int]  # (F, w)
    base: np.ndarray  # (F, w) float64 base weights
    sigma: float
    U: np.ndarray | None = None  # (w, w) eigenvectors of the patch moment (conv; None: identity)
    s: np.ndarray | None = None  # (w,) shaping (0: dead direction)
    Q: np.ndarray | None = None  # (F*w, n) orthonormal basis of the read-out's row space (flat)
    S: np.ndarray | None = None  # (w, w) U diag(s) U^T (conv with a moment)


class OwnComponents:
    """The per-customer secret components of one product (see the module doc).

    Parameters
    ----------
    key: the product key (the components derive from ``key.child("fingerprint/own")``).
    base: the product's base model (its carrier layers' weights are the reference of the test).
    carrier: the product's :class:`~nnmark.fingerprint.carrier.FingerprintCarrier` (its layers and read-outs).
    moments: ``{layer: A}`` patch moments (:func:`~nnmark.fingerprint.carrier.patch_moment`) on the vendor's
        data; a conv layer without one gets unshaped components (``U = I``).
    strength: ``rho`` (default 0.05): relative RMS change of the layer's pre-activations (module doc).
    ridge: ``r`` of the shaping (default 10).
    codebook: the registry codebook name the codes belong to (default ``"cic"``).
    """

    def __init__(self, key: Key, base: nn.Module, carrier: FingerprintCarrier,
                 moments: Mapping[str, torch.Tensor | None] | None = None, *, strength: float = DEFAULT_STRENGTH,
                 ridge: float = DEFAULT_RIDGE, codebook: str = "cic") -> None:
        if not strength > 0 or not ridge >= 0:
            raise FingerprintError(f"own-component strength must be > 0 and ridge >= 0, got {strength}, {ridge}")
        self.strength, self.ridge, self.codebook = float(strength), float(ridge), str(codebook)
        self._key = key.child(KEY_PURPOSE)
        moments = dict(moments or {})
        self.layers: list[_LayerPlan] = []
        for (name, _a, _b), reader in zip(carrier.chunks, carrier.readers, strict=True):
            mod = get_layer(base, name)
            w = mod.weight.detach().double().cpu()
            f = int(w.shape[0])
            w2 = w.reshape(f, -1).numpy().copy()
            if resolve_reduce(mod, reader.reduce) == "mean":
                self.layers.append(self._conv_plan(name, w2, moments.get(name)))
            else:
                self.layers.append(self._flat_plan(name, w2, reader.X.double().cpu().numpy()))

    def _conv_plan(self, name: str, w2: np.ndarray, moment: torch.Tensor | None) -> _LayerPlan:
        f, width = w2.shape
        centre = 1.0 - 1.0 / f if f > 1 else 1.0
        if moment is None:
            sigma = self.strength * float(np.sqrt((w2 ** 2).mean() / centre))
            return _LayerPlan(name, "conv", (f, width), w2, sigma)
        a = moment.double().cpu()
        if tuple(a.shape) != (width, width):
            raise FingerprintError(f"patch moment of {name!r} is {tuple(a.shape)}, the layer has {width} values")
        evals, evecs, live = live_eigen(a)
        lam = self.ridge * float(evals.clamp(min=0).sum()) / width
        s = torch.where(live, 1.0 / torch.sqrt(evals.clamp(min=0) + lam), torch.zeros_like(evals))
        cost = float((s ** 2 * evals.clamp(min=0)).sum()) * centre  # (1 - 1/F) tr(S A S)
        power = float(np.einsum("fi,ij,fj->", w2, a.numpy(), w2)) / f  # mean_f W_f^T A W_f
        if not (cost > 0 and power > 0):
            raise FingerprintError(f"layer {name!r}: its inputs are all zero on the data; no component fits there")
        sigma = self.strength * math.sqrt(power / cost)
        u = evecs.numpy()
        return _LayerPlan(name, "conv", (f, width), w2, sigma, u, s.numpy(), S=(u * s.numpy()) @ u.T)

    def _flat_plan(self, name: str, w2: np.ndarray, x: np.ndarray) -> _LayerPlan:
        n_all = w2.size
        q, _r = np.linalg.qr(x.T)  # (N, n): the read-out's row space
        keep = 1.0 - q.shape[1] / n_all
        sigma = self.strength * float(np.sqrt((w2 ** 2).mean() / max(keep, 1e-12)))
        return _LayerPlan(name, "flat", w2.shape, w2, sigma, Q=q)

    # -- the components --------------------------------------------------------------------
    def _gaussian(self, plan: _LayerPlan, code: int) -> np.ndarray:
        rng = self._key.numpy_rng(f"{plan.name}:{self.codebook}:{int(code)}")
        return rng.standard_normal(plan.shape)

    def component(self, code: int) -> dict[str, torch.Tensor]:
        """``{layer: D}``: code ``code``'s component, each ``D`` an ``(F, w)`` float64 tensor (the layer's weight
        viewed as ``F`` rows; :meth:`add_to` reshapes it)."""
        out = {}
        for plan in self.layers:
            g = self._gaussian(plan, code)
            if plan.kind == "conv":
                d = g - g.mean(axis=0, keepdims=True)  # P0 G
                if plan.S is not None:
                    d = d @ plan.S  # P0 G S
            else:
                flat = g.ravel()
                d = (flat - plan.Q @ (plan.Q.T @ flat)).reshape(plan.shape)
            out[plan.name] = torch.from_numpy(plan.sigma * d)
        return out

    @torch.no_grad()
    def add_to(self, model: nn.Module, code: int) -> float:
        """Add code ``code``'s component to ``model``'s carrier layers in place; returns its norm."""
        total = 0.0
        for name, d in self.component(code).items():
            w = get_layer(model, name).weight
            w.add_(d.to(w.dtype).view(w.shape))
            total += float(d.pow(2).sum())
        return math.sqrt(total)

    # -- the test ----------------------------------------------------------------------------
    @torch.no_grad()
    def readout(self, suspect: nn.Module, weighting: str = "adaptive") -> list[np.ndarray]:
        """The read-out ``a(delta)`` (module doc): one ``(F, w)`` float64 array per carrier layer, a function of
        the suspect's weight change alone."""
        if weighting not in WEIGHTINGS:
            raise FingerprintError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        out = []
        for plan in self.layers:
            w = get_layer(suspect, plan.name).weight.detach().double().cpu()
            if w.numel() != plan.base.size:
                raise FingerprintError(f"the suspect's {plan.name!r} has {w.numel()} weights, the base "
                                       f"{plan.base.size}")
            delta = w.reshape(plan.shape).numpy() - plan.base
            if plan.kind == "flat":
                flat = delta.ravel()
                out.append((flat - plan.Q @ (plan.Q.T @ flat)).reshape(plan.shape))
                continue
            c = delta - delta.mean(axis=0, keepdims=True)  # P0 delta
            if plan.U is None:
                out.append(c)
                continue
            c = c @ plan.U  # columns c_j
            if weighting == "plain":
                omega = plan.s
            else:
                n = (c ** 2).sum(axis=0)
                live = plan.s > 0
                floor = 1e-6 * float(np.median(n[live])) if live.any() else 0.0
                omega = np.where(live & (n > 0), plan.s / np.maximum(n, max(floor, 1e-300)), 0.0)
            out.append((c * omega) @ plan.U.T)
        return out

    def z_scores(self, suspect: nn.Module, codes: Iterable[int], weighting: str = "adaptive") -> np.ndarray:
        """``z_u`` (``(len(codes),)`` float64) of each code's component in ``suspect`` (module doc)."""
        codes = [int(c) for c in codes]
        a = self.readout(suspect, weighting)
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in a))
        if norm == 0.0 or not math.isfinite(norm):
            return np.zeros(len(codes))
        z = np.empty(len(codes))
        for i, c in enumerate(codes):
            z[i] = sum(float((x * self._gaussian(plan, c)).sum()) for x, plan in zip(a, self.layers, strict=True))
        return z / norm

    def params(self) -> dict[str, float | str | list]:
        """Plain description: strength, ridge, codebook, and each layer's kind and ``sigma``."""
        return {"strength": self.strength, "ridge": self.ridge, "codebook": self.codebook,
                "layers": [{"layer": p.name, "kind": p.kind, "sigma": p.sigma,
                            "live_directions": int((p.s > 0).sum()) if p.s is not None else p.shape[1]}
                           for p in self.layers]}
