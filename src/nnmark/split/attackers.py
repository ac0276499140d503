"""Reconstruction attacks by the server (honest but curious) on what the owners sent.

Learning attackers (:func:`train_attacker`): the server holds public images of the same domain (the
dataset's ``attacker`` split, disjoint from every owner's) and, once training ends, the local part (it
assembles the product); it trains a decoder on pairs ``(observe(x_pub), x_pub)`` -- ``observe`` is what it
would have received for ``x_pub``, noise included when the owners add noise -- and applies it to the
activations of the owners' images. Architectures (decoder specs of :mod:`nnmark.split.decoders`):

- :data:`VECTOR_ATTACKERS`: the paper's eight for the MLP split (Section VI-A), read as hidden layers then a
  sigmoid output layer of the image's size: ``a1`` 900 Tanh 900 ReLU, ``a2`` 900 ReLU dropout 0.15, ``a3``
  900 Tanh, ``a4`` 900 Tanh 900 Sigmoid, ``a5`` 600 ReLU, ``a6`` 1024 ReLU, ``a7`` 1-d conv Tanh, ``a8``
  linear;
- :data:`MAP_ATTACKERS`: deconvolution decoders for the CNN's activation maps, and a linear one.

Label-aware attackers (``public_labels`` given to :func:`train_attacker`): the server also receives every
image's label, so the same decoders are trained on the activations with the label appended (one-hot; as
extra constant channels for maps, :func:`append_labels`) -- they measure what the activations add to what the
labels already give away (the label floor of :func:`nnmark.split.metrics.floor_scores`).

Model inversion without the weights (:func:`unsplit_attack`, the UnSplit setting of Erdogan et al. 2022):
the server knows only the local part's *architecture*; it optimises, alternately, a surrogate local part
(fresh weights) and the images (through a sigmoid) so that the surrogate maps the images to the observed
activations, with a total-variation prior on the images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.split.decoders import build_decoder

VECTOR_ATTACKERS = {"a1": "900:tanh,900:relu", "a2": "900:relu:drop0.15", "a3": "900:tanh",
                    "a4": "900:tanh,900:sigmoid", "a5": "600:relu", "a6": "1024:relu", "a7": "conv1d:tanh",
                    "a8": ""}
MAP_ATTACKERS = {"m1": "deconv:64", "m2": "deconv:128,64", "m3": "deconv:32:tanh", "m4": "deconv:64:sigmoid",
                 "m5": ""}


def attacker_table(act_shape: tuple[int, ...]) -> dict[str, str]:
    """The attacker architectures that fit activations of ``act_shape``."""
    return MAP_ATTACKERS if len(act_shape) == 3 else VECTOR_ATTACKERS


@dataclass
class AttackConfig:
    """Training of a learning attacker: ``epochs`` over the public images, Adam ``lr``, ``batch_size``, ``seed``."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0


def append_labels(h: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Activations ``h`` ``(N, D)`` or ``(N, C, h, w)`` with the one-hot labels ``y`` ``(N,)`` appended:
    ``(N, D + K)``, or ``(N, C + K, h, w)`` (one constant plane per class)."""
    one_hot = F.one_hot(y.long(), num_classes).to(h.dtype)
    if h.dim() == 4:
        return torch.cat([h, one_hot[:, :, None, None].expand(-1, -1, *h.shape[2:])], 1)
    return torch.cat([h.flatten(1), one_hot], 1)


def train_attacker(spec: str, observe: Callable[[torch.Tensor], torch.Tensor], public: torch.Tensor,
                   image_shape: tuple[int, ...], cfg: AttackConfig | None = None,
                   public_labels: torch.Tensor | None = None, num_classes: int = 0) -> nn.Module:
    """A decoder of ``spec`` trained to map ``observe(x)`` to ``x`` over ``public`` ``(M, C, H, W)``.
    ``observe`` is called once per batch (fresh noise each time when it adds noise). With ``public_labels``
    ``(M,)`` the decoder reads ``append_labels(observe(x), y, num_classes)`` instead (a label-aware attacker:
    apply it to ``append_labels(h, labels, num_classes)``)."""
    cfg = cfg or AttackConfig()

    def seen(idx: torch.Tensor) -> torch.Tensor:
        h = observe(public[idx])
        return h if public_labels is None else append_labels(h, public_labels[idx], num_classes)

    with torch.no_grad():
        act_shape = tuple(seen(torch.arange(min(2, public.shape[0]))).shape[1:])
    dec = build_decoder(spec, act_shape, image_shape, seed=cfg.seed)
    opt = torch.optim.Adam(dec.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    dec.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(public.shape[0], generator=g)
        for i in range(0, public.shape[0], cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            with torch.no_grad():
                h = seen(idx)
            opt.zero_grad()
            F.mse_loss(dec(h), public[idx]).backward()
            opt.step()
    return dec.eval()


@torch.no_grad()
def reconstruct(decoder: nn.Module, h: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The decoder's images for activations ``h``."""
    return torch.cat([decoder(h[i:i + batch_size]) for i in range(0, h.shape[0], batch_size)])


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def unsplit_attack(make_local: Callable[[int], nn.Module], h: torch.Tensor, image_shape: tuple[int, ...], *,
                   rounds: int = 40, steps: int = 10, tv: float = 0.05, lr: float = 0.05, seed: int = 0
                   ) -> torch.Tensor:
    """UnSplit-style inversion of activations ``h`` ``(N, ...)`` knowing only the local architecture:
    ``make_local(seed)`` builds a local part with fresh weights. ``rounds`` alternations of ``steps`` Adam
    steps on the images, then on the surrogate. Returns ``(N, *image_shape)`` images in ``(0, 1)``."""
    torch.manual_seed(seed)
    surrogate = make_local(seed)
    surrogate.eval()
    z = torch.zeros(h.shape[0], *image_shape, requires_grad=True)
    opt_x = torch.optim.Adam([z], lr=lr)
    opt_m = torch.optim.Adam(surrogate.parameters(), lr=1e-3)
    for _ in range(rounds):
        for _ in range(steps):
            opt_x.zero_grad()
            x = torch.sigmoid(z)
            (F.mse_loss(surrogate(x), h) + tv * _tv(x)).backward()
            opt_x.step()
        for _ in range(steps):
            opt_m.zero_grad()
            F.mse_loss(surrogate(torch.sigmoid(z).detach()), h).backward()
            opt_m.step()
    return torch.sigmoid(z).detach()
