"""The width defence against split units perturbed by weight noise: near-duplicate units are merged back only
when the restored copy computes what the suspect computes (within the stated tolerance), every unit kept is one
of the suspect's own, and a clean model made wide and perturbed is never claimed."""

from __future__ import annotations

import pytest
import torch

from nnmark.attacks import build_attack
from nnmark.keys import Key
from nnmark.models import model_spec
from nnmark.train import seeded_model
from nnmark.unit_surgery import NEAR_FUNCTION_TOLERANCE, restore_widths, widths


def _perturbed(model: torch.nn.Module, sigma: float, seed: int) -> torch.nn.Module:
    """Every parameter plus Gaussian noise of ``sigma`` times the tensor's mean |value| (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(sigma * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return model


def _rows_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether every row (unit) of ``a`` is a row of ``b``."""
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return bool(((fa[:, None, :] == fb[None, :, :]).all(-1)).any(1).all())


SMALL = {"channels": [8, 8, 16, 16], "dense": [32, 32]}


def _small(seed: int, **widths_: list[int]) -> torch.nn.Module:
    return seeded_model(model_spec("cnn", (1, 8, 8), 10, **{**SMALL, **widths_}), seed).eval()


@pytest.mark.parametrize("sigma", [pytest.param(1e-3, marks=pytest.mark.slow), 1e-2])
def test_split_then_noise_is_restored_to_the_reference_widths(sigma):
    model = _small(4)
    wide = _perturbed(build_attack("split", units=4, seed=1).attack(model), sigma, seed=2)
    back, report = restore_widths(wide, widths(model), Key.from_seed("verifier"))
    assert report.applied, report.to_dict()
    assert widths(back) == widths(model)
    merged = {n: report.merged.get(n, 0) + report.near_merged.get(n, 0) for n in widths(model)}
    assert merged == {n: 4 for n in widths(model)} and not report.dropped  # every copy merged back
    if sigma >= 1e-2:
        assert sum(report.near_merged.values()) > 0  # beyond what the exact duplicate test merges
    assert report.function_change <= NEAR_FUNCTION_TOLERANCE
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(9))  # not the keyed probes
    with torch.no_grad():
        ya, yb = wide(x), back(x)
    assert float((ya - yb).abs().max() / ya.abs().max()) < NEAR_FUNCTION_TOLERANCE
    assert _rows_of(back.conv1.weight, wide.conv1.weight)  # the first layer's units are the suspect's own
    assert wide.conv1.weight.shape[0] == widths(model)["conv1"] + 4  # the suspect itself is not modified


@pytest.mark.slow
def test_a_wider_model_without_near_duplicates_is_left_as_it_is():
    """A model that is wider by design (no unit a near copy of another) is not narrowed: no verdict is read from a
    made-up copy."""
    model = _small(4)
    other = _small(5, channels=[12, 12, 20, 20], dense=[36, 36])
    same, report = restore_widths(other, widths(model), Key.from_seed("verifier"))
    assert not report.applied and same is other and "did not reach" in report.reason


@pytest.mark.slow
def test_heavier_noise_is_refused_rather_than_merged_loosely():
    model = _small(4)
    wide = _perturbed(build_attack("split", units=4, seed=1).attack(model), 0.1, seed=2)
    same, report = restore_widths(wide, widths(model), Key.from_seed("verifier"))
    assert not report.applied and same is wide
