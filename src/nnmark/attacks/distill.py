"""Extraction and re-purposing: distil a fresh student from the suspect's answers; transfer to a new task.

- :class:`Distill` (``"distill"``, knockoff-style extraction): the attacker asks the suspect for ``queries``
  predictions on its own images (the attacker pool, topped up with shifted, noisy copies when the budget is
  larger than the pool) and trains a fresh, randomly initialised student -- the suspect's architecture
  (``student="same"``) or another zoo architecture -- on the answers: the labels (``labels="hard"``, what a
  label-only API gives) or the probabilities at ``temperature`` (``"soft"``). ``cost["queries"]`` is the
  number of predictions asked. The suspect is only ever called, never read.
- :class:`TransferLearning` (``"transfer"``): the stolen model re-purposed for a new task of ``classes``
  classes (here: the attacker's labels modulo ``classes``) -- a fresh head, then fine-tuning (all layers, or
  the head only with ``freeze_body``). The result has another output layer, so a key made for the original
  architecture refuses it as another architecture.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from nnmark.attacks.base import SEED, Attack, AttackError
from nnmark.data.dataset import ImageDataset
from nnmark.models import head_of, model_spec
from nnmark.models.zoo import ARCHITECTURES
from nnmark.params import Param, Params
from nnmark.train import TrainConfig, seeded_model, train


def query_pool(data: ImageDataset, queries: int, seed: int) -> torch.Tensor:
    """``queries`` attacker images ``(queries, C, H, W)``: the pool in a seeded order, then (beyond its size)
    copies shifted by up to one pixel with Gaussian noise (sd 0.05), clipped to [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    if queries <= len(data):
        return data.x[order[:queries]]
    extra = queries - len(data)
    idx = torch.randint(0, len(data), (extra,), generator=gen)
    x = data.x[idx].clone()
    shifts = torch.randint(-1, 2, (extra, 2), generator=gen)
    for i in range(extra):
        x[i] = torch.roll(x[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return torch.cat([data.x[order], x])


@torch.no_grad()
def ask(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The suspect's outputs (logits) on ``x``, in eval mode, batch by batch."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x[i: i + batch_size]).float() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)


class Distill(Attack):
    """Train a fresh student on the suspect's answers to ``queries`` attacker queries (see the module docs)."""

    name = "distill"
    needs_data = True
    budget = "queries"
    PARAMS = Params(
        Param("queries", int, 1000, "budget: predictions asked of the suspect", low=1),
        Param("student", str, "same", "the student's architecture: same (the suspect's spec) or a zoo architecture",
              choices=("same", *ARCHITECTURES)),
        Param("labels", str, "soft", "train on the answers' labels (hard) or probabilities (soft)",
              choices=("hard", "soft")),
        Param("temperature", float, 2.0, "soft labels: softmax temperature of teacher and student", low=1e-3),
        Param("epochs", int, 30, "passes over the queried set", low=1),
        Param("lr", float, 1e-3, "learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "samples per step", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        assert data is not None
        suspect = models[0]
        spec = getattr(suspect, "spec", None)
        if spec is None and self.student == "same":
            raise AttackError("distill with student=same needs the suspect's spec; name a zoo architecture")
        x = query_pool(data, self.queries, self.seed)
        logits = ask(suspect, x)
        self.cost["queries"] = int(len(x))
        num_classes = int(logits.shape[1])
        student_spec = dict(spec) if self.student == "same" else model_spec(self.student, data.image_shape,
                                                                            num_classes)
        student = seeded_model(student_spec, self.seed + 1)
        if self.labels == "hard":
            train(student, ImageDataset(x, logits.argmax(1), num_classes, "queries"),
                  TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                              progress=False), description="distill")
            return student.eval()
        target = F.softmax(logits / self.temperature, dim=1)
        opt = torch.optim.Adam(student.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            student.train()
            for _ in range(self.epochs):
                order = torch.randperm(len(x), generator=gen)
                for i in range(0, len(x), self.batch_size):
                    idx = order[i: i + self.batch_size]
                    out = F.log_softmax(student(x[idx]) / self.temperature, dim=1)
                    loss = F.kl_div(out, target[idx], reduction="batchmean") * self.temperature ** 2
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return student.eval()


class TransferLearning(Attack):
    """Re-purpose a copy for a ``classes``-class task (attacker labels modulo ``classes``): a fresh head, then
    ``epochs`` of fine-tuning (see the module docs)."""

    name = "transfer"
    needs_data = True
    budget = "epochs"
    PARAMS = Params(
        Param("classes", int, 2, "classes of the new task (labels: the attacker's labels modulo this)", low=2),
        Param("freeze_body", bool, False, "train the new head only (default: all layers)"),
        Param("epochs", int, 10, "budget: passes over the attacker's data", low=1),
        Param("lr", float, 1e-3, "learning rate (Adam)", low=0.0),
        Param("batch_size", int, 64, "samples per step", low=1),
        SEED,
    )

    def run(self, models: list[nn.Module], data: ImageDataset | None) -> nn.Module:
        assert data is not None
        stolen = copy.deepcopy(models[0])
        old = head_of(stolen)
        gen = torch.Generator().manual_seed(self.seed)
        head = nn.Linear(old.in_features, self.classes)
        with torch.no_grad():
            bound = 1.0 / old.in_features ** 0.5
            head.weight.copy_(torch.empty_like(head.weight).uniform_(-bound, bound, generator=gen))
            head.bias.copy_(torch.empty_like(head.bias).uniform_(-bound, bound, generator=gen))
        stolen.head = head
        spec = getattr(stolen, "spec", None)
        if spec is not None:
            stolen.spec = {**spec, "num_classes": self.classes}
        task = ImageDataset(data.x, data.y % self.classes, self.classes, f"{data.name}-mod{self.classes}")
        params = head.parameters() if self.freeze_body else stolen.parameters()
        train(stolen, task, TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                                        progress=False), params=params, description="transfer")
        return stolen.eval()
