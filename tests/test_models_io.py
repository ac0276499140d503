import json
import pickle
import struct

import pytest
import torch

from nnmark.errors import ModelFileError
from nnmark.io import load_model, save_model
from nnmark.models import ARCHITECTURES, build_model, head_of, model_spec


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_architecture_builds(arch, shape):
    m = build_model(model_spec(arch, shape, 10))
    assert m(torch.zeros(2, *shape)).shape == (2, 10)
    assert head_of(m).out_features == 10


def test_paper_layer_sizes():
    mlp = build_model(model_spec("mlp", (1, 28, 28), 10))
    assert mlp.fc1.weight.shape == (64, 784) and mlp.head.weight.numel() == 640
    cnn = build_model(model_spec("cnn", (1, 28, 28), 10))
    assert [c.out_channels for c in (cnn.conv1, cnn.conv2, cnn.conv3, cnn.conv4)] == [32, 32, 64, 64]
    assert cnn.fc1.out_features == 256 and cnn.fc2.out_features == 256


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    m = build_model(model_spec("lenet5", (1, 8, 8), 10))
    path = save_model(tmp_path / "m.safetensors", m, {"data": "digits"})
    return m, path


def test_roundtrip(saved):
    m, path = saved
    m2, meta = load_model(path)
    assert meta["data"] == "digits" and meta["spec"]["arch"] == "lenet5"
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(m.eval()(x), m2(x))


def test_pickle_and_torch_save_are_refused(tmp_path, saved):
    m, _ = saved
    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(p)
    z = tmp_path / "model.pt"
    torch.save(m.state_dict(), z)
    with pytest.raises(ModelFileError, match="zip"):
        load_model(z)


def test_truncated_and_garbage(tmp_path, saved):
    _, path = saved
    raw = path.read_bytes()
    t = tmp_path / "t.safetensors"
    for cut in (4, 100, len(raw) - 50):
        t.write_bytes(raw[:cut])
        with pytest.raises(ModelFileError, match="truncated"):
            load_model(t)
    g = tmp_path / "g.safetensors"
    g.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    with pytest.raises(ModelFileError, match="not JSON"):
        load_model(g)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_mismatched_architecture(tmp_path):
    from safetensors.torch import save as st_save

    m = build_model(model_spec("mlp", (1, 8, 8), 10))
    wrong_spec = model_spec("lenet5", (1, 8, 8), 10)
    blob = st_save({k: v.contiguous() for k, v in m.state_dict().items()},
                   metadata={"nnmark": json.dumps({"format": "nnmark-model", "version": 1, "spec": wrong_spec})})
    p = tmp_path / "w.safetensors"
    p.write_bytes(blob)
    with pytest.raises(ModelFileError, match="do not match architecture 'lenet5'"):
        load_model(p)
    good = save_model(tmp_path / "mlp.safetensors", m)
    with pytest.raises(ModelFileError, match="wrong architecture"):
        load_model(good, expect_spec=wrong_spec)


def test_missing_metadata_and_nan(tmp_path):
    from safetensors.torch import save as st_save

    m = build_model(model_spec("mlp", (1, 8, 8), 10))
    p = tmp_path / "nometa.safetensors"
    p.write_bytes(st_save({k: v.contiguous() for k, v in m.state_dict().items()}))
    with pytest.raises(ModelFileError, match="no nnmark metadata"):
        load_model(p)
    with torch.no_grad():
        m.head.weight[0, 0] = float("nan")
    bad = save_model(tmp_path / "nan.safetensors", m)
    with pytest.raises(ModelFileError, match="NaN"):
        load_model(bad)


# -- bounds on untrusted specs ---------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 30, 20), (2, 4, 4)])
def test_spec_size_and_expected_state_match_the_built_network(arch, shape):
    from torch import nn

    from nnmark.models import expected_state, spec_size, validate_spec

    spec = validate_spec(model_spec(arch, shape, 10))
    m = build_model(spec).eval()
    acts = []
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, nn.MaxPool2d)):
            mod.register_forward_hook(lambda _m, _i, out: acts.append(out[0].numel()))
    m(torch.zeros(1, *shape))
    assert spec_size(spec) == (sum(v.numel() for v in m.state_dict().values()), sum(acts))
    assert expected_state(spec) == {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}


def test_vgg_small_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    m = build_model(model_spec("vgg-small", (3, 8, 8), 10))
    m.train()(torch.rand(4, 3, 8, 8))  # batch-norm statistics move
    path = save_model(tmp_path / "vgg.safetensors", m)  # layers used to be registered twice
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(load_model(path)[0](x), m.eval()(x))


