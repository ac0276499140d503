"""Oracles: anything that answers a batch of images with the model's visible outputs.

Black-box verification only needs ``oracle(x) -> outputs`` for images ``x`` of shape
``(N, C, H, W)`` (float32 in [0, 1]); the outputs are what the host's task shows a
caller (:meth:`nnmark.tasks.Task.read`): labels ``(N,)`` (int64) for a classifier,
images ``(N, C', H', W')`` in [0, 1] for an image-to-image network. A local model is
wrapped by :class:`LocalOracle`; a remote prediction API by
:class:`nnmark.serving.client.HTTPOracle`. Both count the queries (images) they
answered, and refuse to exceed a query budget.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from nnmark.errors import OracleError
from nnmark.tasks import Task, get_task, task_of


@runtime_checkable
class Oracle(Protocol):
    """A black box: images ``(N, C, H, W)`` -> outputs (labels ``(N,)`` or images)."""

    queries_used: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class QueryBudgetExceeded(OracleError):
    """More queries were requested than the oracle's budget allows."""


class LocalOracle:
    """Wraps a local model as an oracle, with an optional query budget (images).

    ``task``: how outputs are read (default: the model's task, see :func:`nnmark.tasks.task_of`)."""

    def __init__(self, model: nn.Module, budget: int | None = None, task: Task | str | None = None) -> None:
        self.model = model.eval()
        self.task = task_of(model) if task is None else get_task(task)
        self.budget = budget
        self.queries_used = 0
        self.requests = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.budget is not None and self.queries_used + len(x) > self.budget:
            raise QueryBudgetExceeded(
                f"query budget of {self.budget} images exceeded ({self.queries_used} used)"
            )
        self.queries_used += len(x)
        self.requests += 1
        return self.task.read(self.model(x))
