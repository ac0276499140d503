"""Declared parameters and the component registry (no torch needed)."""

from __future__ import annotations

import pytest

from nnmark.components import BUILTIN, Component, ComponentError, ComponentRegistry
from nnmark.params import Param, ParamError, Params, parse_assignments

DECL = Params(
    Param("bits", int, 256, "message length", low=1, high=4096),
    Param("strength", float, None, "regulariser weight; default from the layer", optional=True, low=0),
    Param("generator", str, "noise", "trigger kind", choices=("noise", "content")),
    Param("strict", bool, True, "refuse oversized messages"),
)


def test_resolve_types_strings_and_fills_defaults():
    out = DECL.resolve({"bits": "512", "strict": "no", "strength": "1e-2"})
    assert out == {"bits": 512, "strength": 0.01, "generator": "noise", "strict": False}
    assert DECL.resolve({}) == DECL.defaults()
    assert DECL.resolve({"bits": 8}, partial=True) == {"bits": 8}
    assert DECL.resolve({"bits": "1e3"})["bits"] == 1000
    assert DECL.resolve({"strength": "none"})["strength"] is None


def test_unknown_parameter_lists_valid_ones_with_types_and_defaults():
    with pytest.raises(ParamError) as err:
        DECL.resolve({"bitz": 3}, owner="scheme 'uchida'")
    msg = str(err.value)
    assert "bitz" in msg and "scheme 'uchida'" in msg
    assert "bits (int, default 256" in msg and "generator (str, default 'noise'; one of noise/content)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("given", [{"bits": "many"}, {"bits": 0}, {"bits": 5000}, {"bits": 2.5},
                                   {"generator": "photo"}, {"strict": "maybe"}, {"strength": "-1"},
                                   {"strength": "nan"}, {"bits": True}, {"generator": [1, 2]}])
def test_ill_typed_or_out_of_bounds_values_are_refused(given):
    with pytest.raises(ParamError):
        DECL.resolve(given)


def test_a_declaration_must_respect_its_own_bounds():
    with pytest.raises(ParamError):
        Param("n", int, 0, "count", low=1)
    with pytest.raises(TypeError):
        Param("n", int, None, "count")
    with pytest.raises(TypeError):
        Params(Param("n", int, 1, "a"), Param("n", int, 2, "b"))


def test_describe_is_json_able_and_complete():
    import json

    d = json.loads(json.dumps(DECL.describe()))
    assert [p["name"] for p in d] == ["bits", "strength", "generator", "strict"]
    assert d[0] == {"name": "bits", "type": "int", "default": 256, "doc": "message length", "low": 1, "high": 4096}
    assert d[1]["type"] == "float | None"


def test_parse_assignments():
    assert parse_assignments(("n=100", "generator = noise", "x=a=b")) == {"n": "100", "generator": "noise",
                                                                          "x": "a=b"}
    with pytest.raises(ParamError):
        parse_assignments(("n100",))


class _Dummy:
    """A dummy component."""

    PARAMS = Params(Param("mode", str, "A", "mode", choices=("A", "B")), Param("k", int, 1, "k", low=0))


def test_registry_lookup_fixed_defaults_and_errors():
    reg = ComponentRegistry({}, plugins=False)
    reg.register("attack", "dummy-b", _Dummy, defaults={"mode": "B"})
    comp = reg.get("attack", "DUMMY-B")
    assert comp.resolve({"k": "3"}) == {"mode": "B", "k": 3}
    assert [p.name for p in comp.params] == ["k"]
    with pytest.raises(ComponentError, match="fixes mode"):
        comp.resolve({"mode": "A"})
    with pytest.raises(ComponentError, match="known: dummy-b"):
        reg.get("attack", "nope")
    with pytest.raises(ComponentError, match="already registered"):
        reg.register("attack", "dummy-b", _Dummy)
    with pytest.raises(ComponentError, match="kinds"):
        reg.get("widget", "x")
    assert comp.describe()["doc"] == "A dummy component."


def test_builtin_references_are_lazy_strings():
    for kind in BUILTIN.values():
        for comp in kind.values():
            assert isinstance(comp.ref, str) and ":" in comp.ref
    broken = Component("scheme", "broken", "nnmark.no_such_module:Thing")
    with pytest.raises(ComponentError, match="cannot be loaded"):
        broken.load()


def test_list_parameters():
    p = Param("weights", list, None, "per-copy weights", optional=True, item=float, low=-10)
    assert p.parse("1, -1,0.5") == [1.0, -1.0, 0.5]
    assert p.parse([1, 2]) == [1.0, 2.0]
    assert p.parse(None) is None
    assert p.type_name == "list[float] | None"
    with pytest.raises(ParamError):
        p.parse("1,x")
    with pytest.raises(ParamError):
        p.parse("-11")
    with pytest.raises(ParamError):
        p.parse(3.0)
    with pytest.raises(TypeError):
        Param("w", list, None, "no item type", optional=True)
