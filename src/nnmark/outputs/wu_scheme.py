"""Output watermarks read by a secret extraction network (Wu et al., TCSVT 2020): scheme ``output-wu``.

The host G (an image-to-image network) is fine-tuned jointly with the secret network
E(image, key) (:class:`~nnmark.outputs.wu_network.WuExtractor`): every image G outputs then carries a
watermark that E extracts with the owner's 1,024-bit extraction key, and E extracts a blank (zeros) from
images G did not produce and under wrong keys. The loss is the paper's

    L = L_task + theta * L_w,   L_w = alpha * d(E(G(x), k), w) + beta * d(E(x', k), 0) + gamma * d(E(G(x), k'), 0)

with ``x'`` unmarked images and ``k'`` wrong keys with 1..T_d flipped bits; ``d`` an L1 or L2 distance.

Recipes (``recipe``): ``"paper"`` is the published setting -- L1, alpha = 1, beta = gamma = 0.5, theta = 1,
natural photos as the only unmarked images, T_d = 8, a randomly initialised key path, no fidelity bound.
Measured on this machine (sr2 photo patches, 32 px, CPU), that setting does not learn to tell marked from
unmarked images: with alpha = beta + gamma and L1 the loss of an E that ignores its input is flat in how much
watermark it emits, so E sits there and claims every image (experiments/results/outputs/wu*). ``"nnmark"``
(the default) is the recipe that works here:

- L2 distance: an input-ignoring E then has one optimum (alpha / (alpha + beta + gamma) of the watermark)
  instead of a flat valley, and the gradient towards telling images apart is not cancelled;
- hard negatives: the *unmarked host's own outputs* G0(x) (G0 = the host before marking, frozen) are
  unmarked images next to natural photos -- E must read G's change, not "looks like a network output";
- a pairwise margin term on the detection statistic (``contrast``): s(G(x)) must exceed s(G0(x)) and
  s(photo) by 0.5, which pushes straight along the direction that separates them;
- theta = 20 with a fidelity bound: a hinge ``1e4 * max(0, MSE(G(x), G0(x)) - 10^(-b/10))`` keeps G's
  outputs within ``b`` dB PSNR of the unmarked host's while the large theta lets G move; ``b`` rises from
  ``fidelity_start_db`` (20) to ``fidelity_db`` (32) over ``fidelity_warmup`` steps (a curriculum: the mark is
  found at a large amplitude, then made faint);
- a key path that can see one bit: the FiLM MLP of the whole key (``key_path="film"``) with its first layer
  initialised as a match detector of the owner's key (``key_init="match"``: every hidden unit sums the
  key's +-1 bits against the owner's pattern with a bias that leaves it positive only for the exact key),
  so a single flipped bit zeroes the fusion's features. That gate is fixed, not trained (trained, it lost its
  margin within a few Adam steps): key sensitivity is then by construction, and E's image branch, the
  paper's convolutional key branch and the fusion are what training learns.
  A random first layer (``key_init="random"``, the paper) had not learned to reject 8 flipped bits after
  600 steps (wrong-key statistic 0.40 against 0.60 for the right key). ``wrong_keys`` wrong keys per image
  reuse the image branch's features, so they cost only the fusion.

What E's output is evidence of: E memorises one fixed watermark, so the pixels (or bits) of an extraction are
not independent, and no binomial p-value is computed. The verdict is a detection statistic,
``s = <E(image, k), w> / <w, w>`` (1: the watermark, 0: blank), compared with the statistics of calibration
negatives held out from training (:meth:`OutputWu.calibrate`: natural photos from photos never trained on,
outputs of unmarked hosts and of hosts marked under other keys). The negatives form *conditions*: ``clean``
(all of them as they are) and one per distortion of :data:`CALIBRATION_DISTORTIONS` (every negative once more
cropped, noised, JPEG-compressed or resized that way). For m suspect images the verdict uses their median
statistic; with ``k_g`` of the ``n_g`` negatives of condition g at or above it,

    p = max over conditions g of  min(1, m / ceil(m / 2) * (k_g + 1) / (n_g + 1)),

valid (P[p <= a] <= a) whenever the unmarked suspect images are exchangeable with the negatives of *some*
condition -- whichever it is, and whatever the dependence between the m images (a median at or above the
threshold needs ceil(m/2) single-image exceedances; Markov's inequality gives the factor; p is at least that
condition's p). One pooled null, as before, was valid only for images distributed like the pooled mixture:
innocent images all noised at sigma 0.1 were claimed 3.7% of the time at its 1% threshold (measured, an E
trained with distortions), because noise 0.1 was one eighth of the pooled distorted negatives. The threshold
at alpha is the largest per-condition threshold; the smallest attainable p is about 1 / min_g n_g (2 / n_g for
m > 1): alpha below that is refused. The verdict states the threshold, the false-positive rate measured at it
in each condition with its exact 95% Clopper-Pearson interval, and the count of each kind of negative.
Distortions outside the list (other kinds, stronger settings) are not covered by the guarantee; heavier noise
is the one measured to matter (an E trained without distortions scores innocent images noised at sigma 0.15-0.5
above the threshold 3-18% of the time), so suspect images whose median estimated noise level
(:func:`skimage.restoration.estimate_sigma`) is above the strongest calibrated noise are refused with a message
saying so (:data:`NOISE_ESTIMATE_MARGIN`).
Larger images (``read_size``, :meth:`OutputWu.with_read_size`): E reads ``image_size`` tiles; a key with
``read_size = R`` reads R x R images, one statistic each, the mean of its aligned tiles' statistics, and must be
calibrated on R x R negatives (a separate key file with the same E). Kinds of negatives as conditions
(``calibrate(by_kind=True)``): an E scores the outputs of some hosts marked under *other* keys far above photos and
unmarked outputs (measured: the shipped sr2 key over one denoise host marked under another key), so a null of
photos and unmarked outputs alone does not cover them; by kind, p is valid for images exchangeable with any one
calibrated kind, and hosts never calibrated on are still not covered.
A stolen E is evidence about the key (its first layer matches it), and an E fitted after the fact
could claim anything: verdicts count for committed keys only (:mod:`nnmark.commitment`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import SchemeError
from nnmark.keys import Key
from nnmark.params import Param, Params
from nnmark.schemes.base import Scheme
from nnmark.stats import Verdict
from nnmark.train import TrainingHook

from .wu_network import KEY_PATHS, WuExtractor, detection_statistic, flip_bits, key_bits, watermark_image

#: the recipes' values of the parameters left unset (None) in :attr:`OutputWu.PARAMS`
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"distance": "l1", "alpha": 1.0, "beta": 0.5, "gamma": 0.5, "theta": 1.0, "hard_negatives": False,
              "contrast": 0.0, "fidelity_db": 0.0, "key_init": "random", "key_path": "conv"},
    "nnmark": {"distance": "mse", "alpha": 1.0, "beta": 1.0, "gamma": 1.0, "theta": 20.0, "hard_negatives": True,
               "contrast": 1.0, "fidelity_db": 32.0, "key_init": "match", "key_path": "film"},
}
FIDELITY_WEIGHT = 1e4
#: suspect images are refused when their median estimated noise sigma exceeds this factor times the strongest
#: calibrated noise (the estimator reads 0.088 median, 0.102 at the 95th percentile, on test photos noised at 0.1)
NOISE_ESTIMATE_MARGIN = 1.05
NOISE_ESTIMATE_SAMPLE = 256  # images (evenly spaced) the noise level is estimated on
MARGIN = 0.5
MAX_VERIFY_IMAGES = 100_000
MAX_CONDITIONS = 256  # calibration conditions a key file may hold


def _recipe_doc(name: str) -> str:
    return "default: from the recipe (" + ", ".join(f"{r} {RECIPES[r][name]}" for r in RECIPES) + ")"


class WuHook(TrainingHook):
    """Joint training of E with the host in any loop (:class:`~nnmark.train.TrainingHook` lifecycle).

    The host's output of each training step is captured by a forward hook (no second forward pass); the
    unmarked host G0 is the model as it is at the first step (frozen copy). ``natural``: unmarked photos
    ``(M, C, H, W)`` in [0, 1], drawn ``batch`` at a time. E's own Adam optimizer steps in :meth:`after_step`.
    ``train_extractor=False`` keeps E fixed (its parameters frozen until :meth:`finalize`): only the host
    learns to carry the mark E already reads, so a calibration of that E stays valid for the new host.
    ``extra_negatives``: further unmarked images ``(M, C, H, W)`` (e.g. outputs of hosts marked under other
    keys), ``batch`` of them drawn each step as one more group of blanks next to the photos and G0's outputs
    (in the blank loss and the margin term alike).
    """

    def __init__(self, scheme: OutputWu, natural: torch.Tensor, train_extractor: bool = True,
                 extra_negatives: torch.Tensor | None = None) -> None:
        self.scheme = scheme
        self.natural = natural.float()
        self.extra = None if extra_negatives is None else extra_negatives.float()
        self.unmarked: nn.Module | None = None
        self._x: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._handle: Any = None
        self.gen = scheme.key.torch_generator("output-wu:training")
        e = scheme.extractor
        self._frozen: list[nn.Parameter] = []
        self.opt: torch.optim.Optimizer | None = None
        if not train_extractor:
            self._frozen = [p for p in e.parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)
        else:
            film = [p for p in e.film.parameters() if p.requires_grad] if e.film is not None else []
            ids = {id(p) for p in film}
            groups = [{"params": [p for p in e.parameters() if id(p) not in ids and p.requires_grad]}]
            if film:
                groups.append({"params": film, "lr": scheme.film_lr})
            self.opt = torch.optim.Adam(groups, lr=scheme.lr)
        self.history: list[dict[str, float]] = []
        self.step = 0
        #: called as ``log(step, losses)`` every 50 steps when set (progress of long runs)
        self.log: Any = None

    def augment_batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        self._x = x
        return x, y

    def _capture(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            self._out = output

    def loss(self, model: nn.Module) -> torch.Tensor:
        s = self.scheme
        if self.unmarked is None:
            self.unmarked = copy.deepcopy(model).eval()
            for p in self.unmarked.parameters():
                p.requires_grad_(False)
            self._handle = model.register_forward_hook(self._capture)
            self._out = model(self._x)
        assert self._x is not None and self._out is not None
        out, x = self._out, self._x
        self._out = None
        s.extractor.train()
        b = len(out)
        marked = out.clamp(0.0, 1.0)
        with torch.no_grad():
            unmarked = self.unmarked(x).clamp(0.0, 1.0)
        nat = self.natural[torch.randint(0, len(self.natural), (b,), generator=self.gen)]
        negatives = [nat, unmarked] if s.hard_negatives else [nat]
        if self.extra is not None:
            negatives.append(self.extra[torch.randint(0, len(self.extra), (b,), generator=self.gen)])
        seen = s.augment_images(torch.cat([marked] + negatives), self.gen)
        feats = s.extractor.image_features(seen)
        f_pos, f_neg = feats[:b], feats[b:]
        kb = s.bits
        wm = s.watermark
        dist = (lambda u, v: (u - v).abs().mean()) if s.distance == "l1" else (lambda u, v: ((u - v) ** 2).mean())
        e_pos = s.extractor.decode(f_pos, kb)
        e_neg = s.extractor.decode(f_neg, kb)
        l_marked = dist(e_pos, wm.expand_as(e_pos))
        l_unmarked = dist(e_neg, torch.zeros_like(e_neg))
        l_keys = torch.zeros(())
        if s.gamma > 0 and s.wrong_keys > 0:
            flips = torch.randint(1, s.t_d + 1, (b * s.wrong_keys,), generator=self.gen)
            e_wrong = s.extractor.decode(f_pos.repeat(s.wrong_keys, 1, 1, 1), flip_bits(kb, flips, self.gen))
            l_keys = dist(e_wrong, torch.zeros_like(e_wrong))
        lw = s.alpha * l_marked + s.beta * l_unmarked + s.gamma * l_keys
        if s.contrast > 0:
            st_pos = detection_statistic(e_pos, wm)
            st_neg = detection_statistic(e_neg, wm).reshape(len(negatives), b)
            lw = lw + s.contrast * F.relu(MARGIN - (st_pos[None] - st_neg)).mean()
        total = s.theta * lw
        mse = ((out - unmarked) ** 2).mean()
        if s.fidelity_db > 0:
            total = total + FIDELITY_WEIGHT * F.relu(mse - 10.0 ** (-self.fidelity_bound_db() / 10.0))
        self.step += 1
        self.history.append({"marked": float(l_marked.detach()), "unmarked": float(l_unmarked.detach()),
                             "keys": float(l_keys.detach()),
                             "psnr_vs_unmarked": float(10 * torch.log10(1 / mse.detach().clamp(min=1e-12)))})
        if self.log is not None and self.step % 50 == 0:
            self.log(self.step, self.history[-1])
        return total

    def fidelity_bound_db(self) -> float:
        """The PSNR bound (dB) of this step: ``fidelity_start_db`` rising linearly to ``fidelity_db`` over
        ``fidelity_warmup`` steps (never looser than ``fidelity_db`` if that is the smaller)."""
        s = self.scheme
        if s.fidelity_warmup <= 0 or s.fidelity_start_db >= s.fidelity_db:
            return s.fidelity_db
        t = min(1.0, self.step / s.fidelity_warmup)
        return s.fidelity_start_db + t * (s.fidelity_db - s.fidelity_start_db)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def finalize(self, model: nn.Module) -> nn.Module | None:
        """Detach the capture; E to eval mode. Returns the frozen unmarked host (for calibration)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        self.scheme.extractor.eval()
        self.scheme.unmarked_host = self.unmarked
        return self.unmarked


