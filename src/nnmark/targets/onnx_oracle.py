"""Black-box answers from an ONNX model run in onnxruntime (CPU, bounded threads).

The session is built from the checked, self-contained model bytes (see
:func:`nnmark.targets.onnx_file.load_onnx`), so onnxruntime never opens a file a
suspect names. Like :class:`nnmark.oracle.LocalOracle` the oracle counts the
images it answered and refuses to exceed a query budget.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nnmark.oracle import QueryBudgetExceeded
from nnmark.targets.base import TargetError, one_line


def _session(model: Any, threads: int, source: str) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise TargetError("running ONNX files needs onnxruntime: pip install 'nnmark[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise TargetError(f"onnxruntime cannot run {source}: {one_line(exc)[:200]}") from None


class OnnxOracle:
    """``x (N, C, H, W) float32 -> outputs`` from an ONNX model with one input.

    ``model``: an ``onnx.ModelProto`` with all tensors inline. ``budget``: most images
    answered (``None``: no limit). ``threads``: onnxruntime intra-op threads.
    ``task``: an object with ``read(outputs)`` (e.g. from :mod:`nnmark.tasks`);
    default: the arg-max label ``(N,)`` int64 of the first output, as for a classifier.
    A model with a fixed batch size is fed in chunks of that size (the last one padded).
    """

    def __init__(self, model: Any, budget: int | None = None, threads: int = 1, task: Any = None,
                 source: str = "the ONNX model") -> None:
        self.session = _session(model, threads, source)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise TargetError(f"{source} takes {len(inputs)} inputs; nnmark queries models with one image input")
        self.input = inputs[0]
        self.output = self.session.get_outputs()[0].name
        if self.input.type != "tensor(float)":
            raise TargetError(f"{source} takes {self.input.type}, not float32 images")
        self.source = source
        self.budget = budget
        self.task = task
        self.queries_used = 0
        self.requests = 0

    def _check_shape(self, x: torch.Tensor) -> int | None:
        shape = list(self.input.shape)
        if len(shape) != x.ndim or any(
                isinstance(d, int) and d != n for d, n in zip(shape[1:], x.shape[1:], strict=True)):
            raise TargetError(f"{self.source} expects input {shape}, got {list(x.shape)}")
        return shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The first output for ``x`` (e.g. logits), counted against the budget."""
        if self.budget is not None and self.queries_used + len(x) > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} images exceeded ({self.queries_used} used)")
        fixed = self._check_shape(x)
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        step = fixed or max(1, len(arr))
        outs = []
        for i in range(0, len(arr), step):
            chunk = arr[i: i + step]
            n = len(chunk)
            if fixed and n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), np.float32)])
            try:
                outs.append(self.session.run([self.output], {self.input.name: chunk})[0][:n])
            except Exception as exc:
                raise TargetError(f"onnxruntime failed on {self.source}: {one_line(exc)[:200]}") from None
        self.queries_used += len(x)
        self.requests += 1
        return torch.from_numpy(np.concatenate(outs)) if outs else torch.zeros(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long)
        out = self.raw(x)
        return self.task.read(out) if self.task is not None else out.argmax(1)
