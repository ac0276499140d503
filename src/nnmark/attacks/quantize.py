"""Quantisation attacks: fewer bits per weight, with or without a short fine-tune, and int8 as deployed.

- :class:`QuantizeWeights` (``"quantize"``): every conv / linear weight tensor rounded to a uniform
  symmetric grid of ``bits`` bits (``2^(bits-1) - 1`` levels each side of zero; one step size per tensor
  or per output channel, from the largest magnitude); biases and batch-norm parameters stay float. With
  ``finetune_epochs`` > 0 the quantised model is fine-tuned on the attacker's data (Adam, all layers) and
  quantised again, so the result is still on the grid. The model stays a float module (weights on the
  grid), so every verifier reads it as it is.
- :class:`Int8PostTraining` (``"int8-ptq"``): eager PyTorch static int8 post-training quantisation
  (per-channel int8 weights, activation ranges calibrated on ``calibration`` attacker images), the form a
  model takes on a CPU inference server (:func:`nnmark.targets.export.quantize_torch_static`). The result
  is a quantised module: black-box verifiers query it, white-box verifiers read its dequantised weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.data.dataset import ImageDataset
from nnmark.params import Param, Params
from nnmark.train import TrainConfig, train


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int, per_channel: bool = False) -> int:
    """Round every conv / linear weight of ``model`` **in place** to a symmetric uniform grid of ``bits`` bits
    (``bits`` >= 2; step ``max|w| / (2^(bits-1) - 1)`` per tensor, or per output channel with ``per_channel``).
    Returns the number of weight tensors quantised."""
    if bits < 2:
        raise ValueError("quantisation needs at least 2 bits")
    levels = 2 ** (bits - 1) - 1
    n = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            w = mod.weight
            if per_channel:
                top = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).view((-1,) + (1,) * (w.dim() - 1))
            else:
                top = w.detach().abs().max()
            step = (top / levels).clamp(min=1e-30)
            w.copy_(torch.round(w / step).clamp(-levels, levels) * step)
            n += 1
    return n


class QuantizeWeights(Attack):
    """Quantise every conv / linear weight to ``bits`` bits (uniform, symmetric), optionally fine-tune for
    ``finetune_epochs`` on the attacker's data and quantise again (see the module docs)."""

    name = "quantize"
    budget = "finetune_epochs"
    PARAMS = Params(
        Param("bits", int, 8, "bits per weight (8, 6, 5, 4, ...)", low=2, high=16),
        Param("per_channel", bool, False, "one step size per output channel (default: one per tensor)"),
        Param("finetune_epochs", int, 0, "budget: epochs of fine-tuning after quantising (0: none)", low=0),
        Param("lr", float, 1e-3, "fine-tuning learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "fine-tuning samples per step", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        stolen = copy.deepcopy(models[0])
        quantize_weights(stolen, self.bits, self.per_channel)
        if self.finetune_epochs > 0:
            if data is None or len(data) == 0:
                raise AttackError("quantisation with fine-tuning needs attacker data")
            cfg = TrainConfig(epochs=self.finetune_epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                              progress=False)
            train(stolen, data, cfg, description="fine-tune after quantising")
            quantize_weights(stolen, self.bits, self.per_channel)
        return stolen.eval()


class Int8PostTraining(Attack):
    """PyTorch static int8 post-training quantisation as deployed (per-channel int8 weights, activations
    calibrated on the first ``calibration`` attacker images); returns the quantised module."""

    name = "int8-ptq"
    needs_data = True
    budget = "calibration"
    PARAMS = Params(
        Param("calibration", int, 256, "budget: attacker images used to calibrate activation ranges", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        from nnmark.targets.export import quantize_torch_static

        assert data is not None
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(data), generator=gen)[: self.calibration]
        self.cost["samples"] = int(len(idx))
        out = quantize_torch_static(models[0], data.x[idx])
        spec = getattr(models[0], "spec", None)
        if spec is not None:
            out.spec = dict(spec)  # type: ignore[assignment]
        return out.eval()
