"""One marked CNN verified from every form a suspect can take (white-box: the scheme reads a layer's weight)."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from nnmark import Key
from nnmark.models import model_spec
from nnmark.schemes import Uchida
from nnmark.targets import open_target
from nnmark.targets.export import export_onnx, quantize_onnx, quantize_torch_dynamic, quantize_torch_static
from nnmark.train import TrainConfig, seeded_model


@pytest.fixture(scope="module")
def marked(digits):
    model = seeded_model(model_spec("cnn", digits.image_shape, 10), 0)
    scheme = Uchida.create(Key.from_seed("forms"), model, bits=64)
    scheme.embed(model, digits.train, TrainConfig(epochs=2, seed=0, progress=False))
    return scheme, model


def test_every_form_verifies(marked, digits, tmp_path):
    scheme, model = marked
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "bare.safetensors")
    save_file({f"backbone.{k}": v for k, v in sd.items()}, tmp_path / "renamed.safetensors")
    export_onnx(model, tmp_path / "m.onnx", digits.test.x[:2], dynamo=False)
    quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", mode="dynamic")
    forms = {
        "module": model,
        "bare state dict": tmp_path / "bare.safetensors",
        "renamed state dict": open_target(tmp_path / "renamed.safetensors"),
        "onnx": tmp_path / "m.onnx",
        "onnx int8": tmp_path / "q.onnx",
        "torch int8 dynamic": quantize_torch_dynamic(model),
        "torch int8 static": quantize_torch_static(model, digits.train.x[:64]),
    }
    for name, form in forms.items():
        tensors = {"conv4": "backbone.conv4.weight"} if name == "renamed state dict" else None
        v = scheme.verify(form, tensors=tensors)
        assert v.owned and v.statistic >= 62, (name, v.summary())


def test_an_oracle_is_not_enough_for_a_weight_mark(marked):
    from nnmark.errors import SchemeError
    from nnmark.oracle import LocalOracle

    scheme, model = marked
    with pytest.raises(SchemeError, match="needs the model's weights"):
        scheme.verify(LocalOracle(model))
