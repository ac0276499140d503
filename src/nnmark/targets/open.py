"""``open_target``: a suspect in any form -> a :class:`~nnmark.targets.base.Target`.

Files are recognised by their bytes first, then by their extension:

======================================  =========================================
first bytes / extension                 target
======================================  =========================================
safetensors header with nnmark metadata :class:`NNMarkFileTarget` (``nnmark.io``)
safetensors header without it           :class:`StateDictTarget` (bare state dict)
zip or pickle, ``.pt`` / ``.pth``       :class:`StateDictTarget` via
                                        ``torch.load(weights_only=True)``
``.onnx``                               :class:`OnnxTarget`
======================================  =========================================

A zip archive or a pickle under any other name (``.safetensors``, ``.onnx``,
none) is refused: nnmark never unpickles a file that did not say what it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from nnmark.targets.base import Target, TargetError
from nnmark.targets.module import ModuleTarget
from nnmark.targets.nnmark_file import NNMarkFileTarget
from nnmark.targets.readers import file_size, read_safetensors, read_safetensors_header, read_torch_weights
from nnmark.targets.state_dict import StateDictTarget

TORCH_SUFFIXES = (".pt", ".pth")


def sniff(path: Path) -> str:
    """``"safetensors"``, ``"zip"``, ``"pickle"`` or ``"unknown"`` from the first bytes of ``path``."""
    file_size(path)
    with path.open("rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5) or head[:2] in (b"(d", b"(l", b"}q", b"]q"):
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def open_target(ref: Any, *, factory: str | None = None, factory_kwargs: dict[str, Any] | str | None = None,
                expect_spec: dict[str, Any] | None = None, threads: int = 1, task: Any = None) -> Target:
    """The target for ``ref``: a :class:`Target` (returned as is), an ``nn.Module``, or a path.

    ``factory`` (``"package.module:callable"``) and ``factory_kwargs`` (dict or JSON
    object string) name the verifier's architecture for a bare state dict or an
    ONNX file; they are trusted code chosen by the verifier, never read from the
    file. ``expect_spec``: the architecture an nnmark model file must have.
    ``threads`` / ``task``: for an ONNX file's onnxruntime oracle.
    """
    if isinstance(ref, Target):
        return ref
    if isinstance(ref, nn.Module):
        return ModuleTarget(ref)
    if not isinstance(ref, (str, Path)):
        raise TargetError(f"cannot verify a {type(ref).__name__}: give an nn.Module or a model file path")
    path = Path(ref)
    kind = sniff(path)
    suffix = path.suffix.lower()
    if kind == "safetensors":
        meta = read_safetensors_header(path).get("__metadata__") or {}
        if "nnmark" in meta:
            return NNMarkFileTarget(path, expect_spec=expect_spec)
        tensors, _ = read_safetensors(path)
        return StateDictTarget(tensors, str(path), "safetensors-state-dict", factory=factory,
                               factory_kwargs=factory_kwargs)
    if kind in ("zip", "pickle"):
        if suffix not in TORCH_SUFFIXES:
            what = "a zip archive (torch.save format)" if kind == "zip" else "a Python pickle"
            raise TargetError(f"{path} is {what} named {suffix or 'without an extension'}; nnmark reads such files "
                              f"only as {'/'.join(TORCH_SUFFIXES)} through torch.load(weights_only=True)")
        return StateDictTarget(read_torch_weights(path), str(path), "torch-state-dict", factory=factory,
                               factory_kwargs=factory_kwargs)
    if suffix == ".safetensors":
        raise TargetError(f"{path} is not a safetensors file (bad header)")
    if suffix == ".onnx":
        from nnmark.targets.onnx_file import OnnxTarget

        return OnnxTarget(path, factory=factory, factory_kwargs=factory_kwargs, threads=threads, task=task)
    if suffix in TORCH_SUFFIXES:
        raise TargetError(f"{path} is not a torch.save file (neither zip nor pickle)")
    raise TargetError(f"{path}: unrecognised model file (expected .safetensors, .pt/.pth or .onnx)")
