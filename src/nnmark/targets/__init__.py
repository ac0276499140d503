"""What is being verified: a suspect model in every form it can take.

:func:`open_target` turns an ``nn.Module`` or a file (nnmark model file, bare
safetensors or ``.pt`` state dict, ONNX export, int8 copies of any of them) into
a :class:`Target` with three views -- :meth:`~Target.weights` (white-box,
float32 by PyTorch name, dequantised), :meth:`~Target.module` (a runnable torch
module) and :meth:`~Target.oracle` (black-box answers with a query count).

Modules: ``base`` (the protocol), ``module`` (in-memory and PyTorch int8
modules), ``nnmark_file``, ``readers`` (bounded safetensors / ``torch.load``
readers), ``state_dict``, ``factory`` (``package.module:callable``
architectures), ``onnx_file`` / ``onnx_weights`` / ``onnx_oracle`` (ONNX via the
``onnx`` extra), ``open`` (:func:`open_target`) and ``export`` (making ONNX and
int8 copies for tests and experiments).
"""

from nnmark.targets.base import Target, TargetError
from nnmark.targets.factory import build_from_factory
from nnmark.targets.module import ModuleTarget
from nnmark.targets.nnmark_file import NNMarkFileTarget
from nnmark.targets.onnx_file import OnnxTarget
from nnmark.targets.open import open_target
from nnmark.targets.state_dict import StateDictTarget

__all__ = ["ModuleTarget", "NNMarkFileTarget", "OnnxTarget", "StateDictTarget", "Target", "TargetError",
           "build_from_factory", "open_target"]
