"""False positives of ``output-wu`` over >= 10,000 negatives, and detection at the measured rate (inference only).

    # the shipped sr2 key at its committed calibration (32 px images, one tile each)
    .venv/bin/python experiments/outputs/wu_fpr_study.py --key-task sr2 \
        --out experiments/results/outputs/wu_fpr_sr2.json
    # tables of every study:
    .venv/bin/python experiments/outputs/wu_fpr_study.py --tables experiments/results/outputs/wu_fpr_*.json \
        experiments/results/outputs/wu_large_*.json --out experiments/results/outputs/wu_fpr_tables.md
    # larger outputs: 128 px images, the mean statistic of their 16 aligned 32 px tiles, calibrated on
    # 128 px negatives of the same kinds (a new null; the committed 32 px key is left as it is)
    .venv/bin/python experiments/outputs/wu_fpr_study.py --key-task sr2 --read-size 128 \
        --out experiments/results/outputs/wu_large_sr2.json

The keys and hosts are the ``--save`` folders of ``wu_measure.py`` (:data:`MODELS`). Every image is quantised
to 8 bits as a saved PNG would be. Negatives, each kind counted on its own (none of them made by the host marked
with the key tested, none used to calibrate it: other seeds than ``wu_measure.py``'s):

- natural photo patches: the test photos (chelsea, flower), the attacker photo (immunohistochemistry) and eight
  grey photos bundled with scikit-image that no split uses (camera, moon, coins, grass, gravel, brick, cell,
  clock; replicated to RGB);
- outputs of unmarked hosts: the key's own unmarked host on test and attacker inputs, and the unmarked hosts of
  the other tasks;
- outputs of hosts marked under other keys: the other folders' marked hosts (other tasks), each folder's
  ``other_key_host`` (a host of that task marked under another key; ``--train-other-key-steps`` makes the key's
  own one when it is missing), and, with ``--message-cache``, the ``output-message`` marked hosts of
  ``mark_hosts.py`` (another scheme's marks).

A negative is *claimed* at ``alpha`` when its single-image p-value (the scheme's: the largest over calibration
conditions of ``(k_g + 1) / (n_g + 1)``) is below ``alpha``; the measured rate is given with its two-sided 99%
Clopper-Pearson interval. Images that ``verify`` would refuse as too noisy are counted apart. Detection: the
share of the key's marked host's outputs on held-out test and attacker inputs claimed at the same ``alpha``.
With ``--read-size R`` (a multiple of the key's 32 px) every image is R x R; the 32 px tiles of the same images
are also read the old way (every tile a suspect image, median over the image's tiles, the committed 32 px
calibration) and, for reference, one tile alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

from nnmark.keys import Key
from nnmark.outputs.data import natural_images, photo_patches
from nnmark.outputs.hosts import host_for_task
from nnmark.outputs.wu_network import flip_bits
from nnmark.outputs.wu_scheme import OutputWu

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results" / "outputs"
#: task -> (wu_measure.py --save folder, host kind)
MODELS = {"sr2": ("wu_sr2_binary_model", "unet"), "colourise": ("wu_colourise_resnet_model", "resnet"),
          "denoise": ("wu_denoise_resnet_model", "resnet")}
MESSAGE_HOSTS = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}
GREY_PHOTOS = ("camera", "moon", "coins", "grass", "gravel", "brick", "cell", "clock")
ALPHAS = (1e-2, 1e-3)


def interval(k: int, n: int, conf: float = 0.99) -> list[float]:
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=conf, method="exact")
    return [float(ci.low), float(ci.high)]


def quantise(img: torch.Tensor) -> torch.Tensor:
    return (img.clamp(0, 1) * 255).round() / 255


def grey_patches(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` random ``size`` px crops (random flips) of :data:`GREY_PHOTOS`, replicated to RGB, area-weighted."""
    import skimage.data

    photos = [np.asarray(getattr(skimage.data, name)(), dtype=np.uint8) for name in GREY_PHOTOS]
    rng = np.random.default_rng([seed, size, 7])
    areas = np.array([p.shape[0] * p.shape[1] for p in photos], dtype=np.float64)
    which = rng.choice(len(photos), size=n, p=areas / areas.sum())
    out = np.empty((n, size, size), dtype=np.uint8)
    for i, k in enumerate(which):
        p = photos[k]
        r, c = rng.integers(0, p.shape[0] - size + 1), rng.integers(0, p.shape[1] - size + 1)
        crop = p[r:r + size, c:c + size]
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return torch.from_numpy(out).float().div(255.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def host_outputs(host: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return quantise(torch.cat([host(x[i:i + batch]) for i in range(0, len(x), batch)]))


def load_host(task: str, kind: str, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    h = host_for_task(task, kind, 16)
    h.load_state_dict(load_file(str(path)))
    return h.eval()


def inputs(task: str, size: int, n: int, seed: int) -> torch.Tensor:
    """Held-out host inputs: half from the test photos, half from the attacker photo."""
    return torch.cat([photo_patches(task, size, "test", n - n // 2, seed)[0],
                      photo_patches(task, size, "attacker", n // 2, seed + 1)[0]])


def p_values(scheme: OutputWu, stats: torch.Tensor) -> np.ndarray:
    """Single-image p-values ``(N,)``: the largest over conditions of ``(k_g + 1) / (n_g + 1)`` (as
    :meth:`OutputWu.p_value` for one image, vectorised)."""
    s = stats.double().numpy()
    p = np.zeros(len(s))
    for v in scheme.null_by_condition().values():
        v = v.numpy()
        k = len(v) - np.searchsorted(v, s, side="left")  # negatives at or above s
        p = np.maximum(p, (k + 1) / (len(v) + 1))
    return p


def train_other_key(task: str, kind: str, folder: Path, steps: int, which: str = "other") -> None:
    """Mark a copy of ``folder``'s unmarked host under another key (``wu-<task>-fpr-<which>``, the nnmark recipe,
    ``steps`` joint steps) and save it as ``<which>_key_host.safetensors``."""
    import copy

    from safetensors.torch import save_file

    from nnmark.data.dataset import ImageDataset
    from nnmark.train import TrainConfig

    g0 = load_host(task, kind, folder / "unmarked_host.safetensors")
    x, y = photo_patches(task, 32, "train", 2048, 0)
    g = copy.deepcopy(g0).train()
    scheme = OutputWu.create(Key.from_seed(f"wu-{task}-fpr-{which}"), g, image_size=32)
    t = time.perf_counter()
    scheme.embed(g, ImageDataset(x, y, 0), TrainConfig(epochs=1000, batch_size=16, max_steps=steps, progress=False),
                 log=lambda step, h: print("other key", step, {k: round(v, 4) for k, v in h.items()}, flush=True))
    print(f"other-key host: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(folder / f"{which}_key_host.safetensors"))


def negatives(key_task: str, size: int, n_nat: int, n_host: int, seed: int, message_cache: Path | None,
              third: bool = True) -> dict[str, torch.Tensor]:
    """The negative images ``name -> (n, 3, size, size)`` (module docs), drawn with ``seed``; ``third``: with the
    hosts marked under a third key (``third_key_host``, never calibrated on)."""
    neg: dict[str, torch.Tensor] = {
        "natural: test photos": natural_images(n_nat, size, seed, "test"),
        "natural: attacker photo": natural_images(n_nat, size, seed + 1, "attacker"),
        "natural: other bundled grey photos": grey_patches(n_nat, size, seed + 2)}
    for task, (name, kind) in MODELS.items():
        folder = RESULTS / name
        if not (folder / "unmarked_host.safetensors").exists():
            print(f"missing {folder}: skipped", flush=True)
            continue
        x = inputs(task, size, n_host, seed + 10 + len(neg))
        same = task == key_task
        neg[f"unmarked host: {task}" + (" (the key's own)" if same else "")] = host_outputs(
            load_host(task, kind, folder / "unmarked_host.safetensors"), x)
        if not same:
            neg[f"marked host, other key: {task} (its own wu key)"] = host_outputs(
                load_host(task, kind, folder / "marked_host.safetensors"), x)
        if (folder / "other_key_host.safetensors").exists():
            neg[f"marked host, other key: {task} (a second wu key)"] = host_outputs(
                load_host(task, kind, folder / "other_key_host.safetensors"), x)
        if third and (folder / "third_key_host.safetensors").exists():
            neg[f"marked host, other key: {task} (a third wu key, never calibrated on)"] = host_outputs(
                load_host(task, kind, folder / "third_key_host.safetensors"), x)
    if message_cache is not None:
        for task, kind in MESSAGE_HOSTS.items():
            f = message_cache / f"{task}-{kind}-marked.pt"
            if not f.exists():
                print(f"missing {f}: skipped", flush=True)
                continue
            h = host_for_task(task, kind)
            h.load_state_dict(torch.load(f, weights_only=True))
            neg[f"output-message marked host: {task}"] = host_outputs(h.eval(), inputs(task, size, n_host, seed + 40))
    return neg


def claims(scheme: OutputWu, stats: torch.Tensor, refused: np.ndarray | None = None) -> dict:
    p = p_values(scheme, stats)
    ok = np.ones(len(p), bool) if refused is None else ~refused
    out = {"n": int(len(p)), "refused_as_noisy": int((~ok).sum()),
           "statistic_mean": float(stats.mean()), "statistic_max": float(stats.max())}
    for a in ALPHAS:
        k = int(((p < a) & ok).sum())
        out[f"{a:g}"] = {"claims": k, "fpr": k / len(p), "ci99": interval(k, len(p))}
    return out


def noisy(scheme: OutputWu, images: torch.Tensor) -> np.ndarray:
    """Which images ``verify`` would refuse alone (estimated noise sigma above the calibrated limit)."""
    import warnings

    from skimage.restoration import estimate_sigma

    from nnmark.outputs.wu_scheme import NOISE_ESTIMATE_MARGIN

    limit = NOISE_ESTIMATE_MARGIN * scheme.calibrated_noise()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est = np.array([estimate_sigma(a, channel_axis=0, average_sigmas=True) for a in images.double().numpy()])
    return np.nan_to_num(est, nan=0.0) > limit


def tiled_median_p(scheme32: OutputWu, images: torch.Tensor) -> np.ndarray:
    """The old path for a large image: every aligned 32 px tile a suspect image, the p-value of their median
    statistic under the committed 32 px calibration (:meth:`OutputWu.p_value`), one per image."""
    t = (images.shape[-1] // scheme32.image_size) ** 2
    st = scheme32.statistics(OutputWu._tiles(images, scheme32.image_size)).reshape(len(images), t)
    return np.array([scheme32.p_value(row) for row in st])


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def tables(paths: list[Path]) -> str:
    """Markdown tables of study JSONs: claims per negative kind at 1e-2 and 1e-3 (99% CP), then detection."""
    lines = []
    for path in paths:
        d = json.loads(path.read_text())
        a = d["command_args"]
        cal = d["calibration"]
        note = "the committed calibration" if isinstance(cal, str) else (
            f"recalibrated{' by kind' if cal.get('by_kind') else ''} on {sum(cal['kinds'].values())} negatives "
            f"of {len(cal['kinds'])} kinds x 9 conditions")
        lines += [f"### `{path.name}`: key `{a['key_task']}`, {d['read_size']} px images"
                  + ("" if d["read_size"] == 32 else f", the mean statistic over {(d['read_size'] // 32) ** 2} tiles")
                  + f"; {note}", "",
                  "| negatives | n | claims at 1e-2 [99% CI] | claims at 1e-3 [99% CI] | mean / max statistic |"
                  + (" old path (tiles' median, 32 px null): 1e-2 / 1e-3 |" if d["read_size"] != 32 else ""),
                  "|---|---|---|---|---|" + ("---|" if d["read_size"] != 32 else "")]
        rows = list(d["negatives"].items()) + [("**all**", d["all_negatives"])]
        for k, r in rows:
            c = [f"{r[x]['claims']} ({pct(r[x]['fpr'])}) [{pct(r[x]['ci99'][0])}, {pct(r[x]['ci99'][1])}]"
                 for x in ("0.01", "0.001")]
            stat = f"{r['statistic_mean']:.3f} / {r['statistic_max']:.3f}" if "statistic_mean" in r else ""
            old = ""
            if "tiles_median_32px_calibration" in r:
                t = r["tiles_median_32px_calibration"]
                old = f" {t['0.01']['claims']} / {t['0.001']['claims']} |"
            elif d["read_size"] != 32:
                old = " |"
            lines.append(f"| {k} | {r['n']} | {c[0]} | {c[1]} | {stat} |{old}")
        det = d["detection"]
        lines += ["", f"Marked outputs detected ({det['n']} held-out inputs, mean statistic "
                  f"{det['statistic_mean']:.3f}, min {det['statistic_min']:.3f}): "
                  + "; ".join(f"alpha {x}: {pct(det[x]['rate'])} [{pct(det[x]['ci99'][0])}, "
                              f"{pct(det[x]['ci99'][1])}] at a measured FPR of "
                              f"{pct(det[x]['fpr_measured_at_this_alpha'])}" for x in ("0.01", "0.001"))]
        if "tiles_median_32px_calibration" in det:
            lines[-1] += (f". Old path (median of the {(d['read_size'] // 32) ** 2} tiles, 32 px null): "
                          + " / ".join(pct(det["tiles_median_32px_calibration"][x]) for x in ("0.01", "0.001"))
                          + "; one 32 px tile: " + " / ".join(pct(det["one_32px_tile"][x]) for x in ("0.01", "0.001")))
        if "wrong_keys_claimed" in det:
            lines[-1] += ". Marked outputs claimed under a key with 1 / 8 / 64 / 1,024 wrong bits (alpha 1e-2): " + \
                " / ".join(str(v["0.01"]) for v in det["wrong_keys_claimed"].values()) + f" of {det['n']}"
        lines += [f"({d['seconds']:.0f} s)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", nargs="*", default=None,
                    help="only write the markdown tables of these study JSONs to --out")
    ap.add_argument("--key-task", default="sr2", choices=tuple(MODELS))
    ap.add_argument("--read-size", type=int, default=None, help="image side read (default: the key's 32 px)")
    ap.add_argument("--natural", type=int, default=1500, help="patches per natural kind")
    ap.add_argument("--per-host", type=int, default=1000, help="outputs per host")
    ap.add_argument("--calibrate", type=int, default=600,
                    help="with --read-size: negatives per kind (natural test photos, the key's unmarked host, "
                         "its other-key host) the new null is calibrated on, each in every condition")
    ap.add_argument("--marked", type=int, default=2000, help="marked outputs for the detection rate")
    ap.add_argument("--train-other-key-steps", type=int, default=0,
                    help="make the key task's other_key_host.safetensors first if missing (joint steps)")
    ap.add_argument("--which", default="other", choices=("other", "third"),
                    help="which host --train-other-key-steps makes: other_key_host or third_key_host")
    ap.add_argument("--train-only", action="store_true", help="stop after --train-other-key-steps")
    ap.add_argument("--by-kind", action="store_true",
                    help="recalibrate (at any read size) on --calibrate negatives of every kind except the attacker "
                         "and grey photos and the third-key hosts, each kind its own condition")
    ap.add_argument("--save-key", default=None, help="with --by-kind or --read-size: folder to save and commit the "
                    "recalibrated key in")
    ap.add_argument("--message-cache", default=None, help="mark_hosts.py cache with output-message marked hosts")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.tables is not None:
        Path(args.out).write_text(tables([Path(p) for p in args.tables]))
        return
    torch.set_num_threads(1)
    from nnmark.schemes.base import load_scheme

    t0 = time.perf_counter()
    name, kind = MODELS[args.key_task]
    folder = RESULTS / name
    if args.train_other_key_steps and not (folder / f"{args.which}_key_host.safetensors").exists():
        train_other_key(args.key_task, kind, folder, args.train_other_key_steps, args.which)
    if args.train_only:
        return
    scheme32 = load_scheme(folder / "owner_key.json", expect="output-wu", log=folder / "commitments.log")
    size = args.read_size or scheme32.image_size
    res: dict = {"command_args": vars(args), "key_folder": str(folder.relative_to(RESULTS.parents[2])),
                 "key_id": scheme32.key.key_id, "read_size": size}
    marked_host = load_host(args.key_task, kind, folder / "marked_host.safetensors")
    if args.by_kind:
        scheme = scheme32.with_read_size(size)
        kinds = {k: v for k, v in negatives(args.key_task, size, args.calibrate, args.calibrate, 303,
                                            Path(args.message_cache) if args.message_cache else None,
                                            third=False).items()
                 if k not in ("natural: attacker photo", "natural: other bundled grey photos")}
        t = time.perf_counter()
        scheme.calibrate(negatives=kinds, by_kind=True)
        res["calibration"] = {"kinds": {k: len(v) for k, v in kinds.items()}, "by_kind": True,
                              "conditions": len(scheme.null_conditions), "seconds": time.perf_counter() - t,
                              "threshold": {f"{a:g}": scheme.threshold(a) for a in ALPHAS}}
        print("calibrated by kind", res["calibration"], flush=True)
    elif size == scheme32.image_size:
        scheme = scheme32
        res["calibration"] = "committed with the key: " + ", ".join(
            f"{k} {len(v)}" for k, v in scheme.null_by_condition().items())
    else:
        scheme = scheme32.with_read_size(size)
        kinds = {"natural": natural_images(args.calibrate, size, 303, "test")}
        xa = photo_patches(args.key_task, size, "test", args.calibrate, 101)[0]
        for label, f in (("unmarked host", "unmarked_host"), ("other-key host", "other_key_host")):
            if (folder / f"{f}.safetensors").exists():
                kinds[label] = host_outputs(load_host(args.key_task, kind, folder / f"{f}.safetensors"), xa)
        t = time.perf_counter()
        scheme.calibrate(negatives=kinds)
        res["calibration"] = {"kinds": {k: len(v) for k, v in kinds.items()},
                              "conditions": {k: len(v) for k, v in scheme.null_by_condition().items()},
                              "seconds": time.perf_counter() - t,
                              "threshold": {f"{a:g}": scheme.threshold(a) for a in ALPHAS}}
        print("calibrated", res["calibration"], flush=True)
    if args.save_key and scheme is not scheme32:
        Path(args.save_key).mkdir(parents=True, exist_ok=True)
        scheme.save(Path(args.save_key) / "owner_key.json", log=Path(args.save_key) / "commitments.log")
    neg = negatives(args.key_task, size, args.natural, args.per_host, 9001,
                    Path(args.message_cache) if args.message_cache else None)
    print(f"{sum(len(v) for v in neg.values())} negatives in {time.perf_counter() - t0:.0f} s", flush=True)
    res["negatives"] = {}
    all_p, all_refused = [], []
    for k, imgs in neg.items():
        st = scheme.statistics(imgs)
        refused = noisy(scheme, imgs)
        res["negatives"][k] = claims(scheme, st, refused)
        if size != scheme32.image_size:
            p_old = tiled_median_p(scheme32, imgs)
            res["negatives"][k]["tiles_median_32px_calibration"] = {
                f"{a:g}": {"claims": int((p_old < a).sum()), "ci99": interval(int((p_old < a).sum()), len(p_old))}
                for a in ALPHAS}
        all_p.append(p_values(scheme, st))
        all_refused.append(refused)
        print(k, len(imgs), {a: res["negatives"][k][a]["claims"] for a in ("0.01", "0.001")}, flush=True)
    p, refused = np.concatenate(all_p), np.concatenate(all_refused)
    res["all_negatives"] = {"n": int(len(p)), "refused_as_noisy": int(refused.sum())}
    for a in ALPHAS:
        k = int(((p < a) & ~refused).sum())
        ci = interval(k, len(p))
        res["all_negatives"][f"{a:g}"] = {"claims": k, "fpr": k / len(p), "ci99": ci,
                                          "consistent_with_at_most_nominal": ci[0] <= a}
    xm = inputs(args.key_task, size, args.marked, 7001)
    marked = host_outputs(marked_host, xm)
    st = scheme.statistics(marked)
    pm = p_values(scheme, st)
    det = {"n": len(pm), "statistic_mean": float(st.mean()), "statistic_min": float(st.min())}
    for a in ALPHAS:
        k = int((pm < a).sum())
        det[f"{a:g}"] = {"detected": k, "rate": k / len(pm), "ci99": interval(k, len(pm)),
                         "fpr_measured_at_this_alpha": res["all_negatives"][f"{a:g}"]["fpr"]}
    if size != scheme32.image_size:
        p_old = tiled_median_p(scheme32, marked)
        det["tiles_median_32px_calibration"] = {f"{a:g}": float((p_old < a).mean()) for a in ALPHAS}
        one = p_values(scheme32, scheme32.statistics(marked[:, :, :32, :32]))
        det["one_32px_tile"] = {f"{a:g}": float((one < a).mean()) for a in ALPHAS}
    gen = torch.Generator().manual_seed(8)
    det["wrong_keys_claimed"] = {}
    for f in (1, 8, 64, 1024):  # the marked outputs read with keys f bits away from the owner's
        wrong = flip_bits(scheme.bits, torch.full((len(marked),), f), gen)
        pw = p_values(scheme, scheme.statistics(marked, wrong))
        det["wrong_keys_claimed"][str(f)] = {f"{a:g}": int((pw < a).sum()) for a in ALPHAS}
    res["detection"] = det
    res["seconds"] = time.perf_counter() - t0
    res["exact_size_note"] = ("conformal p: P[p <= alpha] <= alpha for innocent images exchangeable with one "
                              "condition's negatives; the test is conservative (max over conditions)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({"all_negatives": res["all_negatives"], "detection": det}, indent=1))
    print(f"wrote {args.out} in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
