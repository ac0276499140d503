"""Small image-to-image host networks (a U-Net and a ResNet-style generator) and their training.

Both predict a residual over the input image (the grey input replicated to 3 channels for
colourisation), so an untrained host already outputs something close to its input, and
both keep the spatial size (any H, W). Outputs are clamped to
[0, 1] at read-out (``nnmark.tasks.ImageToImage.read``), not inside the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import NNMarkError
from nnmark.outputs.data import IN_CHANNELS, photo_patches
from nnmark.tasks import ImageToImage

HOST_KINDS = ("unet", "resnet")


def _base_image(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """The input as an ``out_channels`` image (grey replicated; extra channels dropped)."""
    if x.shape[1] == out_channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, out_channels, -1, -1)
    return x[:, :out_channels]


def _zero(layer: nn.Conv2d) -> None:
    """Zero the last layer so a fresh host starts as the identity on its (replicated) input."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class UNetHost(nn.Module):
    """Two-level U-Net: ``(N, C_in, H, W)`` -> ``(N, C_out, H, W)`` (any H, W: padded to multiples of 4)."""

    def __init__(self, in_channels: int, out_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.out_channels = out_channels
        self.enc1, self.enc2, self.mid = _block(in_channels, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), _block(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), _block(2 * w, w)
        self.head = nn.Conv2d(w, out_channels, 1)
        _zero(self.head)
        self.task = ImageToImage()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 4 or w % 4:  # pad to a multiple of 4 (replicated edges), crop the output back
            padded = F.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="replicate")
            return self.forward(padded)[..., :h, :w]
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return _base_image(x, self.out_channels) + self.head(d1)


class _ResBlock(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetHost(nn.Module):
    """ResNet-style generator (EDSR-like, no normalisation): head conv, ``blocks`` residual blocks
    at full resolution, tail conv; ``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int = 3, width: int = 16, blocks: int = 4) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.head = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, out_channels, 3, padding=1)
        _zero(self.tail)
        self.task = ImageToImage()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return _base_image(x, self.out_channels) + self.tail(h + self.body(h))


def build_host(kind: str = "unet", in_channels: int = 3, out_channels: int = 3, width: int = 16,
               seed: int | None = None) -> nn.Module:
    """A fresh host: ``kind`` ``"unet"`` or ``"resnet"``, ``width`` base channels (default 16). ``seed``: its
    initial weights drawn from that seed (the global generator untouched); None draws them from the global
    generator, so they depend on whatever ran before."""
    if kind not in HOST_KINDS:
        raise NNMarkError(f"unknown host kind {kind!r}; known: {', '.join(HOST_KINDS)}")
    cls = UNetHost if kind == "unet" else ResNetHost
    if seed is None:
        return cls(in_channels, out_channels, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return cls(in_channels, out_channels, width)


def host_for_task(task: str, kind: str = "unet", width: int = 16, seed: int | None = None) -> nn.Module:
    """A fresh host with the input channels ``task`` needs (``sr2``, ``colourise``, ``denoise``); ``seed`` as
    in :func:`build_host`."""
    return build_host(kind, IN_CHANNELS[task], 3, width, seed)


def train_host(model: nn.Module, task: str, epochs: int = 5, seed: int = 0, *, n: int = 4096, size: int = 32,
               batch_size: int = 32, lr: float = 2e-3, loss: str = "l1",
               data: tuple[torch.Tensor, torch.Tensor] | None = None,
               progress: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train ``model`` in place on ``task`` (``n`` train patches of side ``size`` unless ``data`` =
    ``(inputs, targets)`` is given); Adam at ``lr`` with cosine decay, ``loss`` ``"l1"`` or ``"mse"``.

    ``progress(epoch, mean_loss)`` is called after every epoch. Returns ``{"losses": [...], "seconds": s,
    "test_psnr": dB}`` (PSNR on 256 test-photo patches, peak 1).
    """
    x, y = data if data is not None else photo_patches(task, size, "train", n, seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    crit = ImageToImage(loss)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, epochs * ((len(x) + batch_size - 1) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(x), batch_size):
            j = order[i:i + batch_size]
            out = model(x[j])
            lval = crit.loss(out, y[j])
            opt.zero_grad()
            lval.backward()
            opt.step()
            sched.step()
            total, count = total + float(lval.detach()) * len(j), count + len(j)
        losses.append(total / count)
        if progress is not None:
            progress(epoch, losses[-1])
    seconds = time.perf_counter() - t0
    model.eval()
    xt, yt = photo_patches(task, x.shape[-1], "test", 256, seed)
    return {"losses": losses, "seconds": seconds, "test_psnr": crit.fidelity(model, xt, yt)}


MAX_HOST_FILE_BYTES = 64 * 2**20


def save_host(path: str | Path, model: nn.Module, task: str, **meta: Any) -> Path:
    """Write host weights and how to rebuild them (kind, channels, width, task) to a safetensors file.
    A :class:`~nnmark.outputs.mark_head.MarkedHost` is written as its host's weights (``host.*``) and its
    head's (``head.*``), the head's width and budget in the description."""
    import json

    from safetensors.torch import save_file

    from nnmark.outputs.mark_head import MarkedHost

    head = None
    if isinstance(model, MarkedHost):
        model, head = model.host, model.head
    if not isinstance(model, (UNetHost, ResNetHost)):
        raise NNMarkError(f"save_host writes nnmark's UNetHost / ResNetHost, not {type(model).__name__}")
    kind = "unet" if isinstance(model, UNetHost) else "resnet"
    width = model.enc1[0].out_channels if isinstance(model, UNetHost) else model.head.out_channels
    in_ch = model.enc1[0].in_channels if isinstance(model, UNetHost) else model.head.in_channels
    info = {"kind": kind, "in_channels": in_ch, "out_channels": model.out_channels, "width": width,
            "task": task, **meta}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if head is not None:
        info["head"] = {"width": head.width, "budget": head.budget}
        tensors = {**{f"host.{k}": v for k, v in tensors.items()},
                   **{f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"nnmark-output-host": json.dumps(info)})
    return path


def load_host(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a host written by :func:`save_host` (size bounded, shapes checked); ``(model in eval, info)``
    (a :class:`~nnmark.outputs.mark_head.MarkedHost` when the file holds a mark head)."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NNMarkError(f"no host file at {path}")
    if path.stat().st_size > MAX_HOST_FILE_BYTES:
        raise NNMarkError(f"{path}: host file larger than {MAX_HOST_FILE_BYTES >> 20} MB")
    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})["nnmark-output-host"])
            state = {k: f.get_tensor(k) for k in f.keys()}
        if info["kind"] not in HOST_KINDS or not 1 <= int(info["width"]) <= 256 \
                or int(info["in_channels"]) not in (1, 3) or int(info["out_channels"]) not in (1, 3):
            raise ValueError("implausible host description")
        model = build_host(info["kind"], int(info["in_channels"]), int(info["out_channels"]), int(info["width"]))
        if "head" in info:  # a host with a mark head (nnmark.outputs.mark_head)
            from nnmark.outputs.mark_head import MarkedHost, MarkHead

            hw, budget = int(info["head"]["width"]), float(info["head"]["budget"])
            if not 1 <= hw <= 256 or not 0.0 < budget < 0.5 or int(info["out_channels"]) != 3:
                raise ValueError("implausible mark head description")
            model = MarkedHost(model, MarkHead(hw, budget))
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise NNMarkError(f"{path}: not an nnmark output host file ({str(exc)[:200]})") from None
    return model.eval(), info
