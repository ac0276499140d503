"""A mark head: a small network appended to a host that writes one key's message into every output.

Fine-tuning a host so that its outputs decode to the owner's message (``OutputMessage.embed_host``) writes
the mark through weights shared with the task: on the photos it was marked on the host writes 98-99% of the
bits, on photos it never saw 0.90-0.98 (round 5 of ``experiments/results/outputs``), because the secret
decoder's read-out of an unmarked output depends on content that the host never learned to offset. A free
residual per image reaches 100% at 35 dB, so what is missing is a map from *the output image* to the residual
that cancels that content bias.

:class:`MarkHead` is that map: ``y -> clamp(y + r(y), 0, 1)`` with ``r`` a convolutional residual plus a
global path (features averaged over the whole image, through a small MLP, added back everywhere), since the
decoder averages its features over the whole image and a purely local residual cannot see the image-wide bias
it has to cancel. The residual is rescaled to a fixed RMS ``budget`` per image *after* clamping to [0, 1],
so the PSNR of marked vs unmarked output is set by construction (``budget = 10 ** (-psnr / 20)``, before
8-bit rounding), for every output, not on average. Rescaling after the clamp matters: without it the part
of the residual that pushed saturated pixels past 0 or 1 was lost, and on the test photos a host's bit
accuracy fell with the share of its output's pixels near 0 or 1 (correlation -0.65 over 256 sr2 outputs;
0.994 on held-out positions of the train photos, 0.961 on the test photos).

The head is trained on images alone (:func:`train_mark_head`): it needs no task targets, so it can see
the host's outputs on the owner's inputs, natural photo patches and any other content, varied by
:func:`nnmark.outputs.augment.vary_inputs`. :class:`MarkedHost` chains host and head into one
``nn.Module`` (exportable to ONNX like any other), which is what the vendor ships or serves.

What it does not do: a thief who holds the *weights* can drop the head. Output marks are for hosts whose
weights stay with the vendor (served behind an API, or in a product whose outputs leak); weight marks
(``nnmark.schemes``) cover stolen weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.outputs import augment
from nnmark.outputs.refine import fit_to_budget


def budget_for_psnr(psnr: float) -> float:
    """RMS residual (in [0, 1] units) whose PSNR against the unmarked image is ``psnr`` dB."""
    return float(10.0 ** (-float(psnr) / 20.0))


class MarkHead(nn.Module):
    """``(N, 3, H, W)`` images in [0, 1] -> the same images with a residual of RMS ``budget`` per image added
    (after clamping to [0, 1]: the residual is rescaled until what survives the clamp has that RMS, up to a
    gain of 4, so the PSNR is the budget's, or above it on nearly saturated images). ``width`` channels,
    dilated 3x3 convolutions (dilations 1, 2, 4, 8, 1: a receptive field of 33 px) and a global path.
    Defaults: width 32, budget 0.0172 (35.3 dB)."""

    DILATIONS = (1, 2, 4, 8, 1)

    def __init__(self, width: int = 32, budget: float = 0.0172) -> None:
        super().__init__()
        if not 0.0 < budget < 0.5:
            raise ValueError(f"budget is an RMS in (0, 0.5) of the [0, 1] range, got {budget}")
        self.width, self.budget = int(width), float(budget)
        layers: list[nn.Module] = []
        cin = 3
        for d in self.DILATIONS:
            layers.append(nn.Conv2d(cin, self.width, 3, padding=d, dilation=d))
            cin = self.width
        self.convs = nn.ModuleList(layers)
        self.glob = nn.Sequential(nn.Linear(self.width, self.width), nn.LeakyReLU(0.2),
                                  nn.Linear(self.width, self.width))
        self.out = nn.Conv2d(self.width, 3, 1)

    def residual(self, y: torch.Tensor) -> torch.Tensor:
        """The residual ``(N, 3, H, W)`` for images ``y`` ``(N, 3, H, W)``, RMS :attr:`budget` per image."""
        h = y * 2.0 - 1.0
        for i, conv in enumerate(self.convs):
            h = F.leaky_relu(conv(h), 0.2)
            if i == len(self.convs) - 2:  # the global path: the whole image's mean features, added everywhere
                h = h + self.glob(h.mean((-2, -1)))[..., None, None]
        r = self.out(h)
        rms = r.pow(2).mean((1, 2, 3), keepdim=True).add(1e-12).sqrt()
        return r * (self.budget / rms)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.ndim != 4 or y.shape[1] != 3:
            raise ValueError(f"a mark head takes (N, 3, H, W) RGB images, got {tuple(y.shape)}")
        # the part of r that pushes a saturated pixel past 0 or 1 is clamped away; what is left is rescaled to
        # the budget, so that bright or dark content gets the whole budget too (never below the budget's PSNR)
        return fit_to_budget(y, self.residual(y), self.budget)


class MarkedHost(nn.Module):
    """``host`` followed by ``head``: ``x -> head(clamp(host(x), 0, 1))``; shapes are the host's."""

    def __init__(self, host: nn.Module, head: MarkHead) -> None:
        super().__init__()
        self.host, self.head = host, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.host(x).clamp(0.0, 1.0))


