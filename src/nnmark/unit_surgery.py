"""Width-changing, function-preserving edits of a chain of layers, and their undoing.

The hidden layers of a chain (:func:`nnmark.alignment.unit_chain`) can change width without changing
the network's function (eval mode):

- **split** a unit into copies: the copies' incoming weights (and bias; with a batch norm, the norm's
  affine parameters) are the unit's times ``s_j > 0``, their outgoing weights the unit's times
  ``a_j / s_j`` with ``sum_j a_j = 1`` -- ``relu(s z) = s relu(z)``, so the next layer sees
  ``sum_j a_j relu(z) = relu(z)``;
- **add dummy units** whose contributions cancel: a pair with incoming weights ``w`` and ``t w``
  (``t > 0``) and outgoing ``c`` and ``-c / t``, or single units with outgoing weights zero;
- **merge duplicates**: the inverse -- units whose pre-activations are positively proportional
  (``z_j = c z_i``) become one unit, unit ``i``'s outgoing weights plus ``c`` times unit ``j``'s;
- **drop** units whose outgoing weights are all zero (their removal is exact).

:func:`remap_units` is the one primitive (a new unit list drawn from the old units, with incoming
scales and outgoing coefficients); the attacks in :mod:`nnmark.attacks.structure` and the width
defence :func:`restore_widths` are built on it. Model specs of the zoo (:mod:`nnmark.models`) are
updated to the new widths (:func:`respec`) so that an edited model saves and loads like any other.

The defence :func:`restore_widths` looks only at the suspect (its own pre-activations on keyed noise
probes and its own weights), never at the marked model: it merges positively proportional units and
drops zero-output units, and the result is used only when every hidden layer then has exactly the
widths the key's reference records. Every step is function-preserving (merging: up to float round-off
on the probes where the proportionality was checked), so the model that is read is the suspect's own
function in fewer units; the alignment gate and the scheme's test then apply as for any suspect.

When exact merging leaves a layer too wide (split copies perturbed by small weight noise are no longer
exact duplicates), the most nearly proportional pairs are merged (:func:`merge_near_duplicates`: both
cosines at least 1 - :data:`NEAR_DUPLICATE_TOLERANCE`), just as many as the layer has units too many, and
the copy is used only if its outputs on the keyed probes stay within :data:`NEAR_FUNCTION_TOLERANCE`
(relative) of the suspect's. Soundness is unchanged: every unit kept is one of the suspect's own units
with its incoming weights as they are (the outgoing weights are combinations of the suspect's), and which
units are merged depends only on the suspect and on probes drawn from the key's ``widths`` child, not on the
secret material a scheme's test uses: the restored copy is a function of the suspect and of those probes, so
for a model made independently of the key the test's null holds for it as for the suspect. Any merge (exact or
near) is checked against :data:`NEAR_FUNCTION_TOLERANCE`: duplicates of a perturbed suspect merge only
approximately even when their cosines pass the exact test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from nnmark.alignment import Chain, Link, probe_inputs, unit_chain, unwrap
from nnmark.keys import Key

#: two units are duplicates when the cosine of their pre-activation vectors on the probes is at least
#: 1 - DUPLICATE_TOLERANCE (float32 round-off of exact copies: ~1e-7; independently trained units: < 0.999)
DUPLICATE_TOLERANCE = 1e-5
#: the width-restored copy must match the suspect's outputs on the probes to this relative difference
FUNCTION_TOLERANCE = 1e-4
#: units that are *nearly* proportional (split copies perturbed by weight noise of 1% of the mean |weight|: 1 - cos
#: up to ~1e-3 on digits; the closest distinct units of trained CNNs: 1 - cos >= ~1e-2): both cosines at least
#: 1 - NEAR_DUPLICATE_TOLERANCE; tried only when exact merging leaves a layer too wide
NEAR_DUPLICATE_TOLERANCE = 2e-3
#: a copy restored by merging units of a suspect that was perturbed after the split (its duplicates then merge
#: only approximately) must match the suspect's outputs on the probes to this relative difference (max
#: |difference| over max |output|); FUNCTION_TOLERANCE holds when the merges were exact
NEAR_FUNCTION_TOLERANCE = 1e-2


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(unwrap(model).named_modules())


@torch.no_grad()
def remap_units(model: nn.Module, link: Link, src: Any, in_scale: Any = None, out_coef: Any = None) -> nn.Module:
    """Rebuild hidden layer ``link`` of ``model`` **in place** with ``len(src)`` units.

    New unit ``j`` is old unit ``src[j]`` (``(n,)`` ints in ``[0, link.units)``) with its incoming weights
    and bias (with a batch norm: the norm's affine parameters) times ``in_scale[j]`` (``(n,)`` > 0, default 1;
    only on a positively homogeneous link) and its outgoing weights in the next layer times ``out_coef[j]``
    (default 1). The function is unchanged when, for every old unit ``u``, the ``in_scale * out_coef`` of its
    new units sum to 1 (0 for a unit that is dropped: e.g. one whose outgoing weights are zero). Returns
    ``model``."""
    mods = _modules(model)
    lay, nxt = mods[link.name], mods[link.next]
    bn = mods[link.bn] if link.bn else None
    src_t = torch.as_tensor(np.asarray(src, dtype=np.int64))
    n = int(src_t.numel())
    if n < 1 or int(src_t.min()) < 0 or int(src_t.max()) >= link.units:
        raise ValueError(f"src must list 1 or more units of layer {link.name!r} (0..{link.units - 1})")
    s = torch.ones(n, dtype=torch.float64) if in_scale is None else torch.as_tensor(
        np.asarray(in_scale, dtype=np.float64))
    a = torch.ones(n, dtype=torch.float64) if out_coef is None else torch.as_tensor(
        np.asarray(out_coef, dtype=np.float64))
    if s.shape != (n,) or a.shape != (n,) or not bool((s > 0).all()) or not bool(torch.isfinite(a).all()):
        raise ValueError("in_scale must be n positive numbers and out_coef n finite numbers")
    if not link.scale_safe and not torch.allclose(s, torch.ones_like(s)):
        raise ValueError(f"layer {link.name!r} is followed by a non-homogeneous activation: no incoming scales")

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.contiguous(), requires_grad=True)

    w = lay.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    if bn is None:
        lay.weight = param(w[src_t] * s.view(shape).to(w.dtype))
        if lay.bias is not None:
            lay.bias = param(lay.bias.detach()[src_t] * s.to(w.dtype))
    else:
        lay.weight = param(w[src_t].clone())
        if lay.bias is not None:
            lay.bias = param(lay.bias.detach()[src_t].clone())
        if bn.weight is not None:
            bn.weight = param(bn.weight.detach()[src_t] * s.to(w.dtype))
            bn.bias = param(bn.bias.detach()[src_t] * s.to(w.dtype))
        elif not torch.allclose(s, torch.ones_like(s)):
            raise ValueError(f"batch norm {link.bn!r} has no affine parameters to scale")
        for buf in ("running_mean", "running_var"):
            t = getattr(bn, buf)
            if t is not None:
                setattr(bn, buf, t[src_t].clone())
        bn.num_features = n
    if isinstance(lay, nn.Linear):
        lay.out_features = n
    else:
        lay.out_channels = n
    wn = nxt.weight.detach()
    view = wn.reshape(wn.shape[0], link.units, -1)  # (out, units, spatial * kernel)
    new = view[:, src_t] * a.view(1, -1, 1).to(wn.dtype)
    if isinstance(nxt, nn.Linear):
        nxt.weight = param(new.reshape(wn.shape[0], -1))
        nxt.in_features = int(nxt.weight.shape[1])
    else:
        nxt.weight = param(new.reshape(wn.shape[0], n, *wn.shape[2:]))
        nxt.in_channels = n
    return model


def respec(model: nn.Module) -> None:
    """Bring a zoo model's ``spec`` (:mod:`nnmark.models`) to its layers' current widths, in place; a model
    whose architecture fixes its widths (LeNet-5) and whose widths changed loses its ``spec``."""
    net = unwrap(model)
    spec = getattr(net, "spec", None)
    if not spec:
        return
    mods = dict(net.named_modules())

    def width(name: str) -> int:
        return int(mods[name].weight.shape[0])

    spec = dict(spec)
    arch = spec.get("arch")
    if arch in ("cnn", "cnn-200", "cnn-cifar"):
        spec["channels"] = [width(f"conv{i}") for i in range(1, 5)]
        spec["dense"] = [width("fc1"), width("fc2")]
    elif arch == "mlp":
        spec["hidden"] = [width(f"fc{i}") for i in range(1, len(spec["hidden"]) + 1)]
    elif arch == "vgg-small":
        idx, blocks = 0, []
        for block in spec["blocks"]:
            blocks.append([width(f"conv{idx + j + 1}") for j in range(len(block))])
            idx += len(block)
        spec["blocks"] = blocks
        spec["dense"] = [width(f"fc{i}") for i in range(1, len(spec["dense"]) + 1)]
    elif arch == "lenet5":
        if [width(n) for n in ("conv1", "conv2", "fc1", "fc2")] != [6, 16, 120, 84]:
            del net.spec
            return
    net.spec = spec  # type: ignore[assignment]


def widths(model: nn.Module, chain: Chain | None = None) -> dict[str, int]:
    """Units of every hidden layer of ``model``'s chain, by layer name."""
    chain = chain or unit_chain(model)
    return {link.name: link.units for link in chain.links}


