"""One training loop for plain training, embedding and fine-tuning attacks.

:func:`train` runs mini-batch training with a progress bar, a fixed seed, and
optional early stopping on validation accuracy. Schemes plug in through
:class:`TrainingHook` objects: extra samples mixed into each batch (trigger sets),
an extra loss term (weight regularisers), and callbacks after each step / epoch
(for schemes that train secret networks of their own). The same hooks can be
called from a user's own PyTorch loop; see :class:`TrainingHook`.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.data.dataset import ImageDataset
from nnmark.models import build_model
from nnmark.tasks import Task, get_task, task_of


class TrainingHook:
    """Base class of scheme hooks; every method is optional (default: no effect).

    The lifecycle is the same in nnmark's loop (:meth:`nnmark.schemes.Scheme.embed`), in the
    Lightning callback and in your own loop: for each step::

        x, y, *w = hook.augment_batch(x, y, step)    # e.g. adds trigger samples
        loss = weighted_cross_entropy(model(x), y, w[0] if w else None)
        reg = hook.loss(model)                      # e.g. a weight regulariser
        if reg is not None: loss = loss + reg
        loss.backward(); optimizer.step(); hook.after_step(model, step)
        ...; hook.on_epoch_end(model, epoch)       # once per epoch
    hook.finalize(model)                            # once, after the last step, before saving the key
    """

    def augment_batch(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        """Return the batch to train on: ``(x, y)`` or ``(x, y, w)`` with per-sample
        loss weights ``w`` ``(N,)`` (default: the batch unchanged, all weights 1)."""
        return x, y

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the task loss, or ``None``."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> None:
        """Called after each epoch."""

    def finalize(self, model: nn.Module) -> Any:
        """Called once when training is over, before the key is saved: what the scheme must do with the
        finished host (Wang: train its secret network alone on it; weight marks: record the marked
        model's unit signature for alignment)."""
        return None


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    ``epochs``: passes over the training data (default 8). ``batch_size``: clean
    samples per step (default 64). ``optimizer``: ``"adam"`` or ``"sgd"``
    (momentum 0.9). ``lr``: learning rate (default 1e-3). ``max_steps``: stop
    after this many steps in total (an attacker's budget in batches).
    ``patience``: stop after this many epochs without a better validation
    accuracy and restore the best weights (``None``: no early stopping).
    """

    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_steps: int | None = None
    patience: int | None = None
    seed: int = 0
    progress: bool | None = None  # None: show when stderr is a terminal


@dataclass
class TrainRecord:
    """What happened during :func:`train` (JSON-able via :meth:`to_dict`)."""

    epochs_run: int = 0
    steps: int = 0
    seconds: float = 0.0
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy; with per-sample weights ``w`` ``(N,)`` it is ``sum(w * ce) / N``
    (so weights of 1 give the usual mean)."""
    if w is None:
        return F.cross_entropy(logits, y)
    return get_task("classification").loss(logits, y, w)


def _augment(hook: TrainingHook, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None,
             step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    n = len(y)
    out = hook.augment_batch(x, y, step)
    x2, y2 = out[0], out[1]
    w2 = out[2] if len(out) > 2 else None
    if w is None and w2 is None:
        return x2, y2, None
    if w is None:
        w = torch.ones(n)
    if w2 is None:
        w2 = torch.ones(len(y2))
    # a hook appends samples after the first n; keep the weights set so far for those
    w2 = w2.clone()
    w2[:n] = w2[:n] * w
    return x2, y2, w2


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adam or sgd)")


def _progress_enabled(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


def train(
    model: nn.Module,
    data: ImageDataset,
    config: TrainConfig | None = None,
    *,
    val: ImageDataset | None = None,
    hooks: Sequence[TrainingHook] = (),
    params: Iterable[torch.nn.Parameter] | None = None,
    description: str = "training",
    task: Task | str | None = None,
) -> TrainRecord:
    """Train ``model`` in place on ``data``; return a :class:`TrainRecord`.

    ``params``: the parameters to optimise (default: all of the model's).
    ``task``: the loss and the validation figure (default: :func:`nnmark.tasks.task_of` the model --
    classification unless the model says otherwise; for an image-to-image task ``data.y`` holds the
    target images and ``val_accuracy`` records the validation PSNR in dB).
    ``hooks``: scheme hooks, applied in order. Shuffling is seeded by
    ``config.seed``, so the same inputs give the same model.
    """
    cfg = config or TrainConfig()
    # Dropout and other layers draw from torch's global generator: seed it from
    # cfg.seed inside a forked RNG state so training is reproducible and the
    # caller's global random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _train(model, data, cfg, val, hooks, params, description,
                      task_of(model) if task is None else get_task(task))


def _train(model: nn.Module, data: ImageDataset, cfg: TrainConfig, val: ImageDataset | None,
           hooks: Sequence[TrainingHook], params: Iterable[torch.nn.Parameter] | None,
           description: str, task: Task) -> TrainRecord:
    record = TrainRecord(config=asdict(cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model.parameters() if params is None else params, cfg)
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    best_acc, best_state, stale = -1.0, None, 0
    start = time.perf_counter()
    show = _progress_enabled(cfg.progress)
    progress = None
    if show:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} steps"),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                            transient=True)
        progress.start()
        task = progress.add_task(description, total=total, info="")
    step = 0
    try:
        for epoch in range(cfg.epochs):
            model.train()
            losses = []
            for x, y in data.batches(cfg.batch_size, shuffle=True, generator=gen):
                if step >= total:
                    break
                w = None
                for h in hooks:
                    x, y, w = _augment(h, x, y, w, step)
                loss = task.loss(model(x), y, w)
                for h in hooks:
                    extra = h.loss(model)
                    if extra is not None:
                        loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for h in hooks:
                    h.after_step(model, step)
                losses.append(float(loss.detach()))
                step += 1
                if progress is not None:
                    progress.update(task, advance=1, info=f"epoch {epoch + 1} loss {losses[-1]:.3f}")
            record.train_loss.append(sum(losses) / max(1, len(losses)))
            record.epochs_run = epoch + 1
            for h in hooks:
                h.on_epoch_end(model, epoch)
            if val is not None:
                acc = task.fidelity(model, val.x, val.y)
                record.val_accuracy.append(acc)
                if acc > best_acc:
                    best_acc, stale, record.best_epoch = acc, 0, epoch + 1
                    if cfg.patience is not None:
                        best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
                if cfg.patience is not None and stale >= cfg.patience:
                    break
            if step >= total:
                break
    finally:
        if progress is not None:
            progress.stop()
    if best_state is not None and cfg.patience is not None:
        model.load_state_dict(best_state)
    record.steps = step
    record.seconds = time.perf_counter() - start
    model.eval()
    return record


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels ``(N,)`` for images ``x`` ``(N, C, H, W)`` (eval mode)."""
    was_training = model.training
    model.eval()
    out = [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: nn.Module, data: ImageDataset) -> float:
    """Fraction of ``data`` classified correctly (the classification task's fidelity)."""
    return get_task("classification").fidelity(model, data.x, data.y, batch_size=512)


def seeded_model(spec: dict[str, Any], seed: int) -> nn.Module:
    """``build_model(spec)`` with weights initialised from ``seed``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_model(spec)
    finally:
        torch.random.set_rng_state(state)
