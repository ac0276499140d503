import os
import stat

import pytest
import torch

from nnmark import Key
from nnmark.errors import KeyFileError
from nnmark.keyfile import KeyFile, load_key_file, save_key_file


def test_derivation_is_deterministic_and_separated_by_purpose():
    k = Key.from_seed(1)
    assert k.derive("a") == Key.from_seed(1).derive("a")
    assert k.derive("a") != k.derive("b")
    assert k.derive("a") != Key.from_seed(2).derive("a")
    assert len(k.derive("x", 100)) == 100
    assert k.derive("x", 100)[:32] == k.derive("x", 32)
    a = k.numpy_rng("p").integers(0, 1 << 30, 5)
    b = k.numpy_rng("p").integers(0, 1 << 30, 5)
    assert (a == b).all()
    t1 = torch.randn(4, generator=k.torch_generator("q"))
    t2 = torch.randn(4, generator=k.torch_generator("q"))
    assert torch.equal(t1, t2)
    assert k.child("c1") != k.child("c2")


def test_secret_never_in_repr():
    k = Key.generate()
    assert k.to_hex() not in repr(k) and k.to_hex() not in str(k)
    assert k.key_id in repr(k)
    with pytest.raises(ValueError):
        Key(b"short")


def test_key_file_mode_0600_roundtrip(tmp_path):
    k = Key.generate()
    path = tmp_path / "owner.key"
    material = {"t": torch.arange(6.0).view(2, 3)}
    save_key_file(path, KeyFile(k, "trigger", {"a": 1}, material))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    kf = load_key_file(path, expect_scheme="trigger")
    assert kf.key == k and kf.params == {"a": 1}
    assert torch.equal(kf.material["t"], material["t"])
    assert k.to_hex() not in repr(kf)


def test_key_file_errors(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_key_file(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.write_text("not json")
    with pytest.raises(KeyFileError, match="not an nnmark key file"):
        load_key_file(bad)
    save_key_file(tmp_path / "u.key", KeyFile(Key.generate(), "uchida", {}))
    with pytest.raises(KeyFileError, match="scheme 'uchida', not for 'trigger'"):
        load_key_file(tmp_path / "u.key", expect_scheme="trigger")
