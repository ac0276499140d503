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
