"""Output marks read by a message-agnostic extractor (``output-message``): every image the marked host
outputs decodes, under the owner's key, to the key's message.

How it works (the approach of HiDDeN / Stable Signature, :mod:`nnmark.outputs.extractor`):

1. a decoder pre-trained to read *any* ``k``-bit message hidden by its encoder, robust to crop, noise,
   JPEG and resizing, calibrated on natural photos (mean ``mu``, whitening ``W``);
2. the key draws the message ``m`` (``k`` uniform bits), a secret orthogonal rotation ``R`` ``(k, k)`` and
   nothing else; the keyed read-out of an image is ``r = R W (decoder(x) - mu) - c``, with ``c`` the
   per-bit median of ``R W (decoder(x) - mu)`` over unmarked train-photo images
   (:func:`~nnmark.outputs.extractor.calibration_images`); bit ``i`` is ``r_i > 0``.
   On unmarked natural images ``r`` has zero median, unit variance and no correlation across bits, and
   without ``R`` the decoder's own logits say nothing about the bits;
3. the host ``G`` is fine-tuned (:meth:`OutputMessage.embed_host`) so that
   ``BCE(r(distort(G(x))), m) + fidelity * MSE(G(x), G0(x)) / mse_at(psnr_target)`` is small, ``G0`` the
   unmarked host (frozen), the distortion drawn per quarter-batch by
   :func:`nnmark.outputs.augment.random_augment` after 8-bit quantisation.

Marking on a few photos for photos never seen: a host fine-tuned on the owner's 7 train photos writes the mark
almost perfectly on them and on other positions of them, and worse on other photos (sr2 0.99 -> 0.89 bit
accuracy on the test photos, ``experiments/outputs/mark_generalisation.py``): the decoder's read-out depends on
content, and the host learns to offset it only for the content it saw. ``input_variation`` (default off) varies
half of every batch of inputs (:func:`nnmark.outputs.augment.vary_inputs`: flips, rotations, zooms, gains,
gammas), and ``psnr_floor`` (default off) adapts the fidelity weight so that long runs keep their PSNR;
``embed_host(companions=...)`` adds marks of further keys / decoders to the same host (combined by
:func:`union_p_value`). Figures: ``experiments/results/outputs/README.md``, round 5.

Decoders (parameter ``extractor``): ``"shipped"``, the learned decoder above (public: whoever installs
nnmark holds it, so it is a removal oracle for a thief), ``"shipped-luma2"``, the same pre-training behind a
2 x 2 luma front end (for a companion mark that survives JPEG and resizing, :func:`union_verdict`), and
``"keyed"``, a fixed low-pass decoder whose filters are drawn from the key
(:mod:`nnmark.outputs.keyed_decoder`; robust to JPEG and resizing by construction, secret with the key,
calibrated the same way). A safetensors path selects an owner's own pre-trained decoder.

Verification (:meth:`OutputMessage.verify`) reads a batch of images (one image is a batch of one): each
image is cut into ``tile`` x ``tile`` tiles (a smaller image is upsampled, a grey one replicated, an alpha
channel dropped), the calibrated read-outs (soft, before any sign) are averaged over the tiles and the
images, and only then are the ``k`` signs compared with ``m``: ``p = P[Binomial(k, 1/2) >= matches]`` -- a
batch of 16 outputs is still ``k`` bits of evidence (never 16 ``k``), each bit read from a mean in which
the mark adds up while the images' own content averages out. The null is exact over the key's randomness
(``m`` is uniform and independent of any image made without this key -- which needs the key committed before the
suspect images existed, :mod:`nnmark.commitment`). For one *fixed* key the false-positive rate over
negatives is measured by ``experiments/outputs/fpr_study.py`` (natural photos, unmarked host outputs,
outputs of hosts marked under other keys).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.outputs import augment
from nnmark.outputs.extractor import Extractor, calibration_images, load_shipped, load_shipped_luma2
from nnmark.outputs.keyed_decoder import KeyedLowpassDecoder
from nnmark.params import Param, Params
from nnmark.schemes.base import Scheme
from nnmark.stats import Verdict, bit_match_verdict, soft_bit_verdict
from nnmark.train import TrainingHook

TILE = 32
#: the soft test's clip on one bit's weight, in null standard deviations of the calibrated read-out
SOFT_CLIP = 3.0
MAX_TILES_PER_IMAGE = 256
CALIBRATION_PATCHES = 2048
CALIBRATION_SEED = 7919
#: natural patches the keyed decoder's mean / whitening is fitted on (train photos, seed 1)
KEYED_CALIBRATION_PATCHES = 4096
#: unmarked patches per crop geometry from which the read-out's centre for that geometry is taken
#: (OutputMessage.geometry_offsets)
GEOMETRY_PATCHES = 512


def keyed_extractor(key: Key, bits: int = 48) -> Extractor:
    """The keyed low-pass decoder (:mod:`nnmark.outputs.keyed_decoder`) of ``key``, its filters and mixing
    drawn from ``key``, calibrated (mean, whitening) on :data:`KEYED_CALIBRATION_PATCHES` train-photo
    patches (:func:`~nnmark.outputs.extractor.calibration_images`)."""
    dec = KeyedLowpassDecoder(bits, generator=key.torch_generator("output-message/keyed-decoder"))
    ext = Extractor(dec, meta={"kind": "keyed", **dec.spec()})
    ext.calibrate(calibration_images(KEYED_CALIBRATION_PATCHES, TILE, 1))
    return ext


def _orthogonal(rng: np.random.Generator, k: int) -> torch.Tensor:
    """A uniformly random ``(k, k)`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    q = q * np.sign(np.diag(r))
    return torch.from_numpy(q).float()


#: a row or column whose every pixel is at most this (all channels, [0, 1] units) counts as zeroed by a crop
EMPTY_LEVEL = 4 / 255


def content_box(img: torch.Tensor, level: float = EMPTY_LEVEL) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (end-exclusive) of the rows / columns of ``img`` ``(C, H, W)`` holding
    any pixel above ``level`` (default :data:`EMPTY_LEVEL`): what is left of an image after a crop that keeps
    a rectangle and zeroes the rest. The whole image when nothing is above ``level``."""
    lit = img.amax(0) > level
    rows, cols = torch.nonzero(lit.any(1)).flatten(), torch.nonzero(lit.any(0)).flatten()
    if len(rows) == 0:
        return 0, img.shape[-2], 0, img.shape[-1]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def prepare_images(images: torch.Tensor | Sequence[torch.Tensor], tile: int = TILE,
                   max_tiles: int = MAX_TILES_PER_IMAGE, size: tuple[int, int] | None = None,
                   trim: bool = True) -> tuple[torch.Tensor, list[int], list[str]]:
    """Tiles for reading: ``images`` ``(N, C, H, W)`` or a list of ``(C, H, W)`` / ``(1, C, H, W)`` tensors in
    [0, 1] -> ``(tiles (T, 3, tile, tile), tiles per image, notes)``, in this order:

    1. C = 1 is replicated, C = 4 loses its alpha channel, other channel counts are refused;
    2. ``size`` ``(H, W)``: each image is first resized to it (bilinear, antialiased when shrinking) -- the
       verifier who knows the host's output size undoes a rescale this way;
    3. ``trim`` (default on): when the image's :func:`content_box` is smaller than the image and at least
       ``tile`` on both sides, only the tiles of the image's own aligned grid wholly inside the box are read
       (a crop that zeroed all but a square keeps the original coordinates, so these tiles are the host's
       own; from the box's corner when no grid tile fits). This is a function of the image alone (no key,
       no search over offsets), so it adds no multiple testing;
    4. an image smaller than ``tile`` on a side is upsampled (bilinear) so its short side is ``tile``;
    5. the aligned ``tile`` x ``tile`` grid from the top-left corner (a partial last row / column is
       dropped), at most ``max_tiles`` evenly spaced tiles per image."""
    items = list(images) if not isinstance(images, torch.Tensor) else list(images.unbind(0))
    tiles, counts, notes = [], [], []
    for i, img in enumerate(items):
        img = img.squeeze(0) if img.ndim == 4 and img.shape[0] == 1 else img
        if img.ndim != 3:
            raise SchemeError(f"image {i}: expected (C, H, W), got shape {tuple(img.shape)}")
        c, h, w = img.shape
        if c == 4:
            img, note = img[:3], ["alpha channel dropped"]
        elif c == 1:
            img, note = img.expand(3, -1, -1), ["grey replicated to RGB"]
        elif c == 3:
            note = []
        else:
            raise SchemeError(f"image {i}: {c} channels; only 1 (grey), 3 (RGB) or 4 (RGBA) are read")
        if not bool(torch.isfinite(img).all()):
            raise SchemeError(f"image {i}: holds NaN or infinite pixels; refused (no reading is made of it)")
        img = img.float().clamp(0.0, 1.0)
        if size is not None and (h, w) != tuple(size):
            img = F.interpolate(img[None], size=tuple(size), mode="bilinear", align_corners=False,
                                antialias=size[0] < h or size[1] < w)[0].clamp(0.0, 1.0)
            note.append(f"resized from {h}x{w} to {size[0]}x{size[1]}")
            h, w = img.shape[-2:]
        if trim:
            top, bottom, left, right = content_box(img)
            if (bottom - top, right - left) != (h, w) and min(bottom - top, right - left) >= tile:
                # the tiles of the image's own grid that lie wholly inside the box; the box's corner if none does
                r0, c0 = -(-top // tile) * tile, -(-left // tile) * tile
                if r0 + tile <= bottom and c0 + tile <= right:
                    top, left = r0, c0
                img = img[:, top:bottom, left:right]
                note.append(f"read rows {top}:{bottom}, columns {left}:{right} (the rest is zero)")
                h, w = img.shape[-2:]
        if min(h, w) < tile:
            s = tile / min(h, w)
            img = F.interpolate(img[None], size=(max(tile, round(h * s)), max(tile, round(w * s))),
                                mode="bilinear", align_corners=False)[0]
            note.append(f"upsampled from {h}x{w}")
            h, w = img.shape[-2:]
        grid = img[:, : h // tile * tile, : w // tile * tile].unfold(1, tile, tile).unfold(2, tile, tile)
        t = grid.permute(1, 2, 0, 3, 4).reshape(-1, 3, tile, tile)
        if len(t) > max_tiles:
            t = t[torch.linspace(0, len(t) - 1, max_tiles).round().long()]
        tiles.append(t)
        counts.append(len(t))
        if note:
            notes.append(f"image {i}: {', '.join(note)}")
    if not tiles:
        raise SchemeError("no images to read")
    return torch.cat(tiles), counts, notes


#: offsets of training windows and of the tiles read are multiples of this: the feature stride of the learned
#: decoders (rgb 4, luma2 8) and the pooling period of the U-Net host (4) divide it, so a mark locked to that
#: phase reads the same in every window
WINDOW_STRIDE = 8


def random_windows(images: torch.Tensor, tile: int, count: int, gen: torch.Generator | None = None,
                   stride: int = WINDOW_STRIDE) -> torch.Tensor:
    """``count`` ``tile`` x ``tile`` windows of ``images`` ``(N, C, H, W)`` at uniformly random offsets that are
    multiples of ``stride`` (one offset per window for the whole batch) -> ``(count * N, C, tile, tile)``.
    Training reads these, so the host must write a mark that every window holds wherever it lies -- one
    that repeats over the image, not one anchored to the patch border."""
    h, w = images.shape[-2:]
    out = []
    for _ in range(count):
        r = stride * int(torch.randint(0, (h - tile) // stride + 1, (1,), generator=gen))
        c = stride * int(torch.randint(0, (w - tile) // stride + 1, (1,), generator=gen))
        out.append(images[..., r:r + tile, c:c + tile])
    return torch.cat(out)


class OutputMarkHook(TrainingHook):
    """Adds the mark loss to nnmark's training loop: remembers each batch's inputs (``augment_batch``) and
    returns :meth:`OutputMessage.mark_loss` of the model's outputs on them (a second forward pass)."""

    def __init__(self, scheme: OutputMessage, reference: nn.Module | None = None) -> None:
        self.scheme, self.reference = scheme, reference
        self._x: torch.Tensor | None = None
        self.gen = scheme.key.torch_generator("output-message/augment")

    def augment_batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        self._x = x
        return x, y

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        if self._x is None:
            return None
        if self.reference is None:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        with torch.no_grad():
            ref = self.reference(self._x)
        return self.scheme.mark_loss(model(self._x), ref, self.gen)


class OutputMessage(Scheme):
    """A ``k``-bit message in every output image of a host, read by a secret calibrated extractor
    (module docs). Parameters: the extractor (``"shipped"`` or a safetensors path), the fidelity weight,
    the PSNR target the fidelity term is scaled to, distortion strength, fine-tuning epochs and rate."""

    name = "output-message"
    access = "black-box"
    PARAMS = Params(
        Param("extractor", str, "shipped",
              "'shipped' (pre-trained, public), 'shipped-luma2' (the same behind a 2x2 luma front end; for a "
              "companion mark), 'keyed' (fixed low-pass decoder drawn from the key) or a safetensors file"),
        Param("fidelity", float, 0.05, "weight of MSE(marked, unmarked output) / mse at psnr_target", low=0.0),
        Param("psnr_target", float, 40.0, "PSNR (dB) at which the fidelity term equals its weight",
              low=10.0, high=80.0),
        Param("strength", float, 0.5, "distortion strength while fine-tuning (0: none, 1: full)",
              low=0.0, high=1.0),
        Param("epochs", int, 12, "fine-tuning epochs over the host's training inputs", low=1, high=1000),
        Param("lr", float, 2e-3, "fine-tuning learning rate (Adam)", low=0.0),
        Param("windows", int, 4, "random 32 px windows read per output while fine-tuning on outputs of >= 64 px",
              low=1, high=64),
        Param("input_variation", float, 0.0, "strength of random flips, rotations, zooms, gains and gammas of the "
              "host's inputs while fine-tuning (augment.vary_inputs; 0: off)", low=0.0, high=1.0),
        Param("psnr_floor", float, 0.0, "when > 0, the fidelity weight adapts during fine-tuning so that the "
              "PSNR of marked vs unmarked outputs stays at or above this (dB); 0: a fixed weight", low=0.0, high=80.0),
    )
    VERIFY_PARAMS = Params()

    def __init__(self, key: Key, extractor: Extractor, *, fidelity: float = 0.05, psnr_target: float = 40.0,
                 strength: float = 0.5, epochs: int = 12, lr: float = 2e-3, extractor_name: str = "shipped",
                 centre: torch.Tensor | None = None, windows: int = 4, input_variation: float = 0.0,
                 psnr_floor: float = 0.0) -> None:
        super().__init__(key)
        self.extractor = extractor.eval()
        self.bits = extractor.bits
        self.fidelity, self.psnr_target, self.strength = float(fidelity), float(psnr_target), float(strength)
        self.epochs, self.lr, self.extractor_name = int(epochs), float(lr), str(extractor_name)
        self.windows = int(windows)
        self.input_variation = float(input_variation)
        self.psnr_floor = float(psnr_floor)
        self.message = key.numpy_rng("output-message/message").integers(0, 2, self.bits).astype(np.int64)
        self.rotation = _orthogonal(key.numpy_rng("output-message/rotation"), self.bits)
        self._target = torch.from_numpy(self.message).float()
        self.centre = torch.zeros(self.bits)
        if centre is None:
            u = extractor.calibration_readout(CALIBRATION_PATCHES, CALIBRATION_SEED)
            centre = (u @ self.rotation.T).median(0).values
        self.centre = centre.float().clone()

    @classmethod
    def build(cls, key: Key, model: nn.Module | None = None, data: Any = None, *, extractor: str = "shipped",
              **params: Any) -> OutputMessage:
        if extractor == "keyed":
            ext = keyed_extractor(key)
        elif extractor == "shipped":
            ext = load_shipped()
        elif extractor == "shipped-luma2":
            ext = load_shipped_luma2()
        else:
            ext = Extractor.load(extractor)
        named = extractor in ("shipped", "shipped-luma2", "keyed")
        return cls(key, ext, extractor_name=extractor if named else Path(extractor).name, **params)

    # -- read-out ---------------------------------------------------------------
    def readout(self, tiles: torch.Tensor) -> torch.Tensor:
        """Keyed read-out ``(N, k)`` of ``tiles`` ``(N, 3, H, W)`` (differentiable; bits are ``> 0``)."""
        out = []
        for i in range(0, len(tiles), 1024):
            z = self.extractor(tiles[i:i + 1024]) @ self.rotation.T.to(tiles.device)
            out.append(z - self.centre.to(tiles.device))
        return torch.cat(out)

    @torch.no_grad()
    def image_readouts(self, images: torch.Tensor | Sequence[torch.Tensor],
                       size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[str]]:
        """Per-image read-outs ``(N, k)`` (means over each image's tiles, :func:`prepare_images`; ``size``
        resizes every image to the host's output size first) and notes on conversions."""
        tiles, counts, notes = prepare_images(images, size=size)
        r = self.readout(tiles) - self.geometry_offsets(tiles)
        return torch.stack([part.mean(0) for part in r.split(counts)]), notes

    @torch.no_grad()
    def geometry_offsets(self, tiles: torch.Tensor, snap: int = 1) -> torch.Tensor:
        """Per-tile centres ``(T, k)`` for tiles ``(T, 3, 32, 32)`` that are partly zeroed: a tile whose
        :func:`content_box` is smaller than the tile (a crop of a 32 px output keeps a square and zeroes the
        rest; no whole tile is left to read) gets the per-bit median read-out of :data:`GEOMETRY_PATCHES`
        unmarked calibration patches zeroed outside the same box; whole tiles get 0.

        Why: the decoder's read-out of an image that is mostly zero carries a large bias of its own, the same
        for every image cropped alike, which a batch's average does not shrink; bits whose bias opposes the
        message are read wrong in every image of the batch. Subtracting the bias of unmarked images of the
        same geometry centres the read-out again. The offset is a function of the image's zero pattern, the
        decoder and the key's rotation, never of the message, so the null (each sign matches the uniform
        message with probability 1/2) is unchanged; the rate on cropped negatives is measured in
        experiments/results/outputs (fpr_study.py --cropped).

        ``snap`` > 1 (pixels; marking loops only, never the verifier): each box edge is rounded to the nearest
        multiple of ``snap`` before the lookup -- an approximate centre from a few dozen cached geometries
        instead of an exact one for each of the thousands a loop of random crops meets."""
        if snap < 1:
            raise ValueError(f"snap must be >= 1 pixel, got {snap}")
        out = torch.zeros((len(tiles), self.bits))
        if tiles.shape[-2:] != (TILE, TILE):
            return out
        cache = self.__dict__.setdefault("_geometry_cache", {})
        for i, t in enumerate(tiles):
            box = content_box(t)
            if snap > 1:
                box = tuple(min(TILE, snap * round(v / snap)) for v in box)
                if box[0] == box[1] or box[2] == box[3]:  # a sliver rounded away: keep the exact box
                    box = content_box(t)
            if box == (0, TILE, 0, TILE):
                continue
            if box not in cache:
                u = self.extractor.masked_calibration_readout(box, GEOMETRY_PATCHES, CALIBRATION_SEED)
                cache[box] = (u @ self.rotation.T - self.centre).median(0).values
            out[i] = cache[box]
        return out

    @torch.no_grad()
    def matches(self, images: torch.Tensor | Sequence[torch.Tensor], group: int = 1,
                size: tuple[int, int] | None = None) -> np.ndarray:
        """Matched bits per group of ``group`` consecutive images ``(N // group,)`` (read-outs averaged in
        each group; ``size`` as in :meth:`verify`) -- the raw statistic behind :meth:`verify`, for
        false-positive studies."""
        r, _ = self.image_readouts(images, size)
        n = len(r) // group * group
        bits = (r[:n].view(-1, group, self.bits).mean(1) > 0).long().numpy()
        return (bits == self.message[None]).sum(1)

    def p_values(self, images: torch.Tensor | Sequence[torch.Tensor], group: int = 1,
                 size: tuple[int, int] | None = None, test: str = "binomial") -> np.ndarray:
        """p-values per group of ``group`` consecutive images: ``test="binomial"`` on the matched signs (see
        :meth:`matches`), ``"soft"`` the soft sign test on the group's mean read-out
        (:func:`~nnmark.stats.soft_bit_verdict`); both by :func:`readout_p_values`."""
        if test not in ("binomial", "soft"):
            raise SchemeError(f"unknown test {test!r}: 'binomial' or 'soft'")
        r, _ = self.image_readouts(images, size)
        n = len(r) // group * group
        return readout_p_values(r[:n].view(-1, group, self.bits).mean(1), self.message, test)

    # -- embedding ------------------------------------------------------------------
    def mark_loss(self, outputs: torch.Tensor, reference: torch.Tensor,
                  gen: torch.Generator | None = None, fidelity: float | None = None) -> torch.Tensor:
        """``BCE(readout(distort(quantise(outputs))), m) + fidelity * MSE(outputs, reference) / mse_target``
        (``fidelity`` default :attr:`fidelity`).
        Outputs of at least twice :data:`TILE` on a side are read as :attr:`windows` random ``TILE`` windows
        each (:func:`random_windows`; the distortion drawn then leaves out the crop, whose kept tiles the
        verifier reads whole)."""
        x = augment.quantize_uint8(outputs)
        tiled = min(x.shape[-2:]) >= 2 * TILE
        if self.strength > 0:
            x = torch.cat([augment.random_augment(part, gen, self.strength, crop=not tiled) for part in x.chunk(4)])
        if tiled:
            x = random_windows(x, TILE, self.windows, gen)
        r = self.readout(x)
        bce = F.binary_cross_entropy_with_logits(r, self._target.to(r).expand_as(r))
        mse_target = 10.0 ** (-self.psnr_target / 10.0)
        weight = self.fidelity if fidelity is None else float(fidelity)
        return bce + weight * F.mse_loss(outputs, reference) / mse_target

    def training_hook(self) -> TrainingHook:
        return OutputMarkHook(self)

    def embed_host(self, model: nn.Module, inputs: torch.Tensor, *, targets: torch.Tensor | None = None,
                   task_weight: float = 0.0, batch_size: int = 32, seed: int = 0,
                   progress: Callable[[int, dict[str, float]], None] | None = None,
                   checkpoint: str | Path | None = None, reference: nn.Module | None = None,
                   companions: Sequence[OutputMessage] = (), companion_weight: float = 1.0) -> dict[str, Any]:
        """Fine-tune ``model`` (in place) so its outputs on ``inputs`` ``(N, C, H, W)`` carry the mark,
        for :attr:`epochs` epochs of Adam at :attr:`lr`. ``targets`` with ``task_weight`` > 0 adds the task's
        L1 loss. ``checkpoint``: a file written after every epoch (safetensors: model weights, optimiser-free)
        from which an interrupted run resumes. ``progress(epoch, stats)`` after every epoch.
        ``reference``: the unmarked host the fidelity term compares with (default: ``model`` as it is at the
        start; give it when ``model`` starts from an earlier marking).
        With :attr:`input_variation` > 0 (and no task term) the second half of every batch of inputs is varied
        (:func:`nnmark.outputs.augment.vary_inputs`) and both hosts see the varied batch: the owner's few photos
        then stand for more kinds of content, which is what carries the mark to photos never trained on.
        With :attr:`psnr_floor` > 0 the fidelity weight starts at :attr:`fidelity` and, after every batch, is
        multiplied by ``exp(0.1 * clip(psnr_floor - batch PSNR, -1, 1))`` (PSNR over the batch's unvaried half:
        the mark is weaker on varied inputs, so they would hide a drift on the real ones), kept within 1/100 and
        1,000 times its start: a dual step that holds the marked outputs near the floor however long the run, instead of
        letting a fixed weight drift below it as the mark grows.
        ``companions``: other :class:`OutputMessage` schemes (other keys, other decoders) whose mark terms
        (their BCE, not their fidelity), times ``companion_weight``, are added to the loss, so that one host
        carries every mark; each is
        verified on its own and several verdicts combine by a union bound (:func:`union_p_value`).
        Returns ``{"seconds", "epochs", "losses", "bit_acc", "fidelity_weight"}`` (bit accuracy of undistorted
        outputs; the fidelity weight at the end)."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        reference = copy.deepcopy(model if reference is None else reference).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        start, weight = 0, self.fidelity
        ckpt = Path(checkpoint) if checkpoint is not None else None
        if ckpt is not None and ckpt.exists():
            with safe_open(str(ckpt), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
                start = int((f.metadata() or {}).get("epoch", 0))
                weight = float((f.metadata() or {}).get("fidelity_weight", weight))
            for prefix, net in (("model.", model), ("reference.", reference)):
                net.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(seed)
        aug_gen = torch.Generator().manual_seed(seed + 1)
        losses: list[float] = []
        # a varied input has no matching target, so the variation is off when the task's own loss is used
        vary = self.input_variation > 0 and not (targets is not None and task_weight > 0)
        t0 = time.perf_counter()
        model.train()
        for epoch in range(start, self.epochs):
            order = torch.randperm(len(inputs), generator=gen)
            total = 0.0
            for i in range(0, len(inputs), batch_size):
                j = order[i:i + batch_size]
                xb = inputs[j]
                keep = len(xb) - len(xb) // 2 if vary else len(xb)
                if vary:  # the first half stays as it is (and is what the PSNR floor watches)
                    xb = torch.cat([xb[:keep], augment.vary_inputs(xb[keep:], aug_gen, self.input_variation)])
                out = model(xb)
                with torch.no_grad():
                    ref = reference(xb)
                loss = self.mark_loss(out, ref, aug_gen, weight)
                for other in companions:
                    loss = loss + companion_weight * other.mark_loss(out, ref, aug_gen, 0.0)
                if targets is not None and task_weight > 0:
                    loss = loss + task_weight * (out - targets[j]).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if self.psnr_floor > 0:
                    mse = float(F.mse_loss(out[:keep].detach().clamp(0, 1), ref[:keep].clamp(0, 1)))
                    gap = self.psnr_floor - 10.0 * np.log10(1.0 / max(mse, 1e-12))
                    weight = float(np.clip(weight * np.exp(0.1 * np.clip(gap, -1.0, 1.0)),
                                           self.fidelity / 100, self.fidelity * 1000))
                total += float(loss.detach()) * len(j)
            losses.append(total / len(inputs))
            if ckpt is not None:
                tensors = {**{f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},
                           **{f"reference.{k}": v.contiguous() for k, v in reference.state_dict().items()}}
                save_file(tensors, str(ckpt), metadata={"epoch": str(epoch + 1), "fidelity_weight": repr(weight)})
            if progress is not None:
                progress(epoch + 1, {"loss": losses[-1], "fidelity_weight": weight})
        model.eval()
        with torch.no_grad():
            probe = inputs[:256]
            bits = (self.image_readouts(model(probe).clamp(0, 1))[0] > 0).long()
            acc = float((bits == torch.from_numpy(self.message)).float().mean())
        return {"seconds": time.perf_counter() - t0, "epochs": self.epochs, "losses": losses, "bit_acc": acc,
                "fidelity_weight": weight}

    def mark_images(self, images: torch.Tensor, steps: int = 100, max_delta: float = 4 / 255, lr: float = 0.05,
                    seed: int = 0) -> torch.Tensor:
        """Mark given images directly, after the fact (no host): a residual bounded by ``max_delta`` per pixel
        (``tanh`` parametrisation) optimised for ``steps`` Adam steps so the images decode to the message,
        through :attr:`strength` distortions. ``images`` ``(N, 3, 32, 32)`` in [0, 1] (one tile each);
        returns the marked images, rounded to 8 bits."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, TILE, TILE):
            raise SchemeError(f"mark_images takes (N, 3, {TILE}, {TILE}) tiles, got {tuple(images.shape)}")
        images = images.detach()
        w = torch.zeros_like(images, requires_grad=True)
        opt = torch.optim.Adam([w], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = augment.quantize_uint8(images + max_delta * torch.tanh(w))
            if self.strength > 0:
                x = torch.cat([augment.random_augment(part, gen, self.strength) for part in x.chunk(4)])
            r = self.readout(x)
            loss = F.binary_cross_entropy_with_logits(r, self._target.to(r).expand_as(r))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return ((images + max_delta * torch.tanh(w)).clamp(0, 1) * 255).round() / 255

    # -- verification -------------------------------------------------------------
    def verify(self, target: Any, *, alpha: float = 1e-6, inputs: torch.Tensor | None = None,
               size: tuple[int, int] | None = None, phases: int = 1, test: str = "binomial",
               **kwargs: Any) -> Verdict:
        """Verdict on suspect images: ``target`` is ``(N, C, H, W)`` images in [0, 1], a list of
        ``(C, H, W)`` images, or a model / oracle answered with ``inputs``. All images are read together
        (one image: a batch of one); ``p = P[Binomial(k, 1/2) >= matched bits]``. ``size`` ``(H, W)``: the
        host's output size, to which every image is resized before tiling (undoes a rescale).
        ``phases`` P > 1: the tile grid is also read shifted by 0..P-1 pixels down and right (P**2 reads, for
        images shifted by a few pixels, against which a mark locked to the grid's phase is fragile); the
        verdict's p is the smallest p times P**2 (Bonferroni, valid whatever the reads' dependence).
        ``test``: ``"binomial"`` (default; counts matched signs) or ``"soft"`` (the soft sign test of
        :func:`~nnmark.stats.soft_bit_verdict`: each bit weighted by its read-out's margin, clipped at
        :data:`SOFT_CLIP`; the same null, exact over the key's randomness, and more power when wrong bits are
        read near zero -- measured in experiments/results/outputs/README.md)."""
        if kwargs:
            raise SchemeError(f"unknown verify option(s): {', '.join(sorted(kwargs))}")
        t0 = time.perf_counter()
        if isinstance(target, (torch.Tensor, list, tuple)):
            images = target
        elif callable(target):
            if inputs is None:
                raise SchemeError("verifying a model or oracle needs inputs to query it with")
            with torch.no_grad():
                images = target(inputs).clamp(0.0, 1.0)
        else:
            raise SchemeError(f"cannot verify a {type(target).__name__}: give images or a model with inputs")
        if test not in ("binomial", "soft"):
            raise SchemeError(f"unknown test {test!r}: 'binomial' or 'soft'")
        if not 1 <= int(phases) <= 8:
            raise SchemeError(f"phases must be 1..8, got {phases}")
        best, notes, n_img = None, [], 0
        for dy in range(int(phases)):
            for dx in range(int(phases)):
                shifted = images[..., dy:, dx:] if isinstance(images, torch.Tensor) else \
                    [img[..., dy:, dx:] for img in images]
                r, read_notes = self.image_readouts(shifted, size)
                if test == "soft":
                    v = soft_bit_verdict(r.mean(0).double().numpy(), self.message, scheme=self.name, alpha=alpha,
                                         clip=SOFT_CLIP)
                else:
                    v = bit_match_verdict((r.mean(0) > 0).long().numpy(), self.message, scheme=self.name,
                                          alpha=alpha)
                if best is None or v.p_value < best[0].p_value:
                    best, notes, n_img = (v, (dy, dx)), read_notes, len(r)
        v, phase = best
        reads = int(phases) ** 2
        p = min(1.0, v.p_value * reads)
        verdict = Verdict(v.scheme, bool(p < alpha), p, alpha, v.statistic, v.n, v.null_hypothesis, {
            **v.details, "images": n_img, "conversions": notes, "extractor": self.extractor_name,
            "seconds": time.perf_counter() - t0,
            **({"phases_read": reads, "phase": list(phase), "p_best_phase": v.p_value} if reads > 1 else {})})
        null = (f"the images were not made by a host marked with this key: the key's {self.bits}-bit message is "
                "uniform and independent of them (the key committed before they existed), so each decoded bit "
                "matches with probability 1/2 independently -- exact over the key's randomness; for one fixed "
                "key the rate measured on >= 10,000 negatives is in experiments/results/outputs/fpr.json")
        if test == "soft":
            null += (f"; soft sign test: each bit weighted by its read-out's margin (clipped at {SOFT_CLIP:g}), "
                     "exact given the margins since each sign matches with probability 1/2 whatever its margin; "
                     "fixed-key rates in experiments/results/outputs/fpr_soft.json")
        sides = [max(size)] if size is not None else \
            [max(img.shape[-2:]) for img in (images if isinstance(images, (list, tuple)) else images[:1])]
        if max(sides) > TILE:
            null += ("; these images are read as several tiles, whose averaged bits are nearly fixed by the photo's "
                     "content: for one fixed key crops of one photo share their matches, and over crops of 3 photos "
                     "one of 3 fixed keys claimed 2.2% at alpha 1e-2 (0.064% at 1e-3), so a fixed key's rate at "
                     "alpha >= 1e-2 on large images is not guaranteed (experiments/results/outputs/fpr_tiled128*.json)")
        return Verdict(verdict.scheme, verdict.owned, verdict.p_value, verdict.alpha, verdict.statistic,
                       verdict.n, null, verdict.details)

    # -- persistence -------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        out = {"fidelity": self.fidelity, "psnr_target": self.psnr_target, "strength": self.strength,
               "epochs": self.epochs, "lr": self.lr, "extractor_name": self.extractor_name, "bits": self.bits,
               "windows": self.windows, "input_variation": self.input_variation,
               "psnr_floor": self.psnr_floor}
        dec = self.extractor.decoder
        if isinstance(dec, KeyedLowpassDecoder):
            return {**out, "extractor_kind": "keyed", "keyed_spec": dec.spec()}
        return {**out, "extractor_kind": "learned", "extractor_width": dec.head.in_features // 4,
                "extractor_front": dec.front}

    def material(self) -> dict[str, torch.Tensor]:
        return {**{f"extractor.{k}": v for k, v in self.extractor.tensors().items()}, "centre": self.centre}

    @classmethod
    def from_params(cls, key: Key, params: dict[str, Any], material: dict[str, torch.Tensor]) -> OutputMessage:
        p = dict(params)
        bits, kind = int(p.pop("bits")), p.pop("extractor_kind", "learned")
        tensors = {k[len("extractor."):]: v for k, v in material.items() if k.startswith("extractor.")}
        if kind == "keyed":
            spec = p.pop("keyed_spec")
            dec = KeyedLowpassDecoder.from_tensors(
                spec, {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")})
            if dec.bits != bits or "mu" not in tensors or "whiten" not in tensors:
                raise SchemeError("output-message key material does not fit its keyed decoder")
            ext = Extractor(dec, tensors["mu"], tensors["whiten"], {"kind": "keyed", **dec.spec()})
        elif kind == "learned":
            ext = Extractor.from_tensors(tensors, bits, int(p.pop("extractor_width")),
                                         front=p.pop("extractor_front", "rgb"))
        else:
            raise SchemeError(f"output-message key: unknown extractor kind {kind!r}")
        if "centre" not in material or material["centre"].shape != (bits,):
            raise SchemeError("output-message key material lacks its calibration centre")
        return cls(key, ext, centre=material["centre"], **p)


def readout_p_values(readouts: torch.Tensor | np.ndarray, message: np.ndarray, test: str = "binomial") -> np.ndarray:
    """p-values ``(N,)`` of read-outs ``(N, k)`` (one row per image or per group mean; bits are ``> 0``)
    against ``message`` ``(k,)`` of 0 / 1: ``test="binomial"`` ``P[Binomial(k, 1/2) >= matched signs]``,
    ``"soft"`` the soft sign test (:func:`~nnmark.stats.soft_bit_verdict`). The one place the p-value of a
    read-out is computed: :meth:`OutputMessage.p_values`, :func:`joint_p_values` and the false-positive
    studies, which read many keys from read-outs computed once, all call it."""
    from scipy import stats as sps

    x = readouts.double().numpy() if isinstance(readouts, torch.Tensor) else np.asarray(readouts, dtype=np.float64)
    m = np.asarray(message)
    if x.ndim != 2 or x.shape[1] != len(m):
        raise SchemeError(f"read-outs of shape {x.shape} do not fit a {len(m)}-bit message")
    if test == "binomial":
        return sps.binom.sf(((x > 0).astype(np.int64) == m[None]).sum(1) - 1, len(m), 0.5)
    if test != "soft":
        raise SchemeError(f"unknown test {test!r}: 'binomial' or 'soft'")
    return np.array([soft_bit_verdict(row, m, scheme=OutputMessage.name, clip=SOFT_CLIP).p_value for row in x])


def union_p_value(p_values: Sequence[float]) -> float:
    """One p-value from the p-values of several marks read from the same images (a host that carries
    several keys' marks, :meth:`OutputMessage.embed_host` ``companions``): Bonferroni's
    ``min(1, len(p) * min(p))``, valid whatever the dependence between the marks' read-outs."""
    if len(p_values) == 0:
        raise SchemeError("union_p_value needs at least one p-value")
    return float(min(1.0, len(p_values) * min(float(p) for p in p_values)))


def union_verdict(schemes: Sequence[OutputMessage], target: Any, *, alpha: float = 1e-6,
                  **options: Any) -> Verdict:
    """One verdict from the marks of several :class:`OutputMessage` keys read from the same images -- an
    owner's mark and its companion (e.g. one read by the ``"shipped-luma2"`` decoder, which survives JPEG and
    resizing where the RGB decoder does not), refined or embedded together
    (:func:`~nnmark.outputs.refine.refine_outputs` ``companions``). Each scheme verifies ``target`` with
    ``options`` (``test``, ``size``, ``phases``, ``inputs``) and the verdict's p is :func:`union_p_value`,
    ``min(1, len(schemes) * min(p_i))``: under the null that the images were made without any of these keys,
    each ``p_i`` is valid, so the union bound holds whatever the dependence between the marks. The statistic
    and bit count are the best mark's; ``details["marks"]`` lists every mark's p-value, matched bits and decoder.
    Schemes sharing a key are refused (one message read twice is not two marks)."""
    if not schemes:
        raise SchemeError("union_verdict needs at least one scheme")
    ids = [s.key.key_id for s in schemes]
    if len(set(ids)) != len(ids):
        raise SchemeError("union_verdict: two schemes share a key; give each mark its own key")
    verdicts = [s.verify(target, alpha=alpha, **options) for s in schemes]
    p = union_p_value([v.p_value for v in verdicts])
    best = min(verdicts, key=lambda v: v.p_value)
    null = (f"the images were made without any of these {len(schemes)} keys: every mark's p-value below is valid "
            f"under that null (each mark's own null: {verdicts[0].null_hypothesis}), and the verdict's p is the "
            f"union bound min(1, {len(schemes)} x smallest p), valid whatever the dependence between the marks")
    marks = [{"mark": i, "p_value": v.p_value, "matched_bits": v.statistic, "bits": v.n,
              "extractor": v.details.get("extractor")} for i, v in enumerate(verdicts)]
    return Verdict(best.scheme, bool(p < alpha), p, alpha, best.statistic, best.n, null,
                   {**best.details, "marks": marks, "union_of": len(schemes),
                    "seconds": sum(float(v.details.get("seconds", 0.0)) for v in verdicts)})


def joint_p_values(schemes: Sequence[OutputMessage], images: torch.Tensor | Sequence[torch.Tensor],
                   group: int = 1, size: tuple[int, int] | None = None, test: str = "binomial") -> np.ndarray:
    """p-values per group of ``group`` consecutive images ``(N // group,)`` from the marks of several
    :class:`OutputMessage` schemes of *distinct* keys read as one message: each scheme's group-mean read-out
    ``(k_s,)`` and message are concatenated (``sum k_s`` bits, e.g. 96 for an own and a companion 48-bit mark)
    and tested by ``test`` (``"binomial"``: matched signs, ``P[Binomial(sum k_s, 1/2) >= matches]``; ``"soft"``:
    the soft sign test, :func:`~nnmark.stats.soft_bit_verdict`).

    Null: the images were made without these keys. Each key draws its message independently of its
    rotation and of every other key, so given the images and the rotations all ``sum k_s`` message bits are
    fair and independent, whatever the dependence between the decoders' read-outs: the test is exact, like
    each scheme's own. Against :func:`union_p_value` it adds the evidence of both marks instead of taking the
    better one times two: an attack that leaves each mark partly readable (JPEG weakens one decoder, a crop
    the other) is read by both at once. Schemes sharing a key (one message twice) are refused."""

    if len(schemes) == 0:
        raise SchemeError("joint_p_values needs at least one scheme")
    ids = [s.key.key_id for s in schemes]
    if len(set(ids)) != len(ids):
        raise SchemeError("joint_p_values: two schemes share a key; their messages are not independent")
    if test not in ("binomial", "soft"):
        raise SchemeError(f"unknown test {test!r}: 'binomial' or 'soft'")
    means, messages = [], []
    for s in schemes:
        r, _ = s.image_readouts(images, size)
        n = len(r) // group * group
        means.append(r[:n].view(-1, group, s.bits).mean(1).double().numpy())
        messages.append(s.message)
    return readout_p_values(np.concatenate(means, axis=1), np.concatenate(messages), test)


def tpr_bound_bits(bits: int, alpha: float) -> int:
    """Fewest matched bits of ``bits`` with ``P[Binomial(bits, 1/2) >= matches] < alpha``."""
    from scipy import stats as sps

    for m in range(bits + 1):
        if sps.binom.sf(m - 1, bits, 0.5) < alpha:
            return m
    return bits + 1


