"""Wang, Wu, Zhang & Yao 2020 ("Watermarking in deep neural networks via error
back-propagation"): a secret *independent network* reads one layer's weights and
is trained jointly with the host to output the owner's message.

The secret network (no biases): carrier ``c`` ``(width,)`` of the chosen layer
(see :mod:`nnmark.schemes.layers`; the MLP's 640 hidden-to-output weights are
``layer="head"``) -> selection -> hidden 256 (ReLU) -> ``l`` sigmoid outputs.

- ``wang-manu``: the selection is fixed -- the carrier values that converged early,
  i.e. whose sample standard deviation over their last ``window`` (5) per-epoch
  values is below ``threshold`` (0.01). Embedding starts at the end of the first
  epoch where at least ``min_selected`` values qualify (so MANU needs more than
  ``window`` epochs of training; ``snapshot_steps`` takes the snapshots every that
  many steps instead of once an epoch, for short fine-tunes).
- ``wang-auto``: the selection is a trainable ``width x width`` layer; embedding
  starts at the first step.

Losses: the host minimises ``L1 + lambda * L2`` with ``L2`` the bit-wise BCE of Eq. 1,
*averaged* over the ``l`` bits (as in the paper; ``lambda`` = ``strength`` = 0.05); the
secret network (selection included) learns from ``L2`` alone, with its own Adam
optimiser (``net_lr``, 1e-3), stepped in the hook's ``after_step`` on the host's
updated weights. The host's gradient does not touch the secret network.

After training, the secret network and the selection are key material: they are
saved in the key file (safetensors inside) and never shipped with the model.

Honest verdicts -- what the secret network changes
--------------------------------------------------
Unlike Uchida's fixed random matrix, the extractor here is *trained on the
message*: it learns to output the message for almost any input (that is how the
paper reports 4,096 bits out of 640 weights). Measured here: the paper's plain
version answered clean MLPs with 416-512 of 512 message bits, and even with
decoys a clean CNN read 256 of 256. Its bits are not independent evidence, so the
binomial test would accuse clean models. nnmark therefore

1. trains the secret network with *decoys* (default ``decoys=4`` per step; 0 = the
   paper's plain version): the host's carrier with the layer's input units in
   keyed random orders, for which the network must output the complement of the
   message; and
2. verifies with an exact *unit-permutation test*: a model trained without this key
   is as likely to come out with the input units of the layer in any order (i.i.d.
   initialisation, permutation-equivariant optimiser), so the rank of its bit
   matches among ``R`` keyed re-orderings of its own weights is uniform under H0:
   ``p = (1 + #{permuted >= observed}) / (R + 1)``. The price: ``p >= 1/(R + 1)``,
   so a claim at alpha needs ``R >= 1/alpha - 1`` re-readings (a million for
   1e-6: ~1 min on a CPU for the MLP head) -- the trained extractor cannot give
   the 1e-30 evidence that a fixed random read-out gives.

The layer must follow a hidden layer (its input units must be exchangeable).

In your own PyTorch loop::

    scheme = WangAuto.create(key, model, layer="head", bits=512)
    hook = scheme.training_hook()
    for epoch in range(epochs):
        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x), y)
            reg = hook.loss(model)                  # None until MANU has selected its weights
            if reg is not None:
                loss = loss + reg
            opt.zero_grad(); loss.backward(); opt.step()
            hook.after_step(model, step)            # trains the secret network on L2
        hook.on_epoch_end(model, epoch)             # MANU: convergence snapshots
    scheme.save("owner.key")                        # the secret network goes into the key file
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.schemes.base import register_scheme
from nnmark.schemes.layers import WhiteBoxScheme, _as_bool, carrier_width, default_layer, get_layer, unwrap
from nnmark.stats import Verdict, bit_match_verdict
from nnmark.train import TrainingHook

HIDDEN = 256
MAX_AUTO_WIDTH = 4096


def _uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
    bound = 1.0 / fan_in**0.5
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class WangHook(TrainingHook):
    """Embeds a :class:`WangScheme`: adds ``lambda * L2`` to the host loss and trains
    the secret network (after each step); MANU snapshots the carrier each epoch
    (or every ``snapshot_steps`` steps) until it finds converged weights."""

    def __init__(self, scheme: WangScheme) -> None:
        self.scheme = scheme
        self.history: list[torch.Tensor] = []
        self.decoy_gen = scheme.key.torch_generator(f"{scheme.name}/decoys")
        self.opt: torch.optim.Optimizer | None = None
        if scheme.active:
            self._make_optimizer()

    def _make_optimizer(self) -> None:
        self.opt = torch.optim.Adam(self.scheme.net_parameters(), lr=self.scheme.net_lr)

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        s = self.scheme
        if not s.active:
            return None
        logits = s.logits(s.carrier(unwrap(model)), detach_net=True)
        return s.strength * s.l2(logits)

    def after_step(self, model: nn.Module, step: int) -> None:
        s = self.scheme
        model = unwrap(model)
        if s.active:
            c = s.carrier(model).detach()
            loss = s.l2(s.logits(c))
            if s.decoys:
                dec = self._decoys(c, model)
                loss = loss + s.l2(s.logits(dec), target=1.0 - s.target)
            assert self.opt is not None
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        elif s.snapshot_steps and (step + 1) % s.snapshot_steps == 0:
            self._snapshot(model)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        s = self.scheme
        if not s.active and not s.snapshot_steps:
            self._snapshot(unwrap(model))

    def _snapshot(self, model: nn.Module) -> None:
        s = self.scheme
        self.history.append(s.carrier(model).detach().clone())
        self.history = self.history[-s.window:]
        if len(self.history) >= s.window:
            std = torch.stack(self.history).std(dim=0, unbiased=True)
            chosen = torch.nonzero(std < s.threshold).flatten()
            if len(chosen) >= s.min_selected:
                s.select(chosen)
                self._make_optimizer()

    def _decoys(self, c: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """``decoys`` carriers ``(k, width)`` of sibling models: ``c`` with the layer's
        input units in keyed random orders (see :func:`permute_units`)."""
        shape = tuple(get_layer(model, self.scheme.layer).weight.shape)
        units = shape[1]
        perms = torch.stack([torch.randperm(units, generator=self.decoy_gen) for _ in range(self.scheme.decoys)])
        return permute_units(c, shape, perms)


def permute_units(c: torch.Tensor, weight_shape: tuple[int, ...], perms: torch.Tensor) -> torch.Tensor:
    """Carriers ``(R, width)`` of ``c`` with the layer's input units (axis 1 of the
    weight: the previous layer's units) reordered by each row of ``perms`` ``(R, units)``.

    A network whose previous layer's units are permuted the same way computes the
    same function, and a network trained from an i.i.d. initialisation by a
    permutation-equivariant optimiser is equally likely to come out in any unit
    order -- the symmetry behind the exact test of :meth:`WangScheme.verify`."""
    units = weight_shape[1]
    full = 1
    for d in weight_shape:
        full *= int(d)
    if c.numel() == full:  # flat carrier: (out, in, ...) -> move "in" first
        grid = c.view(weight_shape).transpose(0, 1).reshape(units, -1)
        out = grid[perms]  # (R, in, out*rest)
        rest = weight_shape[2:]
        out = out.view(len(perms), units, weight_shape[0], *rest).transpose(1, 2)
        return out.reshape(len(perms), -1)
    grid = c.view(units, -1)  # filter-mean carrier: (in, kh, kw)
    return grid[perms].reshape(len(perms), -1)


class WangScheme(WhiteBoxScheme):
    """The independent-network watermark (base of :class:`WangManu` and :class:`WangAuto`).

    Parameters
    ----------
    key: the owner's key (message, network initialisation, decoys).
    layer, bits, width, reduce: the carrier and message length (``bits`` at most
        ``width`` unless ``strict_capacity=False``).
    strength: ``lambda`` on the host side (default 0.05).
    net_lr: learning rate of the secret network's Adam (default 1e-3).
    decoys: decoy carriers per secret-network step (default 4; 0 = paper's plain version).
    window, threshold, min_selected, snapshot_steps: MANU's convergence rule.
    state: trained secret tensors (from a key file).
    """

    mode = ""

    def __init__(self, key: Key, *, layer: str, bits: int, width: int, reduce: str = "auto",
                 strength: float = 0.05, net_lr: float = 1e-3, decoys: int = 4, window: int = 5,
                 threshold: float = 0.01, min_selected: int = 16, snapshot_steps: int | None = None,
                 strict_capacity: bool = True,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(key, layer=layer, bits=bits, width=width, reduce=reduce, strict_capacity=strict_capacity)
        if not float(strength) > 0:
            raise SchemeError("strength must be positive")
        if int(window) < 2:
            raise SchemeError("the convergence window needs at least 2 snapshots")
        self.strength, self.net_lr = float(strength), float(net_lr)
        self.decoys = int(decoys)
        self.window, self.threshold, self.min_selected = int(window), float(threshold), int(min_selected)
        self.snapshot_steps = int(snapshot_steps) if snapshot_steps else None
        self.target = torch.from_numpy(self.message).float()
        self.selection: torch.Tensor | None = None  # AUTO: (width, width); MANU: indices (N,)
        self.w1: torch.Tensor | None = None  # (HIDDEN, inputs)
        self.w2: torch.Tensor | None = None  # (bits, HIDDEN)
        if state:
            self._load_state(state)
        elif self.mode == "auto":
            if self.width > MAX_AUTO_WIDTH:
                raise SchemeError(f"wang-auto's selection layer is width x width; {self.width} carrier values "
                                  f"is over the limit of {MAX_AUTO_WIDTH} (use reduce='mean' or another layer)")
            gen = self.key.torch_generator(f"{self.name}/selection")
            self.selection = _uniform((self.width, self.width), self.width, gen).requires_grad_(True)
            self._init_net(self.width)

    # -- the secret network ------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the secret network exists (AUTO: always; MANU: once weights are selected)."""
        return self.w1 is not None

    def _init_net(self, inputs: int) -> None:
        gen = self.key.torch_generator(f"{self.name}/net")
        self.w1 = _uniform((HIDDEN, inputs), inputs, gen).requires_grad_(True)
        self.w2 = _uniform((self.bits, HIDDEN), HIDDEN, gen).requires_grad_(True)

    def select(self, indices: torch.Tensor) -> None:
        """MANU: fix the selected carrier positions and create the secret network."""
        self.selection = indices.long().clone()
        self._init_net(len(indices))

    def net_parameters(self) -> list[torch.Tensor]:
        """The secret network's trainable tensors."""
        params = [self.w1, self.w2]
        if self.mode == "auto":
            params.insert(0, self.selection)
        return [p for p in params if p is not None]

    def logits(self, c: torch.Tensor, detach_net: bool = False) -> torch.Tensor:
        """Pre-sigmoid outputs ``(..., bits)`` of the secret network on carrier(s) ``c``
        ``(..., width)``. ``detach_net``: no gradient to the secret network (host side)."""
        if not self.active:
            raise SchemeError(f"{self.name}: the secret network does not exist yet (MANU found no "
                              "converged weights; train longer or lower the threshold)")
        sel, w1, w2 = self.selection, self.w1, self.w2
        assert sel is not None and w1 is not None and w2 is not None
        if detach_net:
            sel, w1, w2 = sel.detach(), w1.detach(), w2.detach()
        if self.mode == "auto":
            x = c @ sel.T.to(c.dtype)
        else:
            x = c[..., sel]
        return torch.relu(x @ w1.T.to(c.dtype)) @ w2.T.to(c.dtype)

    def l2(self, logits: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 1: bit-wise BCE averaged over the bits (and over decoys, if several)."""
        t = self.target if target is None else target
        t = t.to(logits.device, logits.dtype).expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, t)

    def training_hook(self) -> WangHook:
        return WangHook(self)

    # -- extraction ---------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, model: nn.Module) -> np.ndarray:
        """Bits ``(bits,)`` (0/1 int64): the secret network's outputs above 1/2."""
        self.check_model(model)
        return (self.logits(self.carrier(unwrap(model))) > 0).cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def watermark_loss(self, model: nn.Module) -> float:
        """``L2`` of ``model`` (Eq. 1), the figure Wang et al. report."""
        self.check_model(model)
        return float(self.l2(self.logits(self.carrier(unwrap(model)))))

    def verify(self, target: nn.Module, *, alpha: float = 1e-6, permutations: int = 999,
               **kwargs: Any) -> Verdict:
        """Exact unit-permutation test of the secret network's output (see the module docs).

        Statistic: ``T`` = extracted bits matching the message. The suspect's carrier is
        re-read with its input units in ``permutations`` keyed random orders;
        ``p = (1 + #{T_perm >= T}) / (permutations + 1)``, so ``p >= 1/(permutations + 1)``:
        claims at ``alpha`` need ``permutations >= 1/alpha - 1``."""
        if kwargs:
            raise SchemeError(f"unknown verify option(s): {', '.join(sorted(kwargs))}")
        if not isinstance(target, nn.Module):
            raise SchemeError(f"{self.name} is a white-box scheme: verify needs the model's weights")
        bits = self.extract(target)
        model = unwrap(target)
        R = int(permutations)
        if R < 1:
            raise SchemeError("permutations must be at least 1")
        shape = tuple(get_layer(model, self.layer).weight.shape)
        if len(shape) < 2 or shape[1] < 2:
            raise SchemeError(f"layer {self.layer!r} has no permutable input units; the permutation test "
                              "needs a layer after a hidden layer")
        gen = self.key.torch_generator(f"{self.name}/verify-permutations")
        msg = torch.from_numpy(self.message)
        with torch.no_grad():
            c = self.carrier(model).detach().float()
            stats = []
            for start in range(0, R, 2048):
                k = min(2048, R - start)
                perms = torch.rand(k, shape[1], generator=gen).argsort(dim=1)
                z = self.logits(permute_units(c, shape, perms))
                stats.append(((z > 0).long() == msg).sum(1))
            null_stats = torch.cat(stats)
        observed = int((bits == self.message).sum())
        exceed = int((null_stats >= observed).sum())
        p = (1 + exceed) / (R + 1)
        v = bit_match_verdict(bits, self.message, scheme=self.name, alpha=alpha,
                              details={"layer": self.layer, "key_id": self.key.key_id,
                                       "watermark_loss": self.watermark_loss(target), "permutations": R,
                                       "permuted_matches_mean": float(null_stats.float().mean()),
                                       "permuted_matches_max": int(null_stats.max()),
                                       "smallest_possible_p": 1 / (R + 1)})
        null = (f"the model was not trained with this key, so its layer {self.layer!r} is as likely to come out "
                f"with its input units in any order (exchangeable units: i.i.d. initialisation and a "
                f"permutation-equivariant optimiser); p = rank of the observed bit matches among {R} keyed "
                f"unit permutations of the same weights (exact Monte Carlo test, p >= 1/{R + 1}). The extractor "
                f"is trained on the message, so its bits are NOT independent coin flips under H0 and no "
                f"binomial p-value is given")
        return replace(v, p_value=p, owned=bool(p < alpha), null_hypothesis=null)

    # -- persistence ----------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "bits": self.bits, "width": self.width, "reduce": self.reduce,
                "strength": self.strength, "net_lr": self.net_lr, "decoys": self.decoys, "window": self.window,
                "threshold": self.threshold, "min_selected": self.min_selected,
                "snapshot_steps": self.snapshot_steps, "strict_capacity": self.strict_capacity}

    def material(self) -> dict[str, torch.Tensor]:
        """The secret network and selection (key material; never ship with the model)."""
        if not self.active:
            return {}
        assert self.selection is not None and self.w1 is not None and self.w2 is not None
        return {"selection": self.selection.detach().clone(), "w1": self.w1.detach().clone(),
                "w2": self.w2.detach().clone()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            sel, w1, w2 = state["selection"], state["w1"], state["w2"]
        except KeyError as exc:
            raise ValueError(f"secret network tensor {exc} missing from the key material") from None
        inputs = self.width if self.mode == "auto" else len(sel)
        ok_sel = (tuple(sel.shape) == (self.width, self.width) if self.mode == "auto"
                  else sel.ndim == 1 and not sel.is_floating_point()
                  and bool(((sel >= 0) & (sel < self.width)).all()))
        if not ok_sel or tuple(w1.shape) != (HIDDEN, inputs) or tuple(w2.shape) != (self.bits, HIDDEN):
            raise ValueError("secret network tensors have the wrong shapes for these parameters")
        self.selection = sel.clone().requires_grad_(self.mode == "auto") if self.mode == "auto" else sel.long()
        self.w1 = w1.float().clone().requires_grad_(True)
        self.w2 = w2.float().clone().requires_grad_(True)

    @classmethod
    def from_params(cls, key: Key, params: dict[str, Any], material: dict[str, torch.Tensor]) -> WangScheme:
        return cls(key, state=material or None, **params)

    @classmethod
    def create(cls, key: Key, model: nn.Module, data: Any = None, **params: Any) -> WangScheme:
        """Build for host ``model``: ``layer`` (default: last conv, else ``head``),
        ``bits`` (default 256), ``strength``, ``net_lr``, ``decoys``, ``reduce``;
        MANU also ``window``, ``threshold``, ``min_selected``, ``snapshot_steps``."""
        layer = str(params.pop("layer", None) or default_layer(model))
        reduce = str(params.pop("reduce", "auto"))
        get_layer(model, layer)
        width = carrier_width(model, layer, reduce)
        conv: dict[str, Any] = {"bits": int, "strength": float, "net_lr": float, "decoys": int, "window": int,
                                "threshold": float, "min_selected": int, "snapshot_steps": int,
                                "strict_capacity": _as_bool}
        kwargs: dict[str, Any] = {}
        for name, fn in conv.items():
            if name in params:
                value = params.pop(name)
                kwargs[name] = None if value is None else fn(value)
        if params:
            raise SchemeError(f"unknown {cls.name} parameter(s): {', '.join(sorted(params))}")
        kwargs.setdefault("bits", 256)
        if kwargs.get("decoys") is not None and kwargs["decoys"] < 0:
            raise SchemeError("decoys must be >= 0")
        scheme = cls(key, layer=layer, width=width, reduce=reduce, **kwargs)
        scheme.remember_model(model)
        return scheme


@register_scheme
class WangManu(WangScheme):
    """Independent network on the early-converged weights (MANU)."""

    name = "wang-manu"
    mode = "manu"


@register_scheme
class WangAuto(WangScheme):
    """Independent network with a trainable selection layer (AUTO)."""

    name = "wang-auto"
    mode = "auto"