class OutputWu(Scheme):
    """Wu et al.'s output watermark with a secret extraction network; see the module docs.

    Build with :meth:`Scheme.create` (``model``: the host, whose first output fixes the image shape);
    embed with :meth:`embed` (fine-tunes the host jointly with E; ``natural`` photos as negatives), then
    :meth:`calibrate` on held-out negatives, then :meth:`verify` suspect images.
    """

    name = "output-wu"
    access = "black-box"
    PARAMS = Params(
        Param("recipe", str, "nnmark", "loss recipe filling the parameters left unset: 'nnmark' (works on "
              "this machine) or 'paper' (the published setting)", choices=tuple(RECIPES)),
        Param("watermark", str, "binary", "watermark image: 'binary' (QR-like logo) or 'colour'",
              choices=("binary", "colour")),
        Param("image_size", int, 32, "side of the host's output images E reads (pixels)", low=8, high=512),
        Param("read_size", int, None, "side (pixels) of the images one detection statistic is read from, a "
              "multiple of image_size: the statistic is the mean of E's statistics over the image's aligned "
              "image_size tiles, calibrated on negatives of this size; default image_size (one tile, the paper)",
              optional=True, low=8, high=2048),
        Param("channels", int, 3, "channels of the host's output images", low=1, high=3),
        Param("wm_size", int, None, "watermark side (pixels); default image_size / 2", optional=True, low=4),
        Param("key_bits", int, 1024, "extraction key length (bits; paper 1,024)", low=16, high=65536),
        Param("width", int, 16, "channels of E's image branch and fusion", low=4, high=256),
        Param("key_channels", int, 16, "channels of E's convolutional key branch (paper c2 = 48)", low=1, high=256),
        Param("key_path", str, None, "'film': conv key branch plus a global key MLP modulating the fusion; "
              "'conv': the paper's conv key branch only; " + _recipe_doc("key_path"), optional=True,
              choices=KEY_PATHS),
        Param("key_init", str, None, "'match' (first key layer = a detector of the owner's key) or 'random'; "
              + _recipe_doc("key_init"), optional=True, choices=("match", "random")),
        Param("distance", str, None, "watermark loss distance 'l1' or 'mse'; " + _recipe_doc("distance"),
              optional=True, choices=("l1", "mse")),
        Param("alpha", float, None, "weight of marked outputs -> watermark; " + _recipe_doc("alpha"),
              optional=True, low=0.0),
        Param("beta", float, None, "weight of unmarked images -> blank; " + _recipe_doc("beta"),
              optional=True, low=0.0),
        Param("gamma", float, None, "weight of wrong keys -> blank; " + _recipe_doc("gamma"), optional=True, low=0.0),
        Param("theta", float, None, "weight of the watermark loss against the task loss; " + _recipe_doc("theta"),
              optional=True, low=0.0),
        Param("hard_negatives", bool, None, "the unmarked host's outputs as unmarked images; "
              + _recipe_doc("hard_negatives"), optional=True),
        Param("contrast", float, None, "weight of the pairwise margin on the statistic; " + _recipe_doc("contrast"),
              optional=True, low=0.0),
        Param("fidelity_db", float, None, "PSNR bound (dB) of marked vs unmarked outputs while training, 0: none; "
              + _recipe_doc("fidelity_db"), optional=True, low=0.0),
        Param("fidelity_warmup", int, 300, "steps over which the fidelity bound tightens linearly from "
              "fidelity_start_db to fidelity_db (a curriculum: E first finds the mark at a larger amplitude)", low=0),
        Param("fidelity_start_db", float, 20.0, "the fidelity bound (dB) at step 0 of the warm-up", low=0.0),
        Param("t_d", int, 8, "T_d: most flipped bits of a training wrong key", low=1),
        Param("wrong_keys", int, 4, "wrong keys per marked image per step", low=0, high=64),
        Param("augment", float, 0.0, "strength in [0, 1] of the random distortion (crop, noise, JPEG, resize) "
              "applied to every image E sees while training; 0: none", low=0.0, high=1.0),
        Param("lr", float, 1e-3, "learning rate of E (Adam)", low=0.0),
        Param("film_lr", float, 1e-3, "learning rate of E's key MLP (Adam)", low=0.0),
    )

    def __init__(self, key: Key, *, recipe: str = "nnmark", watermark: str = "binary", image_size: int = 32,
                 read_size: int | None = None, channels: int = 3, wm_size: int | None = None, key_bits: int = 1024,
                 width: int = 16,
                 key_channels: int = 16, key_path: str | None = None, key_init: str | None = None,
                 distance: str | None = None, alpha: float | None = None, beta: float | None = None,
                 gamma: float | None = None, theta: float | None = None, hard_negatives: bool | None = None,
                 contrast: float | None = None, fidelity_db: float | None = None, fidelity_warmup: int = 300,
                 fidelity_start_db: float = 20.0, t_d: int = 8,
                 wrong_keys: int = 4, augment: float = 0.0, lr: float = 1e-3, film_lr: float = 1e-3,
                 state: dict[str, torch.Tensor] | None = None, null_statistics: torch.Tensor | None = None,
                 null_counts: dict[str, int] | None = None, null_conditions: list[str] | None = None,
                 null_condition_index: torch.Tensor | None = None) -> None:
        super().__init__(key)
        r = RECIPES[recipe]
        self.recipe, self.watermark_kind, self.image_size, self.channels = recipe, watermark, image_size, channels
        self.wm_size = wm_size or image_size // 2
        self.read_size = read_size or image_size
        if self.read_size % image_size:
            raise SchemeError(f"read_size {self.read_size} must be a multiple of image_size {image_size}")
        self.key_bits, self.width, self.key_channels = key_bits, width, key_channels
        self.key_path = key_path or r["key_path"]
        self.key_init = key_init or r["key_init"]
        self.distance = distance or r["distance"]
        self.alpha = r["alpha"] if alpha is None else alpha
        self.beta = r["beta"] if beta is None else beta
        self.gamma = r["gamma"] if gamma is None else gamma
        self.theta = r["theta"] if theta is None else theta
        self.hard_negatives = r["hard_negatives"] if hard_negatives is None else hard_negatives
        self.contrast = r["contrast"] if contrast is None else contrast
        self.fidelity_db = r["fidelity_db"] if fidelity_db is None else fidelity_db
        self.t_d, self.wrong_keys, self.augment, self.lr, self.film_lr = t_d, wrong_keys, augment, lr, film_lr
        self.fidelity_warmup, self.fidelity_start_db = fidelity_warmup, fidelity_start_db
        self.bits = key_bits_of(key, key_bits)
        self.watermark = watermark_image(key, watermark, self.wm_size)
        with torch.random.fork_rng():
            torch.manual_seed(key.seed("output-wu:init"))
            try:
                self.extractor = WuExtractor(image_size, channels, self.wm_size, self.watermark.shape[0], key_bits,
                                             width, key_channels, self.key_path)
            except ValueError as exc:
                raise SchemeError(str(exc)) from None
        if state is not None:
            self.extractor.load_state_dict(state)
        elif self.key_init == "match" and self.extractor.film is not None:
            self._init_key_match()
        self.extractor.eval()
        self.null_statistics: torch.Tensor | None = None
        self.null_conditions: list[str] = []
        self.null_condition_index: torch.Tensor | None = None
        if null_statistics is not None:
            self._set_null(null_statistics, null_condition_index, null_conditions)
        self.null_counts = dict(null_counts or {})
        self.unmarked_host: nn.Module | None = None

    def _init_key_match(self) -> None:
        """The key MLP starts as a gate on the owner's exact key. First layer: hidden unit j computes
        ``relu(sum_i s_i s'_i - (L - 2 c_j))`` (``s`` the owner's +-1 bits, ``c_j`` in [0.2, 0.8] keyed):
        ``2 c_j`` for the exact key, 0 for any key one or more bits away. Second layer: gain
        ``-1 + sum_j h_j / sum_j 2 c_j`` (0 for the exact key: features pass; -1 otherwise: fusion features
        zeroed), shift 0. Both layers are then frozen: a fixed gate. Trained, they lost it within a few Adam
        steps (a step of 1e-3 on each of 1,024 +-1 inputs moves a first-layer pre-activation by about 1, more
        than its margin; the second layer's gain moved by about 0.25 a step, as all its inputs are active for the
        exact key) and E stopped separating images (measured: no separation after 400-600 steps)."""
        first, second = self.extractor.film[0], self.extractor.film[2]
        signs = 2.0 * self.bits - 1.0
        c = 0.2 + 0.6 * torch.rand(first.out_features, generator=self.key.torch_generator("output-wu:match"))
        width = second.out_features // 2
        with torch.no_grad():
            first.weight.copy_(signs[None, :].expand_as(first.weight))
            first.bias.copy_(-(self.key_bits - 2.0 * c))
            second.weight.zero_()
            second.bias.zero_()
            second.weight[:width] = 1.0 / float((2.0 * c).sum())
            second.bias[:width] = -1.0
        for p in self.extractor.film.parameters():
            p.requires_grad_(False)

    def with_read_size(self, read_size: int) -> OutputWu:
        """A copy of this scheme (same key, same E) reading images of side ``read_size`` (a multiple of
        ``image_size``; the statistic is then the mean over the aligned tiles), **uncalibrated**: its null is
        the statistic of negatives of that size, so :meth:`calibrate` it on such negatives before verifying."""
        params = {k: v for k, v in self.params().items() if k not in ("null_counts", "null_conditions")}
        params["read_size"] = int(read_size)
        state = {k: v.detach().clone() for k, v in self.extractor.state_dict().items()}
        return OutputWu(self.key, state=state, **params)

    # -- building -------------------------------------------------------------
    @classmethod
    def build(cls, key: Key, model: nn.Module | None = None, data: Any = None, **params: Any) -> OutputWu:
        return cls(key, **params)

    def augment_images(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training distortion (``augment`` strength; identity at 0), see :mod:`nnmark.outputs.augment`."""
        if self.augment <= 0:
            return images
        from nnmark.outputs.augment import random_augment

        return random_augment(images, gen, self.augment)

    def training_hook(self, natural: torch.Tensor | None = None, train_extractor: bool = True,
                      extra_negatives: torch.Tensor | None = None) -> WuHook:
        """The joint-training hook; ``natural``: unmarked photos ``(M, C, H, W)`` (default: 2,048 patches of the
        training photos at other positions, :func:`nnmark.outputs.data.natural_images` split ``val``);
        ``train_extractor=False``: E fixed, only the host learns; ``extra_negatives``: more blanks for E
        (:class:`WuHook`)."""
        if natural is None:
            from nnmark.outputs.data import natural_images

            natural = natural_images(2048, self.image_size, seed=self.key.seed("output-wu:natural") % 2**31,
                                     split="val")
        self._check_images(natural, "natural images", self.image_size)
        if extra_negatives is not None:
            extra_negatives = self._check_images(extra_negatives, "extra negatives", self.image_size)
        return WuHook(self, natural, train_extractor, extra_negatives)

    def embed(self, model: nn.Module, data: Any, config: Any = None, *, val: Any = None,
              description: str = "embedding output-wu", natural: torch.Tensor | None = None,
              log: Any = None, train_extractor: bool = True, extra_negatives: torch.Tensor | None = None) -> Any:
        """Fine-tune ``model`` (the unmarked host, in place) jointly with E on ``data`` (an
        :class:`~nnmark.data.ImageDataset` of ``(inputs, targets)``); returns the training record with the
        hook's loss history in ``record.config["wu_history"]`` (every 10th step). The frozen unmarked host is
        kept in :attr:`unmarked_host` for :meth:`calibrate`. ``train_extractor=False``: E stays as it is (a
        further host marked for an existing, already calibrated E). ``extra_negatives`` ``(M, C, H, W)``: images
        E is taught to read as blanks besides the photos and the unmarked host's outputs, e.g. outputs of hosts
        marked under other keys (an E never shown them can score some such host far above the photos)."""
        from nnmark.train import TrainConfig, train

        self.model_spec = dict(getattr(model, "spec", {}) or {}) or None
        hook = self.training_hook(natural, train_extractor, extra_negatives)
        hook.log = log
        cfg = config or TrainConfig(epochs=1, batch_size=16)
        rec = train(model, data, cfg, val=val, hooks=[hook], description=description)
        hook.finalize(model)
        rec.config["wu_history"] = hook.history[::10]
        return rec

    # -- statistics -------------------------------------------------------------
    def _check_images(self, images: Any, what: str = "images", size: int | None = None) -> torch.Tensor:
        """``images`` ``(N, C, S, S)`` with ``S = size`` (default :attr:`read_size`) as float in [0, 1]."""
        if not isinstance(images, torch.Tensor):
            raise SchemeError(f"{what}: expected a tensor of images (N, C, H, W), got {type(images).__name__}")
        side = size or self.read_size
        want = (self.channels, side, side)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise SchemeError(f"{what}: this key's extractor reads {want[0]}-channel {want[1]}x{want[2]} images, got "
                              f"shape {tuple(images.shape)} (resize, crop or tile them to {want[1]}x{want[2]} first)")
        if len(images) == 0 or len(images) > MAX_VERIFY_IMAGES:
            raise SchemeError(f"{what}: need 1..{MAX_VERIFY_IMAGES} images, got {len(images)}")
        if not torch.isfinite(images).all():
            raise SchemeError(f"{what}: images contain NaN or infinite values")
        return images.float().clamp(0.0, 1.0)

    @torch.no_grad()
    def extract(self, images: torch.Tensor, bits: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """E's extracted watermarks ``(N, c, h, w)`` in [-1, 1] for ``images`` ``(N, C, R, R)`` in [0, 1]
        (``R`` = :attr:`read_size`) with the owner's key (or ``bits`` ``(key_bits,)`` / ``(N, key_bits)``). For
        ``R > image_size`` it is the mean of the extractions of the image's ``(R / image_size)^2`` aligned tiles
        (so the detection statistic is the mean of the tiles' statistics: it is linear)."""
        images = self._check_images(images)
        self.extractor.eval()
        kb = self.bits if bits is None else bits.float()
        if self.read_size != self.image_size:
            t = (self.read_size // self.image_size) ** 2
            tiles = self._tiles(images, self.image_size)
            if kb.ndim == 2:
                kb = kb.repeat_interleave(t, dim=0)
            e = self._extract_tiles(tiles, kb, batch_size)
            return e.reshape(len(images), t, *e.shape[1:]).mean(1)
        return self._extract_tiles(images, kb, batch_size)

    @staticmethod
    def _tiles(images: torch.Tensor, size: int) -> torch.Tensor:
        """``(N, C, H, W)`` -> its aligned ``size x size`` tiles ``(N * (H // size) * (W // size), C, size, size)``,
        image by image, row-major; edges past a whole tile dropped."""
        n, c, h, w = images.shape
        t = images[:, :, :h - h % size, :w - w % size].unfold(2, size, size).unfold(3, size, size)
        return t.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, size, size)

    def _extract_tiles(self, images: torch.Tensor, kb: torch.Tensor, batch_size: int) -> torch.Tensor:
        outs = []
        for i in range(0, len(images), batch_size):
            k = kb if kb.ndim == 1 else kb[i:i + batch_size]
            outs.append(self.extractor(images[i:i + batch_size], k))
        return torch.cat(outs)

    def statistics(self, images: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
        """The detection statistic ``<E(image, k), w> / <w, w>`` per image ``(N,)`` (float64)."""
        return detection_statistic(self.extract(images, bits), self.watermark).double()

    def prepare_images(self, images: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[str]]:
        """Suspect images of any size ``[(C, H, W), ...]`` in [0, 1] -> ``(m, channels, S, S)`` blocks and notes
        saying what was converted: grey replicated to RGB, an alpha channel dropped, an image larger than
        ``S = read_size`` cut into non-overlapping ``S x S`` blocks (the remainder dropped: each block is one
        suspect image; the verdict's median p-value is valid for dependent blocks). A smaller image is refused."""
        if not images:
            raise SchemeError("no suspect images")
        tiles, notes, size = [], [], self.read_size
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] not in (1, 3, 4):
                raise SchemeError(f"image {i}: expected a (C, H, W) tensor with C in 1, 3, 4")
            if img.shape[0] == 4:
                img = img[:3]
                notes.append(f"image {i}: alpha channel dropped")
            if img.shape[0] == 1 and self.channels == 3:
                img = img.expand(3, -1, -1)
                notes.append(f"image {i}: grey, replicated to RGB")
            elif img.shape[0] == 3 and self.channels == 1:
                raise SchemeError(f"image {i}: colour, but this key's extractor reads grey images")
            h, w = img.shape[1:]
            if h < size or w < size:
                raise SchemeError(f"image {i}: {h}x{w} pixels, smaller than the {size}x{size} the extractor reads "
                                  "(refused: upscaling would not restore the mark)")
            if (h, w) != (size, size):
                notes.append(f"image {i}: {h}x{w} cut into {(h // size) * (w // size)} tiles of {size}x{size}"
                             + (" (edges dropped)" if h % size or w % size else ""))
            tiles.append(self._tiles(img[None], size))
            if sum(len(x) for x in tiles) > MAX_VERIFY_IMAGES:
                raise SchemeError(f"more than {MAX_VERIFY_IMAGES} tiles of {size}x{size}")
        return torch.cat(tiles), notes

    # -- calibration ------------------------------------------------------------
    def needs_references(self) -> bool:
        return True

    def calibrate(self, reference_models: list[nn.Module] | None = None, *, inputs: torch.Tensor | None = None,
                  natural: torch.Tensor | None = None, negatives: dict[str, torch.Tensor] | None = None,
                  distorted: bool = True, by_kind: bool = False) -> dict[str, int]:
        """Measure the null on negatives held out from training: ``natural`` photos ``(N, C, H, W)``, the
        outputs of ``reference_models`` (unmarked hosts, hosts marked under other keys) on held-out ``inputs``,
        and any further ``negatives`` (name -> images). They form the condition ``clean``; with ``distorted``
        (default) every negative also enters each condition of :data:`CALIBRATION_DISTORTIONS` (cropped,
        noised, JPEG'd, resized as a thief or a platform would distort innocent images; random crop positions
        and noise drawn per image from the key). The p-value is the largest over conditions (module docs), so
        it holds for innocent images made under any one of them: a pooled null let unmarked images noised at
        sigma 0.1 score above its 1% threshold 3.7% of the time. Replaces the stored null (do it before
        :meth:`save`: the calibration is part of the committed key); returns the count per kind of clean
        negative (each condition holds all of them). ``by_kind``: every kind of negative is a condition of its
        own too (``"<distortion> | <kind>"``, at most :data:`MAX_CONDITIONS`), so p is valid for innocent images
        exchangeable with any one kind -- e.g. the outputs of one host marked under another key, which an E can
        score far above photos and unmarked outputs (measured: 86% of one such host's outputs over the 1%
        threshold of a null of photos and unmarked outputs)."""
        kinds: dict[str, torch.Tensor] = {}
        if natural is not None:
            kinds["natural"] = natural
        for i, m in enumerate(reference_models or []):
            if inputs is None:
                raise SchemeError("calibrating on reference models needs their held-out inputs")
            m.eval()
            with torch.no_grad():
                kinds[f"reference-{i}"] = torch.cat([m(inputs[j:j + 256]) for j in range(0, len(inputs), 256)])
        kinds.update(negatives or {})
        if not kinds:
            raise SchemeError("calibration needs negatives (natural photos, reference models' outputs)")
        checked = {k: self._check_images(v, f"calibration negatives {k!r}") for k, v in kinds.items()}
        groups = {f"| {k}": v for k, v in checked.items()} if by_kind else {"": torch.cat(list(checked.values()))}
        if len(groups) * (1 + len(CALIBRATION_DISTORTIONS) * distorted) > MAX_CONDITIONS:
            raise SchemeError(f"calibration by kind: at most {MAX_CONDITIONS} conditions (kinds x distortions)")
        conditions: dict[str, torch.Tensor] = {}
        gen = self.key.torch_generator("output-wu:calibration-distortions")
        for suffix, clean in groups.items():
            conditions[f"clean {suffix}".strip()] = clean
            for d in CALIBRATION_DISTORTIONS if distorted else ():
                conditions[f"{distortion_name(d)} {suffix}".strip()] = torch.cat(
                    [distort_one(img[None], d, gen) for img in clean])
        stats, index = [], []
        for i, imgs in enumerate(conditions.values()):
            stats.append(self.statistics(imgs))
            index.append(torch.full((len(imgs),), i, dtype=torch.int64))
        self._set_null(torch.cat(stats), torch.cat(index), list(conditions))
        self.null_counts = {k: len(v) for k, v in kinds.items()}
        return dict(self.null_counts)

    def _set_null(self, statistics: torch.Tensor, index: torch.Tensor | None, names: list[str] | None) -> None:
        """Store calibration ``statistics`` ``(n,)`` with their condition ``index`` ``(n,)`` into ``names``
        (a key file without conditions, from before they existed: one condition ``pooled``)."""
        statistics = statistics.double().reshape(-1)
        if index is None or not names:
            index, names = torch.zeros(len(statistics), dtype=torch.int64), ["pooled"]
        index = index.to(torch.int64).reshape(-1)
        if len(index) != len(statistics) or int(index.min()) < 0 or int(index.max()) >= len(names):
            raise SchemeError("output-wu calibration: condition index does not match the statistics")
        order = torch.argsort(statistics, stable=True)
        order = order[torch.argsort(index[order], stable=True)]  # by condition, then by value
        self.null_statistics, self.null_condition_index = statistics[order], index[order]
        self.null_conditions = list(names)

    def null_by_condition(self) -> dict[str, torch.Tensor]:
        """The calibration statistics of each condition, sorted ascending: name -> ``(n_g,)`` float64."""
        null = self._null()
        assert self.null_condition_index is not None
        return {name: null[self.null_condition_index == i] for i, name in enumerate(self.null_conditions)}

    def min_alpha(self, m: int = 1) -> float:
        """The smallest p-value ``m`` suspect images can get: ``m / ceil(m/2) / (min_g n_g + 1)``."""
        n_min = min(len(v) for v in self.null_by_condition().values())
        return m / math.ceil(m / 2) / (n_min + 1)

    @staticmethod
    def _condition_threshold(null: torch.Tensor, alpha: float) -> float:
        n = len(null)
        k_allowed = math.floor(alpha * (n + 1)) - 1  # negatives allowed at or above the threshold
        if k_allowed < 0:
            return math.inf
        return float(null[n - 1 - k_allowed]) if k_allowed < n else -math.inf

    def threshold(self, alpha: float) -> float:
        """The smallest statistic a single image needs for ``p <= alpha``: in each condition the
        ``ceil((1 - alpha)(n_g + 1))``-th smallest calibration statistic, the largest over conditions; ``inf``
        when ``alpha < 1 / (n_g + 1)`` for some condition."""
        return max(self._condition_threshold(v, alpha) for v in self.null_by_condition().values())

    def calibrated_noise(self) -> float:
        """The strongest Gaussian-noise sigma among the calibration conditions (keys calibrated as one pooled
        null: the strongest in :data:`CALIBRATION_DISTORTIONS`)."""
        names = self.null_conditions if self.null_conditions != ["pooled"] else [
            distortion_name(d) for d in CALIBRATION_DISTORTIONS]
        sig = [float(n.split()[1]) for n in names if n.startswith("noise ")]
        return max(sig, default=0.0)

    @staticmethod
    def estimated_noise(images: torch.Tensor) -> float:
        """Median over (up to :data:`NOISE_ESTIMATE_SAMPLE` evenly spaced) ``images`` ``(m, C, H, W)`` of the
        wavelet estimate of their Gaussian noise sigma (scikit-image, channels averaged)."""
        import warnings

        from skimage.restoration import estimate_sigma

        idx = torch.linspace(0, len(images) - 1, min(len(images), NOISE_ESTIMATE_SAMPLE)).round().long().unique()
        arr = images[idx].detach().double().numpy()
        with warnings.catch_warnings():  # a flat image has no wavelet detail to estimate from: sigma 0
            warnings.simplefilter("ignore", RuntimeWarning)
            est = [estimate_sigma(a, channel_axis=0, average_sigmas=True) for a in arr]
        return float(np.median(np.nan_to_num(np.asarray(est, dtype=np.float64), nan=0.0)))

    def _null(self) -> torch.Tensor:
        if self.null_statistics is None or len(self.null_statistics) == 0:
            raise SchemeError("output-wu has no calibration: call calibrate() on held-out negatives first")
        return self.null_statistics

    def p_value(self, statistics: torch.Tensor) -> float:
        """The conformal p-value of the median of ``statistics`` ``(m,)``, the largest over conditions (module
        docs)."""
        m = len(statistics)
        med = float(torch.quantile(statistics.double(), 0.5, interpolation="lower")) if m > 1 else float(statistics[0])
        factor = m / math.ceil(m / 2)
        return min(1.0, max(factor * (int((v >= med).sum()) + 1) / (len(v) + 1)
                            for v in self.null_by_condition().values()))

    # -- verification -----------------------------------------------------------
    def verify(self, target: Any, *, alpha: float = 0.01, inputs: torch.Tensor | None = None,
               **kwargs: Any) -> Verdict:
        """Verdict on suspect images: ``target`` a tensor ``(m, C, H, W)`` in [0, 1], or a model / oracle
        queried with ``inputs``. ``owned``: ``p < alpha`` (default 0.01, the calibrated false-positive level)."""
        if kwargs:
            raise SchemeError(f"unknown verify option(s): {', '.join(sorted(kwargs))}")
        if not 0.0 < alpha < 1.0:
            raise SchemeError(f"alpha must be in (0, 1), got {alpha}")
        notes: list[str] = []
        if isinstance(target, (list, tuple)):
            target, notes = self.prepare_images(target)
        elif not isinstance(target, torch.Tensor):
            if inputs is None or not callable(target):
                raise SchemeError("output-wu verifies images: pass a tensor of images, or a model/oracle and inputs")
            with torch.no_grad():
                target = target(inputs)
        images = self._check_images(target, "suspect images")
        by_cond = self.null_by_condition()
        n, m = len(self._null()), len(images)
        floor = self.min_alpha(m)
        if alpha <= floor:
            raise SchemeError(f"alpha {alpha:g} is below the smallest p-value {floor:.3g} that the calibration "
                              f"({min(len(v) for v in by_cond.values())} negatives in its smallest condition) gives "
                              f"{m} image(s): use alpha above it (e.g. --alpha 0.01) or calibrate on more negatives")
        noise = self.estimated_noise(images)
        limit = NOISE_ESTIMATE_MARGIN * self.calibrated_noise()
        if noise > limit:
            raise SchemeError(f"the suspect images look noised (median estimated sigma {noise:.3f}) beyond what this "
                              f"key's calibration covers (noise up to sigma {self.calibrated_noise():g}): no valid "
                              "p-value for them (heavier noise raises E's statistic on innocent images)")
        stats = self.statistics(images)
        p = self.p_value(stats)
        thr = self.threshold(alpha)
        from scipy.stats import binomtest

        per_condition = {}
        for name, v in by_cond.items():
            k_g = int((v >= thr).sum()) if math.isfinite(thr) else 0
            ci = binomtest(k_g, len(v)).proportion_ci(0.95, method="exact")
            per_condition[name] = {"fpr": k_g / len(v), "n": len(v), "ci95": [float(ci.low), float(ci.high)]}
        k_thr = int((self._null() >= thr).sum()) if math.isfinite(thr) else 0
        ci = binomtest(k_thr, n).proportion_ci(0.95, method="exact")
        median = float(torch.quantile(stats, 0.5, interpolation="lower"))
        null_h = (f"the {m} image(s) were not produced by the host marked with this key: their detection "
                  "statistics are exchangeable with the calibration negatives of one of the conditions "
                  + ", ".join(f"{k} ({len(v)})" for k, v in by_cond.items())
                  + " (negatives: " + ", ".join(f"{k} {v}" for k, v in self.null_counts.items())
                  + f"); p = the largest over conditions of {m}/ceil({m}/2) * (k+1)/(n+1) at their median (any "
                  "dependence between them). Not a binomial test: E's output bits are not independent.")
        return Verdict(
            scheme=self.name, owned=bool(p < alpha), p_value=float(p), alpha=float(alpha), statistic=median, n=m,
            null_hypothesis=null_h,
            details={"statistic": "median over images of <E(image,k), w>/<w, w> (1 = watermark, 0 = blank)"
                     + (f", each image's the mean over its {(self.read_size // self.image_size) ** 2} aligned "
                        f"{self.image_size}x{self.image_size} tiles" if self.read_size != self.image_size else ""),
                     "read_size": self.read_size,
                     "per_image_min": float(stats.min()), "per_image_max": float(stats.max()),
                     "images_over_threshold": int((stats >= thr).sum()), "threshold": thr,
                     "calibration_negatives": n, "calibration_kinds": dict(self.null_counts),
                     "calibration_fpr_at_threshold": k_thr / n,
                     "calibration_fpr_ci95": [float(ci.low), float(ci.high)],
                     "calibration_fpr_per_condition": per_condition,
                     "key_id": self.key.key_id, "recipe": self.recipe, "watermark": self.watermark_kind,
                     "estimated_noise_sigma": noise, "noise_limit": limit, "conversions": notes})

    # -- persistence --------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "watermark": self.watermark_kind, "image_size": self.image_size,
                "read_size": self.read_size, "channels": self.channels, "wm_size": self.wm_size,
                "key_bits": self.key_bits, "width": self.width,
                "key_channels": self.key_channels, "key_path": self.key_path, "key_init": self.key_init,
                "distance": self.distance, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "theta": self.theta, "hard_negatives": self.hard_negatives, "contrast": self.contrast,
                "fidelity_db": self.fidelity_db, "fidelity_warmup": self.fidelity_warmup,
                "fidelity_start_db": self.fidelity_start_db, "t_d": self.t_d, "wrong_keys": self.wrong_keys,
                "augment": self.augment, "lr": self.lr, "film_lr": self.film_lr, "null_counts": self.null_counts,
                "null_conditions": self.null_conditions}

    def material(self) -> dict[str, torch.Tensor]:
        """E's weights (``extractor.*``) and the calibration statistics: secret, never ship them with a model."""
        out = {f"extractor.{k}": v.detach().clone() for k, v in self.extractor.state_dict().items()}
        if self.null_statistics is not None and self.null_condition_index is not None:
            out["null_statistics"] = self.null_statistics.clone()
            out["null_condition_index"] = self.null_condition_index.clone()
        return out

    @classmethod
    def from_params(cls, key: Key, params: dict[str, Any], material: dict[str, torch.Tensor]) -> OutputWu:
        params = dict(params)
        params.pop("model_spec", None)
        counts = params.pop("null_counts", None)
        conditions = params.pop("null_conditions", None)
        if conditions is not None and (not isinstance(conditions, list) or len(conditions) > MAX_CONDITIONS
                                       or not all(isinstance(c, str) for c in conditions)):
            raise SchemeError(f"output-wu key file: null_conditions must be a list of at most {MAX_CONDITIONS} names")
        state = {k[len("extractor."):]: v for k, v in material.items() if k.startswith("extractor.")}
        if not state:
            raise SchemeError("this output-wu key file has no extraction network")
        known = {p.name for p in cls.PARAMS}
        unknown = set(params) - known
        if unknown:
            raise SchemeError(f"output-wu key file: unknown parameter(s) {', '.join(sorted(unknown))}")
        try:
            return cls(key, state=state, null_statistics=material.get("null_statistics"), null_counts=counts,
                       null_conditions=conditions, null_condition_index=material.get("null_condition_index"),
                       **cls.PARAMS.resolve(params, owner="key file"))
        except RuntimeError as exc:  # a state dict that does not fit the declared network
            raise SchemeError(f"output-wu key file: the extraction network does not fit its parameters ({exc})") \
                from None


#: distortions of innocent images the null is calibrated on (name, parameter); see :mod:`nnmark.outputs.augment`
CALIBRATION_DISTORTIONS: tuple[tuple[str, float], ...] = (
    ("crop", 0.75), ("crop", 0.5), ("crop", 0.25), ("noise", 0.05), ("noise", 0.1), ("jpeg", 50), ("jpeg", 80),
    ("resize", 0.5))


def distortion_name(distortion: tuple[str, float]) -> str:
    """``("noise", 0.1)`` -> ``"noise 0.1"`` (a calibration condition's name)."""
    kind, v = distortion
    return f"{kind} {int(v) if kind == 'jpeg' else v:g}"


def distort_one(img: torch.Tensor, distortion: tuple[str, float], gen: torch.Generator) -> torch.Tensor:
    """``img`` ``(1, C, H, W)`` under one named distortion (``crop`` keep fraction, ``noise`` sigma, ``jpeg``
    quality through Pillow, ``resize`` scale)."""
    from nnmark.outputs import augment

    kind, v = distortion
    if kind == "crop":
        return augment.crop_keep(img, v, gen)
    if kind == "noise":
        return augment.gaussian_noise(img, v, gen)
    if kind == "jpeg":
        return augment.jpeg_real(img, int(v))
    if kind == "resize":
        return augment.resize(img, v)
    raise ValueError(f"unknown distortion {kind!r}")


def key_bits_of(key: Key, n_bits: int) -> torch.Tensor:
    """The owner's extraction key bits ``(n_bits,)`` (see :func:`~nnmark.outputs.wu_network.key_bits`)."""
    return key_bits(key, n_bits)


def rejection_rates(scheme: OutputWu, images: torch.Tensor, flips: list[int], alpha: float = 0.01,
                    seed: int = 0) -> dict[int, float]:
    """For each number of flipped key bits: the share of ``images`` whose single-image statistic under a
    random key that far from the owner's stays below the calibrated threshold at ``alpha`` (1 = all rejected)."""
    thr = scheme.threshold(alpha)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for f in flips:
        wrong = flip_bits(scheme.bits, torch.full((len(images),), int(f)), gen)
        out[int(f)] = float((scheme.statistics(images, wrong) < thr).double().mean())
    return out


__all__ = ["OutputWu", "WuHook", "RECIPES", "rejection_rates", "np"]
