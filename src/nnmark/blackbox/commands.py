"""What ``nnmark fingerprint issue`` / ``trace`` do for a black-box (Tardos) product; click lives in
:mod:`nnmark.cli_fingerprint`, which calls these.

    nnmark fingerprint issue --product shop/ --base base.safetensors --customers 20 --code tardos:512
    nnmark fingerprint trace --product shop/ --url http://host:8000 [--protocol oip] [--budget 300] [--answers labels]
    nnmark fingerprint trace leaked.safetensors --product shop/      # a local file, through the same queries

Issuing with several ``workers`` uses spawned processes, each opening the product from its directory (the key
is read from the key file, never passed), so the registry's atomic reservations and leases keep one code per
customer whatever the processes do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnmark.errors import NNMarkError

CODE_SPEC = re.compile(r"\s*tardos\s*:\s*(\d+)\s*")


def parse_tardos(spec: str) -> int | None:
    """``"tardos:512"`` -> 512; ``None`` when ``spec`` is not a Tardos code spec."""
    m = CODE_SPEC.fullmatch(str(spec).lower())
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Outcome:
    """One customer's issue: ``file`` and ``sha256`` on success, else ``error`` (one line)."""

    customer: str
    file: str | None = None
    sha256: str | None = None
    code: int | None = None
    error: str | None = None


def _issue_batch(product: str, key_file: str | None, names: list[str]) -> list[Outcome]:
    import torch

    from nnmark.blackbox.product import BlackBoxProduct

    torch.set_num_threads(1)
    prod = BlackBoxProduct.open(product, key_file=key_file)
    out = []
    for name in names:
        try:
            c = prod.issue(name)
            out.append(Outcome(name, c.model_path, c.model_sha256, c.code_index))
        except (NNMarkError, OSError, ValueError) as exc:
            out.append(Outcome(name, error=f"{type(exc).__name__}: {exc}"))
    prod.registry.close()
    return out


def issue_many(product: str | Path, names: list[str], workers: int = 1, key_file: str | None = None) -> list[Outcome]:
    """Issue a copy to each of ``names`` (in this process, or ``workers`` spawned processes)."""
    if workers < 1:
        raise NNMarkError("workers must be >= 1")
    if not names:
        return []
    if workers == 1:
        return _issue_batch(str(product), key_file, list(names))
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    batches = [list(names[i::workers]) for i in range(min(workers, len(names)))]
    with ProcessPoolExecutor(len(batches), mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_issue_batch, [str(product)] * len(batches), [key_file] * len(batches), batches))
    by_name = {o.customer: o for batch in results for o in batch}
    return [by_name[n] for n in names]


def create_product(root: Path, base: str, code: str, key: Any, *, capacity: int, colluders: int, noise: float,
                   data: str | None, steps: int | None, lr: float | None, alpha: float | None,
                   method: str = "finetune", delta: float | None = None) -> Any:
    """A new black-box product from a ``tardos:M`` code spec; ``method``: how copies are made (``"finetune"``
    or ``"tilt"``, :class:`~nnmark.blackbox.issue.BlackBoxIssueConfig`), ``delta``: the tilt's size."""
    from nnmark.blackbox.issue import BlackBoxIssueConfig
    from nnmark.blackbox.product import BlackBoxProduct
    from nnmark.blackbox.trace import DEFAULT_ALPHA

    m = parse_tardos(code)
    if m is None:
        raise NNMarkError(f"not a Tardos code spec: {code!r} (use tardos:M, e.g. tardos:512)")
    try:
        cfg = BlackBoxIssueConfig(method=method, **{k: v for k, v in (("steps", steps), ("lr", lr), ("delta", delta))
                                                    if v is not None})
    except ValueError as exc:
        raise NNMarkError(str(exc)) from None
    try:
        return BlackBoxProduct.create(root, base, key=key, m=m, capacity=capacity, colluders=colluders, noise=noise,
                                      data=data, issue=cfg, alpha=DEFAULT_ALPHA if alpha is None else alpha)
    except ValueError as exc:
        raise NNMarkError(str(exc)) from None


def trace_report(product: str, key_file: str | None, suspect: str | None, url: str | None, *, protocol: str,
                 model_name: str | None, budget: int | None, stop: str, timeout: float,
                 answers: str = "auto") -> dict[str, Any]:
    """Trace a suspect file or API with a black-box product; the report as a JSON-able dict. ``answers="auto"``
    asks the API for class scores (read as soft answers where it gives them, its labels otherwise) and reads a
    local file's probabilities; ``"labels"`` reads arg-max labels only."""
    from nnmark.blackbox.product import BlackBoxProduct

    prod = BlackBoxProduct.open(product, key_file=key_file)
    if (suspect is None) == (url is None):
        raise NNMarkError("give exactly one of a SUSPECT model file or --url")
    if url is not None:
        from nnmark.serving.client import HTTPOracle

        oracle: Any = HTTPOracle(url, budget=budget, timeout=timeout, protocol=protocol, model_name=model_name,
                                 scores=answers != "labels")
    else:
        from nnmark.blackbox.answers import ProbabilityOracle
        from nnmark.io import load_model
        from nnmark.oracle import LocalOracle

        model, _ = load_model(suspect, expect_spec=prod.config.spec)
        oracle = LocalOracle(model, budget=budget) if answers == "labels" else ProbabilityOracle(model, budget=budget)
    report = prod.trace(oracle, budget=budget, stop=stop, answers=answers)
    out = report.to_dict()
    out["product"] = prod.config.name
    out["suspect"] = url or suspect
    return out