@torch.no_grad()
def pre_activations(model: nn.Module, probes: torch.Tensor, chain: Chain | None = None) -> dict[str, torch.Tensor]:
    """Every hidden unit's pre-activation (after its batch norm, if any) on ``probes``, eval mode:
    ``{layer: (units, P * positions)}`` float64 (conv outputs keep every spatial position)."""
    net = unwrap(model)
    chain = chain or unit_chain(net)
    mods = dict(net.named_modules())
    got: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def hook(_m, _i, out):
            z = out.detach().double()
            got[name] = z.transpose(0, 1).reshape(z.shape[1], -1)
        return hook

    handles = [mods[link.bn or link.name].register_forward_hook(grab(link.name)) for link in chain.links]
    was = net.training
    net.eval()
    try:
        p = next(net.parameters())
        net(probes.to(p.device, p.dtype))
    finally:
        net.train(was)
        for h in handles:
            h.remove()
    return got


def duplicate_groups(z: torch.Tensor, tolerance: float = DUPLICATE_TOLERANCE
                     ) -> list[tuple[int, list[int], list[float]]]:
    """Groups of positively proportional rows of ``z`` ``(units, values)``: ``(keep, others, ratios)`` with
    ``z[o] = ratio * z[keep]`` for each other unit ``o``. Rows are proportional when the cosines of both the
    raw and the centred rows are at least 1 - ``tolerance`` (the centred test keeps units that are merely
    near-constant on the probes apart); rows that are all zero or constant are in no group."""
    norms = z.norm(dim=1)
    c = z - z.mean(1, keepdim=True)
    cnorms = c.norm(dim=1)
    live = cnorms > 1e-9 * (1 + float(norms.max()) if len(norms) else 1)
    unit = z / norms.clamp(min=1e-300).unsqueeze(1)
    cunit = c / cnorms.clamp(min=1e-300).unsqueeze(1)
    same_all = ((unit @ unit.T) >= 1 - tolerance) & ((cunit @ cunit.T) >= 1 - tolerance)
    taken = torch.zeros(len(z), dtype=torch.bool)
    groups = []
    for i in range(len(z)):
        if taken[i] or not live[i]:
            continue
        same = (same_all[i] & live & ~taken).nonzero().flatten().tolist()
        others = [j for j in same if j != i]
        if others:
            groups.append((i, others, [float(norms[j] / norms[i]) for j in others]))
            taken[same] = True
        taken[i] = True
    return groups