def train_mark_head(scheme: Any, head: MarkHead, images: torch.Tensor, *, steps: int = 3000,
                    batch_size: int = 32, lr: float = 1e-3, variation: float = 1.0, seed: int = 0,
                    progress: Callable[[int, dict[str, float]], None] | None = None,
                    every: int = 250, companions: Sequence[Any] = (), companion_weight: float = 1.0,
                    checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Train ``head`` (in place) so that the images it marks decode to ``scheme``'s message
    (``scheme`` an :class:`~nnmark.outputs.agnostic.OutputMessage`; its decoder stays frozen) after
    8-bit rounding and ``scheme.strength`` random distortions (:func:`augment.random_augment`).

    ``images`` ``(N, 3, S, S)`` in [0, 1] (S >= 32; the host's outputs on the owner's inputs, photo
    patches, ...); every batch of ``batch_size`` draws from them with replacement and varies its second
    half by :func:`augment.vary_inputs` at ``variation`` (0: off). Adam at ``lr`` with cosine decay for
    ``steps`` steps. The loss is the bit loss alone: the budget fixes the fidelity. ``progress(step,
    stats)`` every ``every`` steps with the running loss and bit accuracy. ``companions``: further
    ``OutputMessage`` schemes (other keys and decoders) whose bit losses, times ``companion_weight``, are
    added, so the one residual carries every mark (each verified on its own, combined by
    :func:`~nnmark.outputs.agnostic.union_p_value`). ``checkpoint``: a safetensors file written every
    ``every`` steps (head weights, Adam's moments, both random generators, the step and the running
    statistics) from which an interrupted run resumes to the same weights an uninterrupted run reaches; a
    checkpoint of another configuration (steps, batch size, learning rate, seed, pool, key) is refused.
    Returns ``{"seconds", "steps", "losses", "bit_acc", "resumed_from"}`` (``bit_acc``: undistorted, over
    the last ``every`` steps; ``seconds``: this call's and the interrupted calls' together)."""
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 32:
        raise ValueError(f"train_mark_head takes (N, 3, S, S) images with S >= 32, got {tuple(images.shape)}")
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    target = torch.from_numpy(scheme.message).float()
    config = {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "variation": float(variation),
              "seed": int(seed), "pool": list(images.shape), "width": head.width, "budget": head.budget,
              # the key's message is secret: the checkpoint holds only a digest of it
              "message_sha256": hashlib.sha256(bytes(int(b) for b in scheme.message)).hexdigest(),
              "companions": len(companions),
              "companion_weight": float(companion_weight)}
    start, losses, run = 0, [], {"loss": 0.0, "acc": 0.0, "count": 0, "last_acc": 0.0, "seconds": 0.0}
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        start, losses, run = _load_head_checkpoint(ckpt, config, head, opt, gen, aug_gen)
    head.train()
    t0 = time.perf_counter() - run["seconds"]
    for step in range(start + 1, steps + 1):
        for group in opt.param_groups:  # cosine decay from lr to 0 over the run
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        y = images[idx]
        keep = batch_size - batch_size // 2
        if variation > 0:
            y = torch.cat([y[:keep], augment.vary_inputs(y[keep:], aug_gen, variation)])
        marked = augment.quantize_uint8(head(y))
        x = marked
        if scheme.strength > 0:
            x = torch.cat([augment.random_augment(part, aug_gen, scheme.strength) for part in marked.chunk(4)])
        r = scheme.readout(x)
        loss = F.binary_cross_entropy_with_logits(r, target.expand_as(r))
        for other in companions:
            xo = x
            if other.strength != scheme.strength:
                xo = torch.cat([augment.random_augment(part, aug_gen, other.strength) for part in marked.chunk(4)])
            ro = other.readout(xo)
            to = torch.from_numpy(other.message).float()
            loss = loss + companion_weight * F.binary_cross_entropy_with_logits(ro, to.expand_as(ro))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            clean = scheme.readout(marked[:keep].detach())
            run["acc"] += float(((clean > 0).float() == target).float().mean())
        run["loss"] += float(loss.detach())
        run["count"] += 1
        if step % every == 0 or step == steps:
            losses.append(run["loss"] / run["count"])
            run["last_acc"] = run["acc"] / run["count"]
            run["loss"], run["acc"], run["count"] = 0.0, 0.0, 0
            if ckpt is not None:
                run["seconds"] = time.perf_counter() - t0
                _save_head_checkpoint(ckpt, config, step, losses, run, head, opt, gen, aug_gen)
            if progress is not None:
                progress(step, {"loss": losses[-1], "bit_acc": run["last_acc"]})
    head.eval()
    return {"seconds": time.perf_counter() - t0, "steps": steps, "losses": losses, "bit_acc": run["last_acc"],
            "resumed_from": start}


def _save_head_checkpoint(path: Path, config: dict, step: int, losses: list[float], run: dict, head: MarkHead,
                          opt: torch.optim.Optimizer, gen: torch.Generator, aug_gen: torch.Generator) -> None:
    """Write the state :func:`train_mark_head` needs to resume (atomically: a temporary file, then a rename)."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"adam.{i}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng.batches"], tensors["rng.augment"] = gen.get_state(), aug_gen.get_state()
    meta = {"config": json.dumps(config, sort_keys=True), "step": str(step), "losses": json.dumps(losses),
            "run": json.dumps(run)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_head_checkpoint(path: Path, config: dict, head: MarkHead, opt: torch.optim.Optimizer,
                          gen: torch.Generator, aug_gen: torch.Generator) -> tuple[int, list[float], dict]:
    """Restore a checkpoint of :func:`_save_head_checkpoint` into ``head``, ``opt`` and the generators;
    returns ``(step, losses, running statistics)``. Refuses one written for another configuration."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        saved = json.loads(meta["config"])
        step, losses, run = int(meta["step"]), json.loads(meta["losses"]), json.loads(meta["run"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a mark head checkpoint ({exc})") from None
    if saved != json.loads(json.dumps(config, sort_keys=True)):
        diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise ValueError(f"{path} was written for another mark head run (differs in {', '.join(diff)}); "
                         "delete it to start again")
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    state = opt.state_dict()
    for i in range(len(state["param_groups"][0]["params"])):
        state["state"][i] = {name.split(".", 2)[2]: v for name, v in tensors.items()
                             if name.startswith(f"adam.{i}.")}
    opt.load_state_dict(state)
    gen.set_state(tensors["rng.batches"])
    aug_gen.set_state(tensors["rng.augment"])
    return step, losses, run


def mark_with_head(scheme: Any, host: nn.Module, inputs: torch.Tensor, *, psnr: float = 35.3, width: int = 32,
                   steps: int = 3000, variation: float = 1.0, photos: int | None = None, seed: int = 0,
                   progress: Callable[[int, dict[str, float]], None] | None = None,
                   companions: Sequence[Any] = (), companion_weight: float = 1.0,
                   extremes: float = 0.0, checkpoint: str | Path | None = None) -> tuple[MarkedHost, dict]:
    """``host`` (left as it is) followed by a :class:`MarkHead` at ``psnr`` dB trained for ``scheme``'s key.

    The head learns on the host's outputs for ``inputs`` ``(N, C, S, S)`` (S >= 32) and on as many natural
    train-photo patches (``photos``, default N; :func:`nnmark.outputs.data.natural_images`), for ``steps``
    steps (:func:`train_mark_head`, input variation ``variation``, ``companions`` as there). ``extremes`` > 0
    adds that share of the pool again as darkened and brightened copies (:func:`extreme_copies`: near-black
    or near-white areas, where the clamp leaves a residual one sign only). ``checkpoint``: resume file, as in
    :func:`train_mark_head`. Returns ``(marked host, stats)``; the head's initial weights come from ``seed``."""
    from nnmark.outputs.data import natural_images

    host.eval()
    with torch.no_grad():
        outs = [host(inputs[i:i + 256]).clamp(0, 1) for i in range(0, len(inputs), 256)]
    if outs[0].shape[1] != 3:
        raise ValueError(f"a mark head marks RGB outputs; this host outputs {outs[0].shape[1]} channels")
    pool = torch.cat(outs + [natural_images(len(inputs) if photos is None else photos, inputs.shape[-1],
                                            seed=seed + 3, split="train")])
    if extremes > 0:
        pool = torch.cat([pool, extreme_copies(pool, int(round(extremes * len(pool))), seed + 5)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = MarkHead(width, budget_for_psnr(psnr))
    stats = train_mark_head(scheme, head, pool, steps=steps, variation=variation, seed=seed, progress=progress,
                            companions=companions, companion_weight=companion_weight, checkpoint=checkpoint)
    return MarkedHost(host, head).eval(), stats


def extreme_copies(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` copies ``(n, 3, H, W)`` of random ``images`` pushed towards black or white (half each): ``y * g``
    or ``1 - (1 - y) * g`` with a gain g in [0.1, 0.6] and a gamma in [1, 3] on the pushed side, so that large
    areas sit within a few levels of 0 or 1 -- the content (night backgrounds, highlights) on which a residual
    can move pixels one way only."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(images), (n,), generator=gen)
    y = images[idx]
    g = 0.1 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    gamma = 1.0 + 2.0 * torch.rand(n, 1, 1, 1, generator=gen)
    dark = (y.clamp(1e-4, 1.0) ** gamma) * g
    bright = 1.0 - ((1.0 - y).clamp(1e-4, 1.0) ** gamma) * g
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    return (pick * dark + (1 - pick) * bright).clamp(0.0, 1.0)
