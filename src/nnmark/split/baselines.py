"""Baseline defences from the split-learning literature: NoPeek's distance correlation and activation noise.

- :func:`distance_correlation`: the sample distance correlation (Szekely et al. 2007) between a batch of
  inputs and their activations, both flattened; NoPeek (Vepakomma et al. 2019) adds ``lambda * dcor`` to the
  owner's loss. Differentiable; in ``[0, 1]``; 0 for independent samples in the limit.
- :func:`add_noise`: Gaussian (``sigma``) or Laplace (scale ``b``) noise on what leaves the owner, drawn from
  the owner's generator; the gradient passes through unchanged.
"""

from __future__ import annotations

import torch

NOISES = ("gaussian", "laplace")


def _centred_distances(z: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(z, z)
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of ``x`` ``(N, ...)`` and ``h`` ``(N, ...)`` (scalar, differentiable)."""
    a = _centred_distances(x.flatten(1).double())
    b = _centred_distances(h.flatten(1).double())
    dcov_xy = (a * b).mean().clamp(min=0)
    dvar = (a * a).mean() * (b * b).mean()
    return (dcov_xy / dvar.sqrt().clamp(min=1e-12)).sqrt().to(h.dtype)


def add_noise(h: torch.Tensor, kind: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``h`` plus noise of ``kind`` (:data:`NOISES`) and ``scale`` (sigma, or the Laplace scale b)."""
    if kind == "gaussian":
        noise = torch.randn(h.shape, generator=generator, dtype=h.dtype)
    elif kind == "laplace":
        u = torch.rand(h.shape, generator=generator, dtype=h.dtype).clamp(1e-7, 1 - 1e-7) - 0.5
        noise = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        raise ValueError(f"noise must be one of {', '.join(NOISES)}, got {kind!r}")
    return h + scale * noise
