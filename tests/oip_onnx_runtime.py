"""A minimal MLServer runtime that serves an ONNX file with onnxruntime (test code, not part of nnmark).

MLServer imports it in its own process (``"implementation": "oip_onnx_runtime.OnnxModel"`` in
``model-settings.json``; ``parameters.uri`` names the ``.onnx`` file). The model's metadata
(``GET /v2/models/{name}``) comes from the ONNX graph: input and output names, datatypes and
shapes, with ``-1`` for dynamic axes. Every output of the graph is answered, as a float tensor.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

_DATATYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def _metadata(arg: ort.NodeArg) -> MetadataTensor:
    shape = [d if isinstance(d, int) else -1 for d in arg.shape]
    return MetadataTensor(name=arg.name, datatype=_DATATYPES[arg.type], shape=shape)


class OnnxModel(MLModel):
    """One ONNX graph, run on one CPU thread."""

    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.inputs = [_metadata(a) for a in self._session.get_inputs()]
        self.outputs = [_metadata(a) for a in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {t.name: NumpyCodec.decode_input(t) for t in payload.inputs}
        names = [a.name for a in self._session.get_outputs()]
        values = self._session.run(names, feeds)
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(names, values, strict=True)])
