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
  many steps instead of once an epoch -- :meth:`WangScheme.embed` sets it by itself
  for runs shorter than ``2 * window`` epochs, e.g. a fine-tune-to-embed).
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
   message;
2. *finalizes* it after the host's training (:meth:`WangHook.finalize`, called by
   :meth:`WangScheme.embed`; ``finalize_steps=300`` steps of ``finalize_decoys=32``
   decoys, plus the carrier the embedding started from -- the base model when
   fine-tuning to embed -- as a negative weighted like all decoys together; and
   damaged copies, up to 60% of the carrier zeroed, on both sides, so that a pruned
   host still reads the message rather than the complement). The host is not
   touched. Without it, 5-17% of the permuted re-readings of a marked MLP still read
   every bit and the test below could not claim it; and
3. verifies with an exact *unit-permutation test*: a model trained without this key
   is as likely to come out with the input units of the layer in any order (i.i.d.
   initialisation, permutation-equivariant optimiser), so the rank of its watermark
   loss (Eq. 1) among ``R`` keyed re-orderings of its own weights is uniform under
   H0. Sequential Monte Carlo (Besag & Clifford 1991): reading stops after 10
   re-orderings at least as extreme (clean models: after a few dozen reads), else
   ``p = (1 + #{as extreme}) / (R + 1)``. The price: ``p >= 1/(R + 1)``; ``R``
   defaults to ``ceil(1/alpha)``, i.e. a million re-readings for alpha = 1e-6
   (~10 s on one core for the MLP head) -- the trained extractor cannot give the
   1e-30 evidence that a fixed random read-out gives.

Assumptions of that null, stated in every verdict: the layer must read hidden units
(not the input pixels: :meth:`WangScheme.create` refuses the first layer), and the
suspect must not share an ancestor with the marked model -- two fine-tunes of one
*public* base model keep its unit order. Measured on the MLP: clean 3-epoch
siblings of a fine-tune-to-embed model read the complement (0 of 256 bits) with
p = 0.3 (MANU) but p = 4e-4 (AUTO): the null is visibly violated for relatives. A
claim therefore also needs more than half of the bits to match, which only lowers
the false-claim rate; still, prefer Uchida / projection when the base is public.
The extreme case: a clean *twin* (same initialisation and batches, no mark) is nearly
the marked model, because lambda * mean-BCE hardly moves the host, and AUTO's secret
network reads the message from it (MLP: all 256 bits, p at the floor). The evidence
is the decoder's memory of this training run more than a signal in the weights.

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
    hook.finalize(model)                            # the secret network alone, on the final weights
    scheme.save("owner.key")                        # the secret network goes into the key file
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.data.dataset import ImageDataset
from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.schemes.base import register_scheme
from nnmark.schemes.layers import (
    WhiteBoxScheme,
    _as_bool,
    carrier_width,
    default_layer,
    get_layer,
    unwrap,
    weighted_layers,
)
from nnmark.stats import Verdict, bit_match_verdict
from nnmark.train import TrainConfig, TrainingHook, TrainRecord, train

HIDDEN = 256
MAX_AUTO_WIDTH = 4096
MAX_PERMUTATIONS = 10_000_000
STOP_AFTER = 10
CHUNK = 4096


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

    def _remember_origin(self, model: nn.Module) -> None:
        # the carrier before the first update: the base model when fine-tuning to embed
        if self.scheme.origin is None:
            self.scheme.origin = self.scheme.carrier(model).detach().clone()

    def _make_optimizer(self) -> None:
        self.opt = torch.optim.Adam(self.scheme.net_parameters(), lr=self.scheme.net_lr)

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        s = self.scheme
        self._remember_origin(unwrap(model))
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
                dec = self._decoys(c, model, s.decoys)
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

    def _decoys(self, c: torch.Tensor, model: nn.Module, k: int) -> torch.Tensor:
        """``k`` decoy carriers ``(k, width)`` of sibling models: ``c`` with the layer's
        input units in keyed random orders (see :func:`permute_units`)."""
        shape = tuple(get_layer(model, self.scheme.layer).weight.shape)
        units = shape[1]
        perms = torch.rand(k, units, generator=self.decoy_gen).argsort(dim=1)
        return permute_units(c, shape, perms)

    def finalize(self, model: nn.Module, steps: int | None = None) -> float:
        """Train the secret network alone on the finished host (``steps``, default the
        scheme's ``finalize_steps``): output the message on ``model``'s carrier and on
        ``finalize_decoys // 2`` *damaged* copies of it per step, and the complement on
        ``finalize_decoys`` unit-permuted (and equally damaged) copies and on the carrier
        the embedding started from (the base model when fine-tuning to embed). Damage
        (see :func:`damage`): a random 0-60% of the carrier values zeroed, at random or
        the smallest first -- so that pruning the host does not push its carrier to the
        complement side. The host is not touched. Returns the last loss."""
        s = self.scheme
        model = unwrap(model)
        if not s.active:
            raise SchemeError(f"{s.name}: the secret network does not exist (MANU found no converged weights; "
                              "train longer, lower the threshold or set snapshot_steps)")
        if self.opt is None:
            self._make_optimizer()
        assert self.opt is not None
        c = s.carrier(model).detach()
        origin = None if s.origin is None else s.origin.to(c.dtype)
        k = s.finalize_decoys
        last = float("nan")
        for _ in range(s.finalize_steps if steps is None else int(steps)):
            loss = s.l2(s.logits(c))
            if k:
                pos = damage(c.expand(max(1, k // 2), -1), self.decoy_gen)
                neg = damage(self._decoys(c, model, k), self.decoy_gen)
                loss = loss + s.l2(s.logits(pos)) + s.l2(s.logits(neg), target=1.0 - s.target)
            if origin is not None:  # weighted like all decoys together: relatives of the base stay typical
                loss = loss + s.l2(s.logits(origin), target=1.0 - s.target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            last = float(loss.detach())
        return last


def damage(c: torch.Tensor, gen: torch.Generator, most: float = 0.6) -> torch.Tensor:
    """Copies of carriers ``c`` ``(k, width)`` with a uniform random fraction in
    ``[0, most]`` of each row's values set to zero: at random (even rows) or the
    smallest ``|c|`` first (odd rows) -- what pruning does to a carrier."""
    k, w = c.shape
    frac = torch.rand(k, 1, generator=gen) * most
    noise = torch.rand(k, w, generator=gen)
    by_size = c.abs().argsort(dim=1).argsort(dim=1).to(c.dtype) / w  # rank of |c| in [0, 1)
    score = torch.where((torch.arange(k) % 2 == 1).unsqueeze(1), by_size, noise)
    return c * (score >= frac).to(c.dtype)


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
    decoys: decoy carriers per secret-network step (default 4; 0 with ``finalize_steps=0``:
        the paper's plain version).
    window, threshold, min_selected, snapshot_steps: MANU's convergence rule.
    finalize_steps, finalize_decoys: after embedding, the secret network alone is trained
        this many steps (default 300) with this many decoys a step (default 32); see
        :meth:`WangHook.finalize`. 0 steps: the paper's joint training only.
    state: trained secret tensors (from a key file).
    """

    mode = ""

    def __init__(self, key: Key, *, layer: str, bits: int, width: int, reduce: str = "auto",
                 strength: float = 0.05, net_lr: float = 1e-3, decoys: int = 4, window: int = 5,
                 threshold: float = 0.01, min_selected: int = 16, snapshot_steps: int | None = None,
                 finalize_steps: int = 300, finalize_decoys: int = 32, strict_capacity: bool = True,
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
        if int(finalize_steps) < 0 or int(finalize_decoys) < 0 or self.decoys < 0:
            raise SchemeError("decoys, finalize_steps and finalize_decoys must be >= 0")
        self.finalize_steps, self.finalize_decoys = int(finalize_steps), int(finalize_decoys)
        self.origin: torch.Tensor | None = None  # carrier the embedding started from (not saved)
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

    def embed(self, model: nn.Module, data: ImageDataset, config: TrainConfig | None = None, *,
              val: ImageDataset | None = None, description: str = "embedding") -> TrainRecord:
        """Train ``model`` with the mark (in place), then :meth:`WangHook.finalize` the
        secret network. MANU without ``snapshot_steps`` on a run too short for ``window``
        per-epoch snapshots (fewer than ``2 * window`` epochs, e.g. a fine-tune) snapshots
        every ``total_steps // (3 * window)`` steps instead, so the window fills within the
        first third of the run. :class:`SchemeError` if MANU still finds no converged weights."""
        self.check_model(model)
        self.remember_model(model)
        cfg = config or TrainConfig()
        restore = self.snapshot_steps
        if self.mode == "manu" and not self.active and not self.snapshot_steps and cfg.epochs < 2 * self.window:
            total = cfg.epochs * -(-len(data) // cfg.batch_size)
            if cfg.max_steps is not None:
                total = min(total, cfg.max_steps)
            self.snapshot_steps = max(1, total // (3 * self.window))
        hook = self.training_hook()
        try:
            rec = train(model, data, cfg, val=val, hooks=[hook], description=description)
        finally:
            self.snapshot_steps = restore
        if not self.active:
            raise SchemeError(f"{self.name}: no carrier value of layer {self.layer!r} converged (std of the last "
                              f"{self.window} snapshots < {self.threshold}) before training ended; train longer, "
                              "raise threshold or set snapshot_steps")
        hook.finalize(model)
        return rec

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

    def verify(self, target: nn.Module, *, alpha: float = 1e-6, permutations: int | None = None,
               stop_after: int = STOP_AFTER, **kwargs: Any) -> Verdict:
        """Exact unit-permutation test of the secret network's output (see the module docs).

        Test statistic: the watermark loss ``L2`` (Eq. 1) of the secret network on the
        suspect's carrier -- smaller is more extreme; it ranks far more sharply than the
        count of matched bits, which ties at ``bits`` for a few permutations of a marked
        model. (The verdict's ``statistic`` is still the number of matched bits, for
        reporting.) The suspect's carrier is
        re-read with its input units in up to ``R`` keyed random orders (``permutations``;
        default ``max(999, ceil(1/alpha))``, the fewest that can reach ``p < alpha``, at
        most ``MAX_PERMUTATIONS``). Sequential Monte Carlo test (Besag & Clifford 1991):
        reading stops at the ``stop_after``-th (default 10) permuted read with ``L2_perm <= L2``,
        after ``L`` reads, and ``p = stop_after / L``; otherwise
        ``p = (1 + #{L2_perm <= L2}) / (R + 1)``. Both are exact p-values under H0, and
        ``p >= 1/(R + 1)``. Clean models stop early; a marked one costs all ``R`` reads
        (about 15 s a million for the MLP head on one core)."""
        if kwargs:
            raise SchemeError(f"unknown verify option(s): {', '.join(sorted(kwargs))}")
        if not isinstance(target, nn.Module):
            raise SchemeError(f"{self.name} is a white-box scheme: verify needs the model's weights")
        if not 0 < alpha < 1:
            raise SchemeError(f"alpha must be in (0, 1), got {alpha}")
        bits = self.extract(target)
        model = unwrap(target)
        R = max(999, math.ceil(1 / alpha)) if permutations is None else int(permutations)
        if R < 1:
            raise SchemeError("permutations must be at least 1")
        if R > MAX_PERMUTATIONS:
            raise SchemeError(f"alpha = {alpha:g} would need {R} permutation reads of the weights (the p-value of "
                              f"this exact test cannot go below 1/(R + 1)); the limit is {MAX_PERMUTATIONS}, "
                              f"i.e. alpha >= {1 / MAX_PERMUTATIONS:g}")
        h = int(stop_after)
        if h < 1:
            raise SchemeError("stop_after must be at least 1")
        shape = tuple(get_layer(model, self.layer).weight.shape)
        if len(shape) < 2 or shape[1] < 2:
            raise SchemeError(f"layer {self.layer!r} has no permutable input units; the permutation test "
                              "needs a layer after a hidden layer")
        gen = self.key.torch_generator(f"{self.name}/verify-permutations")
        msg = torch.from_numpy(self.message)
        target_bits = self.target.float()
        read = exceed = 0
        total_matches, most = 0.0, 0
        p: float | None = None
        with torch.no_grad():
            c = self.carrier(model).detach().float()
            first = self._first_layer()
            observed = float(self._row_losses(self._logits_from(c.unsqueeze(0), first), target_bits)[0])
            while read < R:
                k = min(CHUNK, R - read)
                perms = torch.rand(k, shape[1], generator=gen).argsort(dim=1)
                z = self._logits_from(permute_units(c, shape, perms), first)
                matches = ((z > 0).long() == msg).sum(1)
                hits = torch.cumsum((self._row_losses(z, target_bits) <= observed).long(), 0)
                if exceed + int(hits[-1]) >= h:  # the h-th exceedance is in this chunk
                    at = int(torch.nonzero(exceed + hits >= h)[0])
                    read += at + 1
                    total_matches += float(matches[: at + 1].sum())
                    most = max(most, int(matches[: at + 1].max()))
                    exceed = h
                    p = h / read
                    break
                exceed += int(hits[-1])
                read += k
                total_matches += float(matches.sum())
                most = max(most, int(matches.max()))
        if p is None:
            p = (1 + exceed) / (R + 1)
        v = bit_match_verdict(bits, self.message, scheme=self.name, alpha=alpha,
                              details={"matched_bits": int((bits == self.message).sum()),
                                       "layer": self.layer, "key_id": self.key.key_id,
                                       "watermark_loss": observed, "test_statistic": "watermark_loss",
                                       "permutations": R,
                                       "permutations_read": read, "permuted_as_extreme": exceed,
                                       "permuted_matches_mean": total_matches / read,
                                       "permuted_matches_max": most,
                                       "smallest_possible_p": 1 / (R + 1)})
        null = (f"the model was not trained with this key and shares no ancestor with the marked model (not even "
                f"its random initialisation), so its "
                f"layer {self.layer!r} is as likely to come out with its input units in any order (exchangeable "
                f"units: i.i.d. initialisation and a permutation-equivariant optimiser); p = rank of the observed "
                f"watermark loss among up to {R} keyed unit permutations of the same weights (exact sequential Monte "
                f"Carlo test, p >= 1/{R + 1}). The extractor is trained on the message, so its bits are NOT "
                f"independent coin flips under H0 and no binomial p-value is given")
        null += ("; a claim also needs more than half of the bits to match (the message, not the complement the "
                 "decoys taught), which can only lower the false-claim rate")
        matched = int(v.statistic)
        return replace(v, p_value=float(p), owned=bool(p < alpha and 2 * matched > self.bits), null_hypothesis=null)

    def _first_layer(self) -> torch.Tensor:
        """The secret network's first linear map as one matrix ``(HIDDEN, width)``
        (AUTO: ``w1 @ selection``; MANU: ``w1`` scattered onto the selected positions)."""
        assert self.selection is not None and self.w1 is not None
        w1 = self.w1.detach().float()
        if self.mode == "auto":
            return w1 @ self.selection.detach().float()
        full = torch.zeros(HIDDEN, self.width)
        full[:, self.selection] = w1
        return full

    @staticmethod
    def _row_losses(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 1 per row of ``z`` ``(R, bits)``: ``(R,)``."""
        return F.binary_cross_entropy_with_logits(z, target.expand_as(z), reduction="none").mean(1)

    def _logits_from(self, c: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        assert self.w2 is not None
        return torch.relu(c @ first.T) @ self.w2.detach().float().T

    # -- persistence ----------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"layer": self.layer, "bits": self.bits, "width": self.width, "reduce": self.reduce,
                "strength": self.strength, "net_lr": self.net_lr, "decoys": self.decoys, "window": self.window,
                "threshold": self.threshold, "min_selected": self.min_selected,
                "snapshot_steps": self.snapshot_steps, "finalize_steps": self.finalize_steps,
                "finalize_decoys": self.finalize_decoys, "strict_capacity": self.strict_capacity}

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
        if layer == next(iter(weighted_layers(model))):
            raise SchemeError(f"{cls.name} needs a layer that reads hidden units (its verdict permutes them); "
                              f"{layer!r} is the first layer and reads the input pixels: choose a later layer")
        width = carrier_width(model, layer, reduce)
        conv: dict[str, Any] = {"bits": int, "strength": float, "net_lr": float, "decoys": int, "window": int,
                                "threshold": float, "min_selected": int, "snapshot_steps": int,
                                "finalize_steps": int, "finalize_decoys": int, "strict_capacity": _as_bool}
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
