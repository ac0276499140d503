"""Targets: one suspect in every form it can take reads back to the same weights.

A small CNN trained on digits and a user architecture defined here (a residual
conv block with batch norm, a Linear over tokens) are written as every form a
suspect can take; each form's white-box read-out must equal the float original
exactly, or lie within half a quantisation step of it for int8 copies (the
step bounded from the original's own range, not read from the copy).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from nnmark.io import save_model
from nnmark.models import model_spec
from nnmark.oracle import QueryBudgetExceeded
from nnmark.targets import ModuleTarget, NNMarkFileTarget, OnnxTarget, StateDictTarget, TargetError, open_target
from nnmark.targets.export import export_onnx, quantize_onnx, quantize_torch_dynamic, quantize_torch_static
from nnmark.train import TrainConfig, seeded_model, train

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SPEC_OVERRIDES = {"channels": [16, 16, 32, 32], "dense": [64, 64], "dropout": 0.0}


class Block(nn.Module):
    """conv -> batch norm -> ReLU, added to its input."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


class UserNet(nn.Module):
    """A user's architecture on 8x8 images: stem conv, residual block, a Linear over 16 tokens, head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.block = Block(width)
        self.tok = nn.Linear(width, 16)
        self.head = nn.Linear(16 * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.stem(x)))
        tokens = nn.functional.avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (N, 16, width)
        return self.head(torch.relu(self.tok(tokens)).flatten(1))


def make_user_net(width: int = 8) -> UserNet:
    """Factory for ``--arch``: a UserNet with seeded weights and non-trivial batch-norm statistics."""
    gen = torch.Generator().manual_seed(width)
    net = UserNet(width)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        net.train()
        for _ in range(3):
            net(torch.rand(32, 1, 8, 8, generator=gen) * 2)
    return net.eval()


NOT_CALLABLE = 3


def make_broken() -> nn.Module:
    raise ValueError("width must be even\nsecond line of detail")


def make_not_a_module() -> dict:
    return {}


def _folded_reference(net: UserNet) -> dict[str, torch.Tensor]:
    """The conv weight and bias of ``net.block`` with its eval-mode batch norm folded in."""
    bn, conv = net.block.bn, net.block.conv
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return {"block.conv.weight": (conv.weight * g[:, None, None, None]).detach(),
            "block.conv.bias": ((conv.bias - bn.running_mean) * g + bn.bias).detach()}


def _act_range(model: nn.Module, x: torch.Tensor) -> float:
    """Largest calibration range (max(0, hi) - min(0, lo)) of the input of any Conv2d / Linear layer."""
    ranges: list[float] = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: ranges.append(
        float(a[0].clamp(min=0).max() - a[0].clamp(max=0).min())))
        for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return max(ranges)


def _bound(ref: dict[str, torch.Tensor], name: str, how: str, act_range: float) -> torch.Tensor:
    """Half a quantisation step for ``name`` read back after int8 / int32 quantisation described by ``how``.

    int8 / uint8 with scale s from the tensor's (or channel's) own range: s <= max|w| / 127.
    int32 biases use s = s_x * s_w, with s_x <= act_range / 255 and s_w <= max|w_c| / 127 of the layer's weight.
    """
    w = ref[name]
    if how.startswith("int32"):
        wc = ref[name.removesuffix(".bias") + ".weight"]
        return 0.5 * (act_range / 255) * wc.abs().flatten(1).max(1).values / 127
    if "per-tensor" in how or w.ndim == 1:
        return w.abs().max() / 254 * torch.ones_like(w)
    amax = w.abs().flatten(1).max(1).values  # per output channel (axis 0 in the torch layout)
    return (amax / 254).reshape(-1, *([1] * (w.ndim - 1))).expand_as(w)


def check_readout(weights: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], modes: dict[str, str],
                  act_range: float = 0.0) -> float:
    """Every tensor of ``ref`` read back: exactly, or within half a step where ``modes`` says it is quantised.

    Returns the largest error as a fraction of its bound (0 when every tensor is exact).
    """
    assert set(weights) == set(ref), (sorted(set(ref) - set(weights)), sorted(set(weights) - set(ref)))
    worst = 0.0
    for name, expect in ref.items():
        got = weights[name]
        assert got.dtype == torch.float32 and got.shape == expect.shape, name
        if name not in modes:
            assert torch.equal(got, expect), name
            continue
        err = (got - expect).abs()
        bound = _bound(ref, name, modes[name], act_range)
        assert bool((err <= bound * (1 + 1e-4) + 1e-9).all()), (name, modes[name], float((err / bound).max()))
        worst = max(worst, float((err / bound.clamp(min=1e-30)).max()))
    return worst


@pytest.fixture(scope="module")
def cnn(digits):
    torch.manual_seed(0)
    model = seeded_model(model_spec("cnn", digits.image_shape, 10, **SPEC_OVERRIDES), 0)
    train(model, digits.train, TrainConfig(epochs=2, seed=0, lr=3e-3, progress=False))
    return model.eval()


@pytest.fixture(scope="module")
def cnn_static(cnn, digits):
    """The CNN after PyTorch eager static int8 quantisation (a QuantWrapper), calibrated on 256 images."""
    return quantize_torch_static(cnn, digits.train.x[:256])


@pytest.fixture(scope="module")
def user_net():
    return make_user_net()


@pytest.fixture(scope="module")
def user_exports(user_net, tmp_path_factory):
    """The user architecture exported by both exporters with their defaults: {"dynamo" | "torchscript": path}."""
    d = tmp_path_factory.mktemp("user")
    x = torch.rand(4, 1, 8, 8)
    return {"dynamo": export_onnx(user_net, d / "dynamo.onnx", x),
            "torchscript": export_onnx(user_net, d / "ts.onnx", x, dynamo=False)}


def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.fixture(scope="module")
def cnn_files(cnn, cnn_static, digits, tmp_path_factory):
    """Every file form of the CNN: {form: path}. The dynamo export is torch's default call, which writes
    ``dynamo.onnx`` and its external data file ``dynamo.onnx.data``."""
    d = tmp_path_factory.mktemp("cnn")
    x = digits.train.x[:256]
    files = {"nnmark": save_model(d / "cnn.safetensors", cnn)}
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(d / "bare.safetensors"))
    files["bare-safetensors"] = d / "bare.safetensors"
    torch.save(cnn.state_dict(), d / "weights.pt")
    files["pt"] = d / "weights.pt"
    torch.onnx.export(cnn, (x[:2],), str(d / "dynamo.onnx"), dynamo=True, verbose=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    files["onnx-dynamo"] = d / "dynamo.onnx"
    files["onnx-torchscript"] = export_onnx(cnn, d / "ts.onnx", x[:2], dynamo=False)
    files["onnx-int8-dynamic"] = quantize_onnx(files["onnx-dynamo"], d / "dyn.onnx", "dynamic")
    files["onnx-int8-qdq"] = quantize_onnx(files["onnx-dynamo"], d / "qdq.onnx", "static", x)
    files["onnx-int8-qoperator"] = quantize_onnx(files["onnx-torchscript"], d / "qop.onnx", "static", x,
                                                 fmt="qoperator")
    torch.save(quantize_torch_dynamic(cnn).state_dict(), d / "qdyn.pt")
    files["pt-torch-int8-dynamic"] = d / "qdyn.pt"
    torch.save(cnn_static.state_dict(), d / "qstatic.pt")
    files["pt-torch-int8-static"] = d / "qstatic.pt"
    return files


# -- every form of the CNN ---------------------------------------------------------------------------------------

FLOAT_FORMS = ["nnmark", "bare-safetensors", "pt", "onnx-dynamo", "onnx-torchscript"]
ONNX_INT8 = ["onnx-int8-dynamic", "onnx-int8-qdq", "onnx-int8-qoperator"]


@pytest.mark.parametrize("form", FLOAT_FORMS)
def test_cnn_float_forms_read_back_exactly(cnn, cnn_files, form):
    target = open_target(cnn_files[form])
    assert check_readout(target.weights(), _floats(cnn), {}) == 0.0
    kinds = {"nnmark": "nnmark-file", "bare-safetensors": "safetensors-state-dict", "pt": "torch-state-dict"}
    assert target.describe()["kind"] == kinds.get(form, "onnx")
    json.dumps(target.describe())  # JSON-able, for verdicts
    assert open_target(target) is target
    if form == "onnx-dynamo":  # read through the external-data checks, then held inline
        assert cnn_files[form].with_suffix(".onnx.data").exists()
        assert all(not t.external_data for t in target.proto.graph.initializer)


@pytest.mark.parametrize("form", ONNX_INT8)
def test_cnn_onnx_int8_reads_back_within_half_a_step(cnn, cnn_files, digits, form):
    target = open_target(cnn_files[form])
    info = target.describe()
    json.dumps(info)
    modes = info["dequantized"]
    weights = [k for k in _floats(cnn) if k.endswith(".weight")]
    assert set(weights) <= set(modes)  # every weight was stored as int8 and dequantised
    assert all(modes[k].startswith("int8") for k in weights)
    if form != "onnx-int8-dynamic":  # static forms also store int32 biases
        assert {k for k in modes if k.endswith(".bias")} == {k for k in _floats(cnn) if k.endswith(".bias")}
    worst = check_readout(target.weights(), _floats(cnn), modes, _act_range(cnn, digits.train.x[:256]))
    assert 0.0 < worst <= 1.0 + 1e-4
    if form == "onnx-int8-dynamic":  # Gemm weights stored transposed by quantize_dynamic, read back as (out, in)
        assert "stored transposed" in modes["fc1.weight"]


@pytest.mark.parametrize("form", ["pt-torch-int8-dynamic", "pt-torch-int8-static"])
def test_cnn_torch_int8_state_dicts_read_back_within_half_a_step(cnn, cnn_files, form):
    target = open_target(cnn_files[form])
    assert target.describe()["quantized"]
    dense = ("fc1.weight", "fc2.weight", "head.weight")
    convs = ("conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight")
    if form == "pt-torch-int8-dynamic":
        modes = {k: "qint8 per-tensor" for k in dense}
    else:
        modes = {k: "qint8 per-channel" for k in dense + convs}
    assert 0.0 < check_readout(target.weights(), _floats(cnn), modes) <= 1.0 + 1e-4


def test_cnn_torch_int8_modules_read_back_within_half_a_step(cnn, cnn_static, digits):
    dense = ("fc1.weight", "fc2.weight", "head.weight")
    convs = ("conv1.weight", "conv2.weight", "conv3.weight", "conv4.weight")
    dyn = ModuleTarget(quantize_torch_dynamic(cnn))
    assert dyn.describe()["quantized"] and dyn.describe()["class"] == "nnmark.models.zoo.CNN"
    assert 0.0 < check_readout(dyn.weights(), _floats(cnn), {k: "per-tensor" for k in dense}) <= 1.0 + 1e-4
    static = cnn_static
    got = open_target(static).weights()
    assert 0.0 < check_readout(got, _floats(cnn), {k: "per-channel" for k in dense + convs}) <= 1.0 + 1e-4
    # the int8 copy still answers like the original on most images
    x = digits.test.x
    agree = (static(x).argmax(1) == cnn(x).argmax(1)).float().mean().item()
    assert agree > 0.9


@pytest.mark.parametrize("form", ["onnx-dynamo", "onnx-torchscript", "onnx-int8-qdq"])
def test_onnxruntime_oracle_answers_like_torch(cnn, cnn_files, digits, form):
    x = digits.test.x
    oracle = open_target(cnn_files[form]).oracle()
    labels = oracle(x)
    assert oracle.queries_used == len(x)
    torch_labels = cnn(x).argmax(1)
    if form == "onnx-int8-qdq":  # int8 activations: nearly the same answers
        assert (labels == torch_labels).float().mean().item() > 0.9
    else:
        assert torch.equal(labels, torch_labels)
        assert torch.allclose(oracle.raw(x[:50]), cnn(x[:50]), atol=1e-4)


def test_onnx_oracle_budget_and_shape(cnn_files, digits):
    oracle = open_target(cnn_files["onnx-dynamo"]).oracle(budget=10)
    oracle(digits.test.x[:6])
    with pytest.raises(QueryBudgetExceeded):
        oracle(digits.test.x[:6])
    assert oracle.queries_used == 6
    with pytest.raises(TargetError, match="expects input"):
        open_target(cnn_files["onnx-dynamo"]).oracle()(torch.zeros(2, 1, 9, 9))


def test_nnmark_file_target_runs_and_checks_spec(cnn, cnn_files, digits):
    target = open_target(cnn_files["nnmark"])
    assert isinstance(target, NNMarkFileTarget)
    assert torch.equal(target.oracle()(digits.test.x), cnn(digits.test.x).argmax(1))
    other = model_spec("lenet5", digits.image_shape, 10)
    with pytest.raises(TargetError, match="wrong architecture"):
        open_target(cnn_files["nnmark"], expect_spec=other).weights()


def test_files_run_through_the_verifiers_factory(cnn, cnn_files, digits):
    spec = json.dumps({"spec": model_spec("cnn", digits.image_shape, 10, **SPEC_OVERRIDES)})
    x = digits.test.x
    for form in ("bare-safetensors", "pt", "onnx-torchscript"):
        with pytest.raises(TargetError, match="--arch"):
            open_target(cnn_files[form]).module()
        model = open_target(cnn_files[form], factory="nnmark.models:build_model", factory_kwargs=spec).module()
        assert not model.training
        assert torch.equal(model(x), cnn(x)), form
    # an int8 copy, run in torch as the float architecture with its dequantised weights
    model = open_target(cnn_files["onnx-int8-qdq"], factory="nnmark.models:build_model", factory_kwargs=spec).module()
    assert (model(x).argmax(1) == cnn(x).argmax(1)).float().mean().item() > 0.9


# -- the user's own architecture -----------------------------------------------------------------------------------

def test_user_module_in_memory(user_net):
    target = open_target(user_net)
    assert isinstance(target, ModuleTarget)
    assert target.describe()["class"].endswith("UserNet")
    assert check_readout(target.weights(), _floats(user_net), {}) == 0.0
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(target.oracle()(x), user_net(x).argmax(1))
    assert target.module() is user_net


def test_user_state_dicts_with_factory(user_net, tmp_path):
    save_file(user_net.state_dict(), str(tmp_path / "u.safetensors"))
    torch.save(user_net.state_dict(), tmp_path / "u.pth")
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for name in ("u.safetensors", "u.pth"):
        bare = open_target(tmp_path / name)
        assert isinstance(bare, StateDictTarget)
        assert check_readout(bare.weights(), _floats(user_net), {}) == 0.0  # num_batches_tracked is left out
        model = open_target(tmp_path / name, factory=f"{__name__}:UserNet").module()
        assert torch.equal(model(x), user_net(x))
        assert torch.equal(model.block.bn.num_batches_tracked, user_net.block.bn.num_batches_tracked)


def test_user_net_onnx_exports_fold_batch_norm_and_rename(user_net, user_exports, tmp_path):
    """What the exporters emit for a user architecture, read back under its PyTorch names."""
    ref = {k: v for k, v in _floats(user_net).items() if not k.startswith("block.bn.")}
    folded = _folded_reference(user_net)
    for exporter, path in user_exports.items():
        target = open_target(path)
        assert target.describe()["producer"].startswith("pytorch"), exporter
        info = target.describe()
        got = target.weights()
        assert set(got) == set(ref)  # the batch norm's own tensors are gone, folded into the conv
        assert sorted(info["folded"]) == ["block.conv.bias", "block.conv.weight"]
        assert info["renamed"]["tok.weight"].endswith("(transposed)")  # a MatMul weight, stored (in, out)
        for k in ref:
            if k in folded:
                assert torch.allclose(got[k], folded[k], rtol=1e-5, atol=1e-6), k
            else:
                assert torch.equal(got[k], ref[k]), k
        oracle = target.oracle()
        xs = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(oracle.raw(xs), user_net(xs), atol=1e-4)
    # without the dynamo optimiser every tensor keeps its name and value
    plain = open_target(export_onnx(user_net, tmp_path / "plain.onnx", torch.rand(4, 1, 8, 8), optimize=False))
    assert check_readout(plain.weights(), _floats(user_net), {}) == 0.0
    assert "folded" not in plain.describe() and "renamed" not in plain.describe()
    # a folded export does not fit the torch architecture: the factory says what is missing, on one line
    with pytest.raises(TargetError, match="missing block.bn.weight") as exc:
        OnnxTarget(user_exports["dynamo"], factory=f"{__name__}:UserNet").module()
    assert "\n" not in str(exc.value)


def test_user_net_int8_copies(user_net, user_exports, tmp_path):
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    act = _act_range(user_net, x)
    ref = {k: v for k, v in _floats(user_net).items() if not k.startswith("block.bn.")}
    ref.update(_folded_reference(user_net))
    dyn = open_target(quantize_onnx(user_exports["torchscript"], tmp_path / "dyn.onnx", "dynamic"))
    modes = dyn.describe()["dequantized"]
    got = dyn.weights()
    # quantize_dynamic feeds a conv bias through Reshape + Add: the folded bias keeps its exporter name
    assert set(got) - set(ref) == set(dyn.describe()["unnamed"]) and len(dyn.describe()["unnamed"]) == 1
    got = {k: v for k, v in got.items() if k in ref}
    assert 0.0 < check_readout(got, {k: v for k, v in ref.items() if k != "block.conv.bias"}, modes, act) <= 1 + 1e-4
    qdq = open_target(quantize_onnx(user_exports["dynamo"], tmp_path / "qdq.onnx", "static", x))
    info = qdq.describe()
    assert info["renamed"]["tok.weight"].startswith("val_")  # renamed through its DequantizeLinear
    assert 0.0 < check_readout(qdq.weights(), ref, info["dequantized"], act) <= 1 + 1e-4
    tq = open_target(quantize_torch_dynamic(user_net))
    modes = {"tok.weight": "per-tensor", "head.weight": "per-tensor"}
    assert 0.0 < check_readout(tq.weights(), _floats(user_net), modes) <= 1 + 1e-4


def test_dequantize_linear_by_hand(tmp_path):
    """Per-channel uint8 with zero points, blocked int8, and a scale that does not fit, against hand values."""
    from onnx import TensorProto, helper, numpy_helper

    q1 = np.array([[10, 12, 0], [200, 255, 190]], np.uint8)
    s1, z1 = np.array([0.5, 2.0], np.float32), np.array([10, 200], np.uint8)
    q2 = np.array([[1, -2, 3, 4], [-5, 6, 7, -8]], np.int8)
    s2, z2 = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32), np.array([[0, 1], [-1, 0]], np.int8)
    inits = {"lin.weight_quantized": q1, "lin.weight_scale": s1, "lin.weight_zero_point": z1,
             "onnx::MatMul_5": q2, "s2": s2, "z2": z2,
             "bad_quantized": np.ones((2, 2), np.int8), "bad_scale": np.ones(3, np.float32)}
    nodes = [
        helper.make_node("DequantizeLinear", ["lin.weight_quantized", "lin.weight_scale", "lin.weight_zero_point"],
                         ["w1"], axis=0),
        helper.make_node("Gemm", ["x", "w1"], ["y"], name="/lin/Gemm", transB=1),
        helper.make_node("DequantizeLinear", ["onnx::MatMul_5", "s2", "z2"], ["w2"], axis=1, block_size=2),
        helper.make_node("MatMul", ["y", "w2"], ["z"], name="/proj/MatMul"),
        helper.make_node("DequantizeLinear", ["bad_quantized", "bad_scale"], ["w3"], axis=0),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("w3", TensorProto.FLOAT, [2, 2])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / "hand.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    target = open_target(path)
    w = target.weights()
    assert set(w) == {"lin.weight", "proj.weight"}
    lin = (q1.astype(np.float64) - z1[:, None]) * s1[:, None]
    assert np.allclose(w["lin.weight"].numpy(), lin, rtol=1e-6)
    proj = (q2 - np.repeat(z2, 2, axis=1).astype(np.float64)) * np.repeat(s2, 2, axis=1)
    assert np.allclose(w["proj.weight"].numpy(), proj.T, rtol=1e-6)
    info = target.describe()
    assert info["dequantized"]["lin.weight"] == "uint8 per-channel axis 0 (DequantizeLinear)"
    assert info["dequantized"]["proj.weight"] == "int8 per-block 2 axis 1 (DequantizeLinear)"
    assert info["renamed"] == {"proj.weight": "onnx::MatMul_5 (transposed)"}
    assert "3 scales for axis 0" in info["skipped"]["bad_quantized"]


# -- hostile and malformed files -------------------------------------------------------------------------------------

class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": _Exploit(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil_legacy.pt").write_bytes(pickle.dumps({"w": _Exploit(marker)}, protocol=2))
    for name in ("evil.pt", "evil_legacy.pt"):
        with pytest.raises(TargetError) as exc:
            open_target(tmp_path / name)
        assert "\n" not in str(exc.value)
    assert "weights_only" in str(exc.value) or "torch weights" in str(exc.value)
    assert not marker.exists()
    # a torch.save archive or a pickle named .safetensors / .onnx is refused before anything parses it
    for src, dst in (("evil.pt", "evil.safetensors"), ("evil_legacy.pt", "evil.onnx"), ("evil.pt", "noext")):
        (tmp_path / dst).write_bytes((tmp_path / src).read_bytes())
        with pytest.raises(TargetError, match="zip archive|pickle"):
            open_target(tmp_path / dst)
    assert not marker.exists()


def test_non_tensor_pt_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(TargetError, match="'epoch' holds a int"):
        open_target(tmp_path / "ckpt.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(TargetError, match="holds a list"):
        open_target(tmp_path / "list.pt")


def _safetensors_bytes(header: dict, body: bytes, claimed: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text + body


def test_bad_safetensors_headers_are_refused(tmp_path):
    cases = {
        "header larger than the file": (_safetensors_bytes({}, b"", claimed=10_000), "claims 10000 bytes"),
        "header over the limit": (_safetensors_bytes({}, b"", claimed=1 << 40), "over the 100 MiB limit"),
        "tensor outside the data": (_safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "outside the file"),
        "size does not match shape": (_safetensors_bytes(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8), "8 bytes for shape"),
        "not JSON": (struct.pack("<Q", 4) + b"{abc", "not JSON"),
    }
    for name, (blob, message) in cases.items():
        path = tmp_path / "x.safetensors"
        path.write_bytes(blob)
        with pytest.raises(TargetError, match=message) as exc:
            open_target(path)
        assert "\n" not in str(exc.value), name
    path.write_bytes(b"hello world, not a model")
    with pytest.raises(TargetError, match="not a safetensors file"):
        open_target(path)


def _external_onnx(folder: Path, location: str, data: bytes, length: int | None = None) -> Path:
    """A one-node ONNX model ``y = x @ W`` (W 2x2 float, named as the TorchScript exporter names it),
    W stored as external data at ``location``."""
    from onnx import TensorProto, helper

    w = TensorProto(name="onnx::MatMul_7", data_type=TensorProto.FLOAT, dims=[2, 2])
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length or 16))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["y"], name="/lin/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    path.write_bytes(model.SerializeToString())
    if data and "/" not in location and not os.path.isabs(location):
        (folder / location).write_bytes(data)
    return path


def test_onnx_external_data_only_from_the_models_folder(tmp_path):
    values = np.arange(4, dtype=np.float32)
    outside = tmp_path / "secret.bin"
    outside.write_bytes(values.tobytes())
    # the legitimate layout: a data file beside the model
    ok = OnnxTarget(_external_onnx(tmp_path / "ok", "m.data", values.tobytes()))
    assert torch.equal(ok.weights()["lin.weight"], torch.from_numpy(values.reshape(2, 2).T.copy()))
    assert ok.describe()["renamed"] == {"lin.weight": "onnx::MatMul_7 (transposed)"}
    from onnx import TensorProto
    assert all(t.data_location != TensorProto.EXTERNAL for t in ok.proto.graph.initializer)
    assert torch.allclose(ok.oracle().raw(torch.eye(2)), torch.from_numpy(values.reshape(2, 2)))
    # references that leave the folder, by path or through a link, are refused before any read
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "m.data").symlink_to(outside)
    for folder, loc in (("up", "../secret.bin"), ("abs", str(outside)), ("link", "m.data")):
        path = tmp_path / folder / "m.onnx" if folder == "link" else _external_onnx(tmp_path / folder, loc, b"")
        if folder == "link":
            _external_onnx(tmp_path / "link", "m.data", b"")
        with pytest.raises(TargetError, match="outside the model's folder|not a file in the model's folder"):
            open_target(path)
    with pytest.raises(TargetError, match="does not fit its shape"):
        open_target(_external_onnx(tmp_path / "long", "m.data", values.tobytes(), length=64))


def test_garbage_and_unknown_files(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x12\x34not protobuf at all")
    (tmp_path / "model.bin").write_bytes(b"0123456789abcdef")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in (("bad.onnx", "ONNX"), ("model.bin", "unrecognised"), ("empty.pt", "not a torch.save"),
                          ("missing.onnx", "not found")):
        with pytest.raises(TargetError, match=message) as exc:
            open_target(tmp_path / name)
        assert "\n" not in str(exc.value)
    with pytest.raises(TargetError, match="directory"):
        open_target(tmp_path)
    with pytest.raises(TargetError, match="nn.Module or a model file"):
        open_target(42)


def test_factory_errors_are_one_line(user_net, tmp_path):
    save_file(user_net.state_dict(), str(tmp_path / "u.safetensors"))
    path = tmp_path / "u.safetensors"
    cases = {
        "no_such_module_xyz:make": "cannot import 'no_such_module_xyz'",
        f"{__name__}:missing_factory": "has no attribute 'missing_factory'",
        f"{__name__}:NOT_CALLABLE": "is not callable",
        f"{__name__}:make_broken": "failed to build: ValueError: width must be even",
        f"{__name__}:make_not_a_module": "returned dict, not a torch nn.Module",
        "no-colon": "package.module:callable",
        "nnmark.models:build_model": "failed to build: TypeError",
    }
    for spec, message in cases.items():
        with pytest.raises(TargetError) as exc:
            open_target(path, factory=spec).module()
        assert message in str(exc.value) and "\n" not in str(exc.value), (spec, str(exc.value))
    with pytest.raises(TargetError, match=r"stem.weight is \(8, 1, 3, 3\) in the file, \(4, 1, 3, 3\) in") as exc:
        open_target(path, factory=f"{__name__}:UserNet", factory_kwargs='{"width": 4}').module()
    assert "\n" not in str(exc.value)
    with pytest.raises(TargetError, match="not valid JSON"):
        open_target(path, factory=f"{__name__}:UserNet", factory_kwargs="{width: 4}").module()
    with pytest.raises(TargetError, match="JSON object"):
        open_target(path, factory=f"{__name__}:UserNet", factory_kwargs="[4]").module()


def test_tensor_lookup_names_alternatives(cnn_files):
    target = open_target(cnn_files["bare-safetensors"])
    assert target.tensor("conv4.weight").shape == (32, 32, 3, 3)
    with pytest.raises(TargetError, match="no tensor 'conv9.weight'.*conv1.weight"):
        target.tensor("conv9.weight")


def test_weights_are_copies(user_net):
    w = open_target(user_net).weights()
    w["stem.weight"].zero_()
    assert user_net.stem.weight.abs().sum() > 0
