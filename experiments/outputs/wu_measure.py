"""Measure output-wu (Wu et al.'s secret extraction network) on bundled photo patches, CPU scale.

    .venv/bin/python experiments/outputs/wu_measure.py --task sr2 --watermark binary --steps 1500 \
        --out experiments/results/outputs/wu_sr2_binary.json [--host resnet] [--param augment=0.5]

Trains the unmarked host G0 (U-Net, 32 px patches of the training photos), fine-tunes a copy jointly with E
(recipe given by --recipe), and a second host marked under another key (negatives). --host picks the
U-Net or the ResNet generator. Calibrates on negatives
from photos never trained on (test photos, seed A: natural patches, G0's outputs, the other-key host's
outputs) and measures on disjoint ones (test photos seed B, the attacker photo): detection rate at the
calibrated thresholds, false-positive rate per kind with 95% Clopper-Pearson intervals, fidelity (PSNR/SSIM
of marked vs unmarked outputs, task PSNR of both against ground truth, scikit-image metrics), watermark
recovery (BER of the binary watermark's sign / PSNR of the colour one), key sensitivity (0..1,024 flipped
bits) and robustness (noise, crop, real JPEG, resize). Each attack's false-positive rate is measured on the
evaluation negatives attacked the same way, at the per-condition threshold (the scheme's) and, for comparison,
at the single pooled threshold of earlier versions (every negative distorted once, the distortions in turn).

E taught other keys' marks as blanks (``--negative-host``), from the shipped G0 (``--host-from``), then counted
the ``wu_fpr_study.py`` way against the shipped key (``--count-fpr``: both keys recalibrated on the same
negatives, pooled and by kind, claims per kind over the study's >= 15,000 held-out negatives):

    F=experiments/results/outputs/wu_sr2_binary_model; C=experiments/results/outputs/wu_colourise_resnet_model
    D=experiments/results/outputs/wu_denoise_resnet_model
    .venv/bin/python experiments/outputs/wu_measure.py --task sr2 --steps 1500 --host-from $F \
        --key-seed wu-sr2-owner-othernegs --negative-host sr2=$F/other_key_host.safetensors \
        --negative-host colourise=$C/other_key_host.safetensors --negative-host denoise=$D/other_key_host.safetensors \
        --save /tmp/wu128/sr2_othernegs_model --out experiments/results/outputs/wu_sr2_othernegs.json
    .venv/bin/python experiments/outputs/wu_measure.py --task sr2 --count-fpr $F /tmp/wu128/sr2_othernegs_model \
        --message-cache /tmp/nnmark-outputs --out experiments/results/outputs/wu_sr2_othernegs_fpr.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nnmark.data.dataset import ImageDataset
from nnmark.keys import Key
from nnmark.outputs import augment as A
from nnmark.outputs.data import natural_images, photo_patches
from nnmark.outputs.hosts import host_for_task, train_host
from nnmark.outputs.wu_network import flip_bits
from nnmark.outputs.wu_scheme import CALIBRATION_DISTORTIONS, OutputWu, distort_one
from nnmark.train import TrainConfig


def out(model, x):
    with torch.no_grad():
        return torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)]).clamp(0, 1)


def rate(hits: int, n: int) -> dict:
    ci = binomtest(hits, n).proportion_ci(0.95, method="exact")
    return {"rate": hits / n, "k": hits, "n": n, "ci95": [round(ci.low, 5), round(ci.high, 5)]}


def metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    an, bn = a.permute(0, 2, 3, 1).numpy(), b.permute(0, 2, 3, 1).numpy()
    ps = [peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(an, bn, strict=True)]
    ss = [structural_similarity(x, y, data_range=1.0, channel_axis=2) for x, y in zip(an, bn, strict=True)]
    return {"psnr_mean": float(np.mean(ps)), "psnr_min": float(np.min(ps)), "ssim_mean": float(np.mean(ss))}


def mark(key: Key, g0, x, y, args, params, extra=None):
    g = copy.deepcopy(g0)
    scheme = OutputWu.create(key, g, image_size=args.size, watermark=args.watermark, recipe=args.recipe, **params)
    t = time.perf_counter()
    rec = scheme.embed(g, ImageDataset(x, y, 0), TrainConfig(epochs=1000, batch_size=args.batch, max_steps=args.steps,
                                                             progress=False),
                       extra_negatives=extra,
                       log=lambda step, h: print(step, {k: round(v, 4) for k, v in h.items()}, flush=True))
    return scheme, g, time.perf_counter() - t, rec.config["wu_history"]


def negative_bank(specs: list[str], size: int, n: int) -> tuple[torch.Tensor, dict[str, int]]:
    """``TASK=PATH`` hosts (the task's host kind of ``wu_fpr_study.MODELS``) -> their 8-bit outputs on ``n``
    training-split inputs of their task each (never the test or attacker photos that calibration and studies use)."""
    from wu_fpr_study import MODELS, host_outputs, load_host

    bank, counts = [], {}
    for spec in specs:
        task, path = spec.split("=", 1)
        xs = photo_patches(task, size, "train", n, 5)[0]
        bank.append(host_outputs(load_host(task, MODELS[task][1], Path(path)), xs))
        counts[spec] = len(bank[-1])
    return torch.cat(bank), counts


def count_fpr(task: str, folders: list[str], args) -> dict:
    """``wu_fpr_study.py``-style counting of several keys of ``task`` under identical nulls: each key's committed
    E recalibrated (a copy; the key files are left as they are) on (i) ``pooled``: n = ``--count-n`` (1,000) test
    photos and n outputs of its unmarked host (the seeds of this script's calibration; the null under which the
    shipped key claimed one other-key denoise host's outputs), (ii) ``by kind``: ``wu_fpr_study.py --by-kind --calibrate
    1000``'s kinds and seeds (n per kind). Claims per kind on the study's held-out negatives (seed 9001, 1.5 n
    photos and n host outputs per kind, the third-key host included: never trained on, never calibrated on),
    detection of 2 n held-out marked outputs, PSNR."""
    from wu_fpr_study import MODELS, claims, host_outputs, inputs, load_host, negatives, p_values

    from nnmark.schemes.base import load_scheme

    kind = MODELS[task][1]
    cache = Path(args.message_cache) if args.message_cache else None
    t0 = time.perf_counter()
    n = args.count_n
    by_kind = {k: v for k, v in negatives(task, args.size, n, n, 303, cache, third=False).items()
               if k not in ("natural: attacker photo", "natural: other bundled grey photos")}
    study = negatives(task, args.size, n + n // 2, n, 9001, cache)
    xa = photo_patches(task, args.size, "test", n, 101)[0]
    xm = inputs(task, args.size, 2 * n, 7001)
    res: dict = {"by_kind_calibration_kinds": {k: len(v) for k, v in by_kind.items()},
                 "study_negatives": {k: len(v) for k, v in study.items()}, "keys": {}}
    for f in folders:
        folder = Path(f)
        base = load_scheme(folder / "owner_key.json", expect="output-wu", log=folder / "commitments.log")
        g0 = load_host(task, kind, folder / "unmarked_host.safetensors")
        g = load_host(task, kind, folder / "marked_host.safetensors")
        marked, unmarked = host_outputs(g, xm), host_outputs(g0, xm)
        s_pos = base.statistics(marked)
        s_neg = {k: base.statistics(v) for k, v in study.items()}
        for f2 in folders:  # the other compared keys' marked hosts: other-key hosts never trained or calibrated on
            if f2 != f:
                h2 = load_host(task, kind, Path(f2) / "marked_host.safetensors")
                s_neg[f"marked host, other key: {task} ({Path(f2).name}, compared)"] = base.statistics(
                    host_outputs(h2, inputs(task, args.size, n, 9077)))
        r: dict = {"key_id": base.key.key_id, "fidelity_marked_vs_unmarked": metrics(marked, unmarked),
                   "marked_statistic": {"mean": float(s_pos.mean()), "min": float(s_pos.min())}, "nulls": {}}
        pooled = {"natural": natural_images(n, args.size, 303, "test"), "unmarked host": host_outputs(g0, xa)}
        for null, (negs, bk) in {"pooled": (pooled, False), "by kind": (by_kind, True)}.items():
            t = time.perf_counter()
            scheme = base.with_read_size(base.image_size)
            scheme.calibrate(negatives=negs, by_kind=bk)
            nr: dict = {"calibration_seconds": time.perf_counter() - t,
                        "threshold": {f"{a:g}": scheme.threshold(a) for a in (0.01, 0.001)},
                        "smallest_p": scheme.min_alpha(1), "negatives": {}}
            all_p = []
            for k, st in s_neg.items():
                nr["negatives"][k] = claims(scheme, st)
                all_p.append(p_values(scheme, st))
            p = np.concatenate(all_p)
            nr["all_negatives"] = {f"{a:g}": rate(int((p < a).sum()), len(p)) for a in (0.01, 0.001)}
            pm = p_values(scheme, s_pos)
            nr["detection"] = {f"{a:g}": rate(int((pm < a).sum()), len(pm)) for a in (0.01, 0.001)}
            r["nulls"][null] = nr
            print(folder.name, null, nr["threshold"], {a: (nr["detection"][a]["k"], nr["all_negatives"][a]["k"])
                                                      for a in ("0.01", "0.001")}, flush=True)
        r["statistic_mean_max_per_kind"] = {k: [float(v.mean()), float(v.max())] for k, v in s_neg.items()}
        r["margin_min_marked_minus_max_negative"] = float(s_pos.min()) - max(float(v.max()) for v in s_neg.values())
        res["keys"][f] = r
    res["seconds"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sr2")
    ap.add_argument("--watermark", default="binary")
    ap.add_argument("--recipe", default="nnmark")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--host", default="unet", choices=("unet", "resnet"))
    ap.add_argument("--host-width", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=2048)
    ap.add_argument("--negatives", type=int, default=1000, help="per kind, calibration and evaluation each")
    ap.add_argument("--param", action="append", default=[], help="scheme parameter KEY=VALUE")
    ap.add_argument("--no-other-key", action="store_true", help="skip the host marked under another key")
    ap.add_argument("--out", required=True)
    ap.add_argument("--load", default=None, help="a --save folder: re-calibrate and measure its hosts and key "
                    "(no training; timings and history are copied from --out if it exists)")
    ap.add_argument("--save", default=None, help="folder for the key file and both hosts' weights (safetensors)")
    ap.add_argument("--host-from", default=None, help="a --save folder: its unmarked host is G0 (no host training) "
                    "and its other_key_host the other-key reference (no second marking)")
    ap.add_argument("--key-seed", default=None, help="the owner key's seed (default wu-<task>-owner)")
    ap.add_argument("--negative-host", action="append", default=[], metavar="TASK=PATH",
                    help="a host whose outputs on 2,048 training inputs of its task E learns as blanks (repeat)")
    ap.add_argument("--count-fpr", nargs="+", default=None, metavar="FOLDER",
                    help="only count these --save folders' keys the wu_fpr_study.py way (see count_fpr), to --out")
    ap.add_argument("--count-n", type=int, default=1000, help="with --count-fpr: negatives per kind (see count_fpr)")
    ap.add_argument("--message-cache", default=None, help="with --count-fpr: mark_hosts.py's output-message hosts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.count_fpr:
        res = count_fpr(args.task, args.count_fpr, args)
        res["args"] = vars(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out} in {res['seconds']:.0f} s")
        return
    params = dict(kv.split("=", 1) for kv in args.param)
    res: dict = {"args": vars(args)}
    x, y = photo_patches(args.task, args.size, "train", args.train, 0)
    g0 = host_for_task(args.task, args.host, args.host_width)
    extra = None
    if args.negative_host:
        extra, res["extra_negatives"] = negative_bank(args.negative_host, args.size, 2048)
    other = None
    if args.host_from:
        from safetensors.torch import load_file

        g0.load_state_dict(load_file(str(Path(args.host_from) / "unmarked_host.safetensors")))
        g0.eval()
        if not args.no_other_key and (Path(args.host_from) / "other_key_host.safetensors").exists():
            other = host_for_task(args.task, args.host, args.host_width)
            other.load_state_dict(load_file(str(Path(args.host_from) / "other_key_host.safetensors")))
            other.eval()
        res["host_from"] = args.host_from
    if args.load:
        from safetensors.torch import load_file

        from nnmark.schemes.base import load_scheme

        folder = Path(args.load)
        g = host_for_task(args.task, args.host, args.host_width)
        g0.load_state_dict(load_file(str(folder / "unmarked_host.safetensors")))
        g.load_state_dict(load_file(str(folder / "marked_host.safetensors")))
        g0.eval(), g.eval()
        scheme = load_scheme(folder / "owner_key.json", expect="output-wu", log=folder / "commitments.log")
        if Path(args.out).exists():
            old = json.loads(Path(args.out).read_text())
            res.update({k: old[k] for k in ("host_seconds", "host_test_psnr", "embed_seconds",
                                            "embed_over_host_time", "history") if k in old})
    else:
        if not args.host_from:
            host = train_host(g0, args.task, epochs=4, data=(x, y))
            res["host_seconds"], res["host_test_psnr"] = host["seconds"], host["test_psnr"]
        scheme, g, secs, hist = mark(Key.from_seed(args.key_seed or f"wu-{args.task}-owner"), g0, x, y, args, params,
                                     extra)
        res["embed_seconds"] = secs
        if "host_seconds" in res:
            res["embed_over_host_time"] = secs / res["host_seconds"]
        res["history"] = hist[:: max(1, len(hist) // 15)]
    n = args.negatives
    xa, ya = photo_patches(args.task, args.size, "test", n, 101)     # calibration inputs (seed A)
    xb, yb = photo_patches(args.task, args.size, "test", n, 202)     # evaluation inputs (seed B)
    nat_a, nat_b = natural_images(n, args.size, 303, "test"), natural_images(n, args.size, 404, "test")
    att = natural_images(n, args.size, 505, "attacker")
    refs = [g0]
    if not args.no_other_key and not args.load and other is None:
        _, other, _, _ = mark(Key.from_seed(f"wu-{args.task}-other"), g0, x, y, args, params)
    if other is not None:
        refs.append(other)
    counts = scheme.calibrate(refs, inputs=xa, natural=nat_a)
    res["calibration"] = {"kinds": counts, "conditions": {k: len(v) for k, v in scheme.null_by_condition().items()}}
    # the pooled null of earlier versions, on the same negatives: clean + each distorted once, in turn
    clean_neg = torch.cat([nat_a] + [out(r, xa) for r in refs])
    gen_l = torch.Generator().manual_seed(11)
    legacy_d = torch.cat([distort_one(im[None], CALIBRATION_DISTORTIONS[i % len(CALIBRATION_DISTORTIONS)], gen_l)
                          for i, im in enumerate(clean_neg)])
    legacy_null = torch.sort(torch.cat([scheme.statistics(clean_neg), scheme.statistics(legacy_d)]))[0]

    def pooled_threshold(alpha: float) -> float:
        k = int(np.floor(alpha * (len(legacy_null) + 1))) - 1
        return float(legacy_null[len(legacy_null) - 1 - k])
    if args.save:  # commit the calibrated key now: the verdicts below are then evidence
        from safetensors.torch import save_file

        folder = Path(args.save)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(folder / "marked_host.safetensors"))
        save_file({k: v.contiguous() for k, v in g0.state_dict().items()}, str(folder / "unmarked_host.safetensors"))
        if other is not None:  # a host marked under another key: a negative for later studies
            save_file({k: v.contiguous() for k, v in other.state_dict().items()},
                      str(folder / "other_key_host.safetensors"))
        scheme.save(folder / "owner_key.json", log=folder / "commitments.log")
    marked_b, unmarked_b = out(g, xb), out(g0, xb)
    neg_eval = {"natural(test photos)": nat_b, "natural(attacker photo)": att, "unmarked host": unmarked_b}
    if other is not None:
        neg_eval["other-key host"] = out(other, xb)
    t = time.perf_counter()
    s_pos = scheme.statistics(marked_b)
    res["verify_ms_per_image"] = 1000 * (time.perf_counter() - t) / len(marked_b)
    s_neg = {k: scheme.statistics(v) for k, v in neg_eval.items()}
    res["statistic"] = {"marked": [float(s_pos.mean()), float(s_pos.min())],
                        **{k: [float(v.mean()), float(v.max())] for k, v in s_neg.items()}}
    res["detection"] = {}
    for alpha in (0.01, 0.001):
        thr = scheme.threshold(alpha)
        res["detection"][str(alpha)] = {
            "threshold": thr, "tpr": rate(int((s_pos >= thr).sum()), len(s_pos)),
            "fpr_eval": {k: rate(int((v >= thr).sum()), len(v)) for k, v in s_neg.items()},
            "fpr_eval_all": rate(int(sum(int((v >= thr).sum()) for v in s_neg.values())),
                                 sum(len(v) for v in s_neg.values()))}
        for m in (1, 4, 16):
            groups = marked_b[: (len(marked_b) // m) * m].reshape(-1, m, *marked_b.shape[1:])
            owned = sum(scheme.verify(gp, alpha=max(alpha, 1.01 * scheme.min_alpha(m))).owned
                        for gp in groups[:64])
            res["detection"][str(alpha)][f"verdict_owned_batches_of_{m}"] = f"{owned}/{min(64, len(groups))}"
    res["fidelity_marked_vs_unmarked"] = metrics(marked_b, unmarked_b)
    res["task_psnr_marked"] = metrics(marked_b, yb)["psnr_mean"]
    res["task_psnr_unmarked"] = metrics(unmarked_b, yb)["psnr_mean"]
    ext = scheme.extract(marked_b)
    if args.watermark == "binary":
        res["watermark_ber"] = float((torch.sign(ext) != scheme.watermark).double().mean())
    else:
        mse = ((ext - scheme.watermark) ** 2).flatten(1).mean(1) / 4.0   # [-1, 1] -> peak 1
        res["watermark_psnr_db"] = float((10 * torch.log10(1 / mse.clamp(min=1e-12))).mean())
    thr = scheme.threshold(0.01)
    gen = torch.Generator().manual_seed(7)
    keys = {}
    probe = marked_b[:256]
    for f in (0, 1, 2, 4, 8, 16, 64, 256, 512, 1024):
        wrong = flip_bits(scheme.bits, torch.full((len(probe),), f), gen)
        st = scheme.statistics(probe, wrong)
        keys[str(f)] = {"rejected": float((st < thr).double().mean()), "mean_statistic": float(st.mean())}
    res["key_sensitivity"] = keys
    rob = {}
    neg_all = torch.cat(list(neg_eval.values()))   # evaluation negatives, attacked like the marked
    thr_pooled = pooled_threshold(0.01)
    res["threshold_0.01"] = {"per_condition": thr, "pooled_legacy": thr_pooled}
    attacks = {**{f"noise {s}": (lambda im, s=s: A.gaussian_noise(im, s, torch.Generator().manual_seed(1)))
                  for s in (0.01, 0.02, 0.05, 0.1)},
               **{f"crop keep {f}": (lambda im, f=f: A.crop_keep(im, f, torch.Generator().manual_seed(2)))
                  for f in (0.75, 0.5, 0.25)},
               **{f"jpeg {q}": (lambda im, q=q: A.jpeg_real(im, q)) for q in (90, 70, 50)},
               "resize 0.5": lambda im: A.resize(im, 0.5)}
    for name, fn in [("none", lambda im: im)] + list(attacks.items()):
        sp, sn = scheme.statistics(fn(marked_b[:256])), scheme.statistics(fn(neg_all))
        rob[name] = {"tpr": float((sp >= thr).double().mean()), "mean_statistic": float(sp.mean()),
                     "fpr_attacked_negatives": rate(int((sn >= thr).sum()), len(sn)),
                     "tpr_pooled_legacy": float((sp >= thr_pooled).double().mean()),
                     "fpr_attacked_negatives_pooled_legacy": rate(int((sn >= thr_pooled).sum()), len(sn))}
    res["robustness_at_threshold_alpha_0.01"] = rob
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("detection", "fidelity_marked_vs_unmarked", "key_sensitivity",
                                          "embed_seconds") if k in res}, indent=1))


if __name__ == "__main__":
    main()