@pytest.mark.parametrize("change, needle", [
    ({"in_shape": [1, 2048, 8]}, "in_shape"),
    ({"in_shape": [1, 8]}, "in_shape"),
    ({"in_shape": [1, 8.0, 8]}, "in_shape"),
    ({"num_classes": True}, "num_classes"),
    ({"hidden": [70_000]}, "hidden entries"),
    ({"hidden": [64] * 64}, "at most 63"),
    ({"hidden": "64"}, "list of ints"),
    ({"hidden": [20_000, 20_000]}, "parameters"),
    ({"dropout": 1.5}, "dropout"),
    ({"dropout": float("nan")}, "dropout"),
    ({"extra": [1, 2]}, "short scalar"),
    ({"arch": ["mlp"]}, "unknown architecture"),
])
def test_validate_spec_refuses_out_of_bounds_fields(change, needle):
    from nnmark.models import validate_spec

    with pytest.raises(ModelFileError, match=needle):
        validate_spec({**model_spec("mlp", (1, 8, 8), 10), **change})


def test_validate_spec_bounds_cnn_and_vgg_layers_and_activations():
    from nnmark.models import SpecLimits, validate_spec

    for arch in ("cnn", "lenet5"):
        with pytest.raises(ModelFileError, match="too small"):
            validate_spec(model_spec(arch, (1, 2, 3), 10))
    with pytest.raises(ModelFileError, match="channels must have 4"):
        validate_spec({**model_spec("cnn", (1, 8, 8), 10), "channels": [8, 8, 8]})
    with pytest.raises(ModelFileError, match="activation values"):
        validate_spec(model_spec("cnn", (3, 1024, 1024), 10, dense=[1, 1]))  # 3.4e8 values per input
    with pytest.raises(ModelFileError, match="layers"):
        validate_spec(model_spec("vgg-small", (1, 8, 8), 10, blocks=[[4] * 40, [4] * 40]))
    # the zoo's defaults are far inside the limits; a trusted caller may lower or raise them
    assert validate_spec(model_spec("cnn-cifar", (3, 32, 32), 100))["arch"] == "cnn-cifar"
    with pytest.raises(ModelFileError, match="at most 900,000"):
        validate_spec(model_spec("cnn", (1, 28, 28), 10), SpecLimits(max_params=900_000))
    assert validate_spec(model_spec("mlp", (1, 8, 8), 10, hidden=[2_000_000]),
                         SpecLimits(max_params=200_000_000, max_width=2_000_000))["hidden"] == [2_000_000]


def test_load_model_limits_are_configurable(tmp_path, saved):
    from nnmark.models import SpecLimits

    _, path = saved  # lenet5: 21,386 values
    with pytest.raises(ModelFileError, match="parameters"):
        load_model(path, limits=SpecLimits(max_params=20_000))
    assert load_model(path, limits=SpecLimits(max_params=21_386))[0].spec["arch"] == "lenet5"


def test_header_is_checked_against_the_file_size(tmp_path, saved):
    _, path = saved
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    small = tmp_path / "past_end.safetensors"
    small.write_bytes(struct.pack("<Q", 500_000) + raw[8:200])  # header longer than the file
    with pytest.raises(ModelFileError, match="truncated .header needs 500000 bytes"):
        load_model(small)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(raw + b"\0" * 16)
    with pytest.raises(ModelFileError, match="16 bytes after its tensor data"):
        load_model(trailing)
    header = json.loads(raw[8 : 8 + hlen])
    name = next(k for k in header if k != "__metadata__")
    for bad in ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
                {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]},
                {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
                "nope"):
        text = json.dumps({**header, name: bad}).encode()
        f = tmp_path / "bad.safetensors"
        f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + hlen:])
        with pytest.raises(ModelFileError, match="malformed entry|do not fit"):
            load_model(f)


def test_wrong_dtype_is_refused_from_the_header(tmp_path):
    from safetensors.torch import save as st_save

    m = build_model(model_spec("mlp", (1, 8, 8), 10))
    state = {k: v.double().contiguous() for k, v in m.state_dict().items()}
    meta = {"format": "nnmark-model", "version": 1, "spec": m.spec}
    p = tmp_path / "f64.safetensors"
    p.write_bytes(st_save(state, metadata={"nnmark": json.dumps(meta)}))
    with pytest.raises(ModelFileError, match="dtype torch.float64, expected torch.float32"):
        load_model(p)


def test_non_regular_files_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="not a regular file"):
        load_model("/dev/zero")
    with pytest.raises(ModelFileError, match="directory"):
        load_model(tmp_path)
