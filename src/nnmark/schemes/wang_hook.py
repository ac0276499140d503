"""Wang et al.'s embedding hook: the host's watermark loss, the secret network's own training steps, MANU's
convergence snapshots and the final pass of the secret network alone (:meth:`WangHook.finalize`).

The scheme itself -- the secret network's shape, its read-out and the exact block-permutation test -- is in
:mod:`nnmark.schemes.wang`; this module is only what runs while the host trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nnmark.errors import SchemeError
from nnmark.schemes.layers import unwrap
from nnmark.train import TrainingHook

if TYPE_CHECKING:
    from nnmark.schemes.wang import WangScheme


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
                loss = loss + s.l2(self._decoy_logits(c.expand(s.decoys, -1)), target=s.decoy_target)
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

    def _decoy_logits(self, carriers: torch.Tensor) -> torch.Tensor:
        """Secret-network outputs ``(k, bits)`` of ``carriers`` ``(k, width)`` with the
        units of every block re-ordered (see :meth:`WangScheme.decoy_orders`)."""
        from nnmark.schemes.wang import permute_blocks

        s = self.scheme
        xb = s.block_inputs(carriers)
        return s.logits_of_blocks(permute_blocks(xb, s.decoy_orders(len(carriers), self.decoy_gen)))

    def finalize(self, model: nn.Module, steps: int | None = None) -> float:
        """Train the secret network alone on the finished host (``steps``, default the
        scheme's ``finalize_steps``): output the message on ``model``'s carrier and on
        ``finalize_decoys // 2`` *damaged* copies of it per step, and the complement on
        ``finalize_decoys`` re-ordered (and equally damaged) copies and on the carrier
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
                neg = damage(c.expand(k, -1), self.decoy_gen)
                loss = loss + s.l2(s.logits(pos)) + s.l2(self._decoy_logits(neg), target=s.decoy_target)
            if origin is not None:  # weighted like all decoys together; the complement, so that relatives of
                # the base (outside the null: they keep its unit order) read "not the message" and are not claimed
                loss = loss + s.l2(s.logits(origin), target=1.0 - s.target)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            last = float(loss.detach())
        s.remember_reference(model)  # the marked model's unit signature, for aligning permuted suspects
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
