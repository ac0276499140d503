"""What a host network is for: the task decides the loss, how outputs are read and what fidelity means.

The training loop, the local oracle, the prediction server and the fidelity figures
of experiments all ask the model's task instead of assuming classification:

- :class:`Classification` -- outputs are logits ``(N, classes)``; loss: cross-entropy
  (per-sample weights for trigger samples); read-out: the arg-max label ``(N,)``
  int64; fidelity: accuracy (a fraction in [0, 1]).
- :class:`ImageToImage` -- outputs are images ``(N, C, H, W)`` in [0, 1] (denoising,
  super-resolution, colourisation...); loss: L1 (default) or MSE per pixel; read-out:
  the image clamped to [0, 1] (float32); fidelity: PSNR in dB against the targets
  (peak 1.0), averaged over images.

A model says which task it has through ``model.task`` (a :class:`Task` or its name)
or ``model.spec["task"]``; without either it is a classifier (:func:`task_of`).
A dataset for an image-to-image task holds target images in ``y`` (same count as
``x``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.errors import NNMarkError
from nnmark.params import Param, Params


class TaskError(NNMarkError):
    """A task name is unknown or data does not fit the task."""


class Task(ABC):
    """The task protocol: ``loss``, ``read`` (what an oracle answers), ``fidelity`` (one number)."""

    name: ClassVar[str] = ""
    #: what :meth:`fidelity` measures, with its unit
    fidelity_name: ClassVar[str] = ""
    PARAMS: ClassVar[Params] = Params()

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Scalar training loss; ``weights`` ``(N,)`` scale each sample (``sum(w * l) / N``)."""

    @abstractmethod
    def read(self, outputs: torch.Tensor) -> torch.Tensor:
        """What a black-box caller sees of a batch of outputs."""

    @abstractmethod
    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample fidelity ``(N,)`` of read-outs against targets (averaged by :meth:`fidelity`)."""

    @torch.no_grad()
    def fidelity(self, model: nn.Module, x: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
        """Mean :meth:`score` of ``model`` on ``(x, targets)`` (eval mode; the model's mode is restored)."""
        was = model.training
        model.eval()
        try:
            scores = [self.score(self.read(model(x[i:i + batch_size])), targets[i:i + batch_size])
                      for i in range(0, len(x), batch_size)]
        finally:
            model.train(was)
        if not scores:
            return float("nan")
        return float(torch.cat(scores).double().mean())

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "fidelity": self.fidelity_name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / len(per_sample)


class Classification(Task):
    """Logits ``(N, classes)`` -> labels; cross-entropy; accuracy."""

    name = "classification"
    fidelity_name = "accuracy (fraction)"

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        if targets.dtype != torch.long or targets.ndim != 1:
            raise TaskError(f"classification needs integer labels (N,), got {targets.dtype} {tuple(targets.shape)}")
        return _weighted_mean(F.cross_entropy(outputs, targets, reduction="none"), weights)

    def read(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(1)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs == targets).float()


class ImageToImage(Task):
    """Images in, images out (values in [0, 1]); L1 or MSE; PSNR (dB, peak 1)."""

    name = "image-to-image"
    fidelity_name = "PSNR (dB)"
    PARAMS = Params(Param("loss", str, "l1", "pixel loss", choices=("l1", "mse")))

    def __init__(self, loss: str = "l1") -> None:
        self.loss_name = self.PARAMS["loss"].parse(loss)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        if outputs.shape != targets.shape:
            raise TaskError(f"image-to-image outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
                            "differ in shape")
        diff = (outputs - targets).abs() if self.loss_name == "l1" else (outputs - targets) ** 2
        return _weighted_mean(diff.flatten(1).mean(1), weights)

    def read(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.clamp(0.0, 1.0).float()

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mse = ((outputs.double() - targets.double()) ** 2).flatten(1).mean(1)
        return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-12))

    def __repr__(self) -> str:
        return f"ImageToImage(loss={self.loss_name!r})"


TASKS: dict[str, type[Task]] = {Classification.name: Classification, ImageToImage.name: ImageToImage}


def get_task(task: Task | str | None) -> Task:
    """A :class:`Task` from an instance, a name (``"classification"``, ``"image-to-image"``) or ``None``
    (classification)."""
    if task is None:
        return Classification()
    if isinstance(task, Task):
        return task
    cls = TASKS.get(str(task).lower())
    if cls is None:
        raise TaskError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return cls()


def task_of(model: nn.Module) -> Task:
    """The task of ``model``: ``model.task``, else ``model.spec["task"]``, else classification."""
    task = getattr(model, "task", None)
    if task is None:
        spec = getattr(model, "spec", None)
        task = spec.get("task") if isinstance(spec, dict) else None
    return get_task(task)