@torch.no_grad()
def merge_duplicates(model: nn.Module, probes: torch.Tensor, tolerance: float = DUPLICATE_TOLERANCE,
                     layers: list[str] | None = None) -> dict[str, int]:
    """Merge positively proportional units of every hidden layer (or of ``layers``) **in place**; returns the
    number of units removed by layer. Function-preserving wherever the proportionality holds (it is
    checked on ``probes``, ``(P, *in_shape)``)."""
    removed: dict[str, int] = {}
    for name in list(widths(model)):
        if layers is not None and name not in layers:
            continue
        chain = unit_chain(model)
        link = next(lk for lk in chain.links if lk.name == name)
        if not link.scale_safe:
            continue
        z = pre_activations(model, probes, chain)[name]
        groups = duplicate_groups(z, tolerance)
        if not groups:
            continue
        drop = {j for _, others, _ in groups for j in others}
        coef = np.ones(link.units)
        mods = _modules(model)
        wn = mods[link.next].weight
        view = wn.detach().reshape(wn.shape[0], link.units, -1)
        for keep, others, ratios in groups:
            total = view[:, keep].double().clone()
            for j, r in zip(others, ratios, strict=True):
                total += r * view[:, j].double()
            view[:, keep] = total.to(view.dtype)  # writes through to the next layer's weight
        src = [u for u in range(link.units) if u not in drop]
        remap_units(model, link, src, None, coef[src])
        removed[name] = len(drop)
    respec(model)
    return removed


def _similarity(z: torch.Tensor) -> torch.Tensor:
    """``(units, units)``: the smaller of the raw and the centred cosine of every pair of rows of ``z``; rows that
    are constant on the probes, and the diagonal, get -inf."""
    norms = z.norm(dim=1)
    c = z - z.mean(1, keepdim=True)
    cnorms = c.norm(dim=1)
    live = cnorms > 1e-9 * (1 + float(norms.max()))
    unit = z / norms.clamp(min=1e-300).unsqueeze(1)
    cunit = c / cnorms.clamp(min=1e-300).unsqueeze(1)
    sim = torch.minimum(unit @ unit.T, cunit @ cunit.T)
    sim[~live] = -torch.inf
    sim[:, ~live] = -torch.inf
    sim.fill_diagonal_(-torch.inf)
    return sim


@torch.no_grad()
def merge_near_duplicates(model: nn.Module, probes: torch.Tensor, layer: str, count: int,
                          tolerance: float = NEAR_DUPLICATE_TOLERANCE) -> int:
    """Merge up to ``count`` pairs of units of hidden layer ``layer`` whose pre-activations on ``probes`` are
    nearly positively proportional (raw and centred cosine at least 1 - ``tolerance``), the most similar pair
    first, **in place**; returns the merges made. Unit ``j`` merged into ``i`` (the one of larger norm): ``i``'s
    incoming weights are kept as they are, and its outgoing weights become ``w_i + r w_j`` with ``r`` the
    least-squares ratio ``<z_i, z_j> / <z_i, z_i>`` (> 0) of their pre-activations -- exact when ``z_j = r z_i``,
    and off by ``w_j (relu(z_j) - r relu(z_i))`` otherwise, so the caller must check the function."""
    chain = unit_chain(model)
    link = next(lk for lk in chain.links if lk.name == layer)
    if not link.scale_safe or count < 1:
        return 0
    z = pre_activations(model, probes, chain)[layer]
    sim = _similarity(z)
    norms = z.norm(dim=1)
    wn = _modules(model)[link.next].weight
    view = wn.detach().reshape(wn.shape[0], link.units, -1)
    out = view.double().clone()
    alive = torch.ones(link.units, dtype=torch.bool)
    merged = 0
    while merged < count:
        best = int(torch.argmax(sim))
        i, j = divmod(best, link.units)
        if not float(sim[i, j]) >= 1 - tolerance:
            break
        if norms[j] > norms[i]:
            i, j = j, i
        r = float(z[i] @ z[j] / (z[i] @ z[i]))
        out[:, i] += r * out[:, j]
        alive[j] = False
        sim[j, :] = -torch.inf
        sim[:, j] = -torch.inf
        merged += 1
    if merged:
        view.copy_(out.to(view.dtype))  # writes through to the next layer's weight
        remap_units(model, link, alive.nonzero().flatten().tolist())
    return merged


@torch.no_grad()
def drop_silent_units(model: nn.Module, layers: list[str] | None = None, limit: dict[str, int] | None = None
                      ) -> dict[str, int]:
    """Remove hidden units whose outgoing weights in the next layer are all exactly zero, **in place** (exact:
    such a unit contributes nothing). ``limit``: at most this many per layer. Returns the units removed."""
    removed: dict[str, int] = {}
    for name in list(widths(model)):
        if layers is not None and name not in layers:
            continue
        chain = unit_chain(model)
        link = next(lk for lk in chain.links if lk.name == name)
        wn = _modules(model)[link.next].weight.detach()
        silent = (wn.reshape(wn.shape[0], link.units, -1).abs().amax(dim=(0, 2)) == 0).nonzero().flatten().tolist()
        if limit is not None:
            silent = silent[: max(0, limit.get(name, 0))]
        if not silent or len(silent) == link.units:
            continue
        src = [u for u in range(link.units) if u not in set(silent)]
        remap_units(model, link, src)
        removed[name] = len(silent)
    respec(model)
    return removed


@dataclass
class WidthReport:
    """What :func:`restore_widths` did: ``applied`` (the suspect's widths were brought to the reference's),
    ``reason``, units merged (exact duplicates) / merged as near duplicates / dropped by layer, the widths
    before and after, and the restored copy's relative output change on the probes (``None``: not checked)."""

    applied: bool
    reason: str
    merged: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    near_merged: dict[str, int] = field(default_factory=dict)
    function_change: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"widths": "restored" if self.applied else "as given", "reason": self.reason,
                "merged": self.merged, "near_merged": self.near_merged, "dropped": self.dropped,
                "before": self.before, "after": self.after, "function_change": self.function_change}


def restore_widths(suspect: nn.Module, target: dict[str, int], key: Key, probes: int = 64,
                   in_shape: tuple[int, ...] | list[int] | None = None) -> tuple[nn.Module, WidthReport]:
    """A copy of ``suspect`` whose hidden layers have the ``target`` widths (the key's reference), made by
    merging positively proportional units (on ``probes`` keyed noise inputs) and dropping zero-output units;
    or ``suspect`` itself (``applied=False``) when its widths already match, it has no chain, or the merged
    copy's widths still differ (see the module docs). ``in_shape``: the input shape without the batch
    dimension (default: the suspect's spec's). The suspect is never modified."""
    try:
        chain = unit_chain(suspect)
    except Exception as exc:  # noqa: BLE001 - no chain: nothing to restore
        return suspect, WidthReport(False, f"no chain of layers: {exc}")
    have = widths(suspect, chain)
    if have == dict(target):
        return suspect, WidthReport(False, "widths already the reference's", before=have, after=have)
    if list(have) != list(target):
        return suspect, WidthReport(False, "other hidden layers than the reference's", before=have)
    if any(have[n] < target[n] for n in have):
        return suspect, WidthReport(False, "a hidden layer is narrower than the reference's", before=have)
    if in_shape is None:
        in_shape = (getattr(unwrap(suspect), "spec", None) or {}).get("in_shape")
    if in_shape is None:
        return suspect, WidthReport(False, "the suspect's input shape is unknown (no spec)", before=have)
    model = copy.deepcopy(unwrap(suspect))
    x = probe_inputs(key.child("widths"), in_shape, probes)
    wide = [n for n in have if have[n] > target[n]]
    merged = merge_duplicates(model, x, layers=wide)
    now = widths(model)
    dropped = drop_silent_units(model, layers=wide, limit={n: now[n] - target[n] for n in wide})
    after = widths(model)
    near: dict[str, int] = {}
    if after != dict(target) and all(after[n] >= target[n] for n in after):
        for n in wide:  # in chain order: a merge in one layer changes what the next layer sees
            if after[n] > target[n]:
                near[n] = merge_near_duplicates(model, x, n, after[n] - target[n])
        respec(model)
        after = widths(model)
    if after != dict(target):
        return suspect, WidthReport(False, "merging duplicates and dropping silent units did not reach the "
                                    "reference's widths", merged, dropped, have, after, near)
    with torch.no_grad():  # the safety net: the narrower copy must compute what the suspect computes
        was = unwrap(suspect).training
        unwrap(suspect).eval()
        try:
            ya, yb = unwrap(suspect)(x), model.eval()(x)
        finally:
            unwrap(suspect).train(was)
        change = float((ya - yb).abs().max() / ya.abs().max().clamp(min=1e-30))
    limit = NEAR_FUNCTION_TOLERANCE if any(merged.values()) or any(near.values()) else FUNCTION_TOLERANCE
    if not change <= limit:
        return suspect, WidthReport(False, f"the merged copy's outputs differ from the suspect's on the probes "
                                    f"(relative {change:.2g} > {limit})", merged, dropped, have, after, near, change)
    return model.eval(), WidthReport(True, "restored", merged, dropped, have, after, near, change)
