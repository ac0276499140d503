"""Robustness curves (Wu et al. Figs 9-10) and key sensitivity (Figs 11-12) for both output-mark extractors.

    .venv/bin/python experiments/outputs/figures_curves.py \
        --wu sr2:unet:experiments/results/outputs/wu_sr2_binary_model \
        [--wu denoise:resnet:experiments/results/outputs/wu_denoise_resnet_model] \
        [--message-cache /tmp/nnmark-outputs] --out experiments/results/outputs/figures

Evaluation only (no training). For each ``--wu TASK:HOST:FOLDER`` (a ``wu_measure.py --save`` folder: key file,
committed calibration, marked and unmarked host): the marked host's outputs on 256 patches of photos never
trained on, attacked by Gaussian noise sigma 0..0.5 (Fig. 9) and by a crop keeping a square of side 32..8 px,
rest zeroed (Fig. 10; the paper keeps 128..240 of 256 px, i.e. 1/4..0.88 of the area), and (beyond the paper)
real JPEG quality 95..10 and a x1..x0.25 resize (down and back up); per level the mean
PSNR of the extracted watermark against the owner's (the paper's measure, both in [-1, 1] mapped to [0, 1]),
the detection rate at the calibrated alpha = 0.01 threshold, and the claim rate on 512 evaluation negatives
(unmarked-host outputs and test-photo patches) attacked the same way, with its 95% interval. Key sensitivity
(Figs 11-12): keys with 0..1,024 of the 1,024 extraction bits flipped, per count the watermark PSNR
(mean and quartiles, as the box plots) and the share rejected at the threshold.

For ``--message-cache`` (the hosts experiments/outputs/mark_hosts.py saved): the output-message hosts'
outputs under the same attacks: bit accuracy, share of single outputs with p < 1e-6 and of batches of 16 with
p < 1e-6; key sensitivity: owner keys with 0..256 of their 256 secret bits flipped (message and rotation are
drawn from the key, so one flipped bit gives an unrelated read-out): median p of the marked outputs.

Writes ``curves.json``, ``curves.md`` and PNGs (noise, crop, keys) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

NOISE = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
CROP_SIDES = (32, 30, 28, 26, 24, 22, 20, 18, 16, 12, 8)  # of 32 px; the paper's 240..128 of 256 is 30..16
JPEG = (95, 90, 70, 50, 30, 10)
RESIZE = (1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.25)
FLIPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MESSAGE_FLIPS = (0, 1, 2, 8, 32, 128, 256)
MESSAGE_HOSTS = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}


def ci(k: int, n: int) -> list[float]:
    c = binomtest(k, n).proportion_ci(0.95, method="exact")
    return [round(float(c.low), 5), round(float(c.high), 5)]


def attack_fns(seed: int) -> dict[str, dict[float, object]]:
    from nnmark.outputs import augment as A

    def crop(side: int):
        frac = (side / 32) ** 2
        def f(x: torch.Tensor) -> torch.Tensor:
            gen = torch.Generator().manual_seed(seed)  # a fresh position per image
            return torch.cat([A.crop_keep(x[i:i + 1], frac, gen) for i in range(len(x))])
        return f

    def noise(s: float):
        return lambda x: A.gaussian_noise(x, s, torch.Generator().manual_seed(seed)) if s > 0 else x

    def jpeg(q: int):
        return lambda x: A.jpeg_real(x, q)

    def resize(f: float):
        return lambda x: A.resize(x, f) if f < 1 else x

    return {"noise": {s: noise(s) for s in NOISE}, "crop": {c: crop(c) for c in CROP_SIDES},
            "jpeg": {q: jpeg(q) for q in JPEG}, "resize": {f: resize(f) for f in RESIZE}}


def wm_psnr(extracted: torch.Tensor, watermark: torch.Tensor) -> torch.Tensor:
    """Per image: PSNR (dB) of the extraction against the watermark, both mapped from [-1, 1] to [0, 1]."""
    mse = ((extracted - watermark[None]) ** 2).flatten(1).mean(1) / 4.0
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def wu_curves(task: str, host_kind: str, folder: Path) -> dict:
    from safetensors.torch import load_file

    from nnmark.outputs.data import natural_images, photo_patches
    from nnmark.outputs.hosts import host_for_task
    from nnmark.outputs.wu_network import flip_bits
    from nnmark.outputs.wu_scheme import NOISE_ESTIMATE_MARGIN
    from nnmark.schemes.base import load_scheme

    scheme = load_scheme(folder / "owner_key.json", expect="output-wu", log=folder / "commitments.log")
    hosts = {}
    for name in ("unmarked", "marked"):
        h = host_for_task(task, host_kind, 16)
        h.load_state_dict(load_file(str(folder / f"{name}_host.safetensors")))
        hosts[name] = h.eval()
    x, _ = photo_patches(task, scheme.image_size, "test", 256, 606)
    with torch.no_grad():
        marked, unmarked = hosts["marked"](x).clamp(0, 1), hosts["unmarked"](x).clamp(0, 1)
    negatives = torch.cat([unmarked, natural_images(256, scheme.image_size, 707, "test")])
    thr = scheme.threshold(0.01)
    res: dict = {"task": task, "host": host_kind, "folder": str(folder), "watermark": scheme.watermark_kind,
                 "threshold_alpha_0.01": thr, "images": len(marked), "negatives": len(negatives)}
    for family, levels in attack_fns(3).items():
        rows = []
        for level, fn in levels.items():
            am, an = fn(marked), fn(negatives)
            sp, sn = scheme.statistics(am), scheme.statistics(an)
            k = int((sn >= thr).sum())
            limit = NOISE_ESTIMATE_MARGIN * scheme.calibrated_noise()
            rows.append({"level": level, "wm_psnr_db": float(wm_psnr(scheme.extract(am), scheme.watermark).mean()),
                         "verify_refuses_marked": scheme.estimated_noise(am) > limit,
                         "verify_refuses_negatives": scheme.estimated_noise(an) > limit,
                         "detection_rate": float((sp >= thr).double().mean()), "mean_statistic": float(sp.mean()),
                         "negatives_claimed": k / len(sn), "negatives_claimed_ci95": ci(k, len(sn))})
            print(task, family, level, rows[-1], flush=True)
        res[family] = rows
    gen = torch.Generator().manual_seed(12)
    probe = marked[:128]
    keys = []
    for f in FLIPS:
        bits = flip_bits(scheme.bits, torch.full((len(probe),), f), gen)
        ps = wm_psnr(scheme.extract(probe, bits), scheme.watermark)
        st = scheme.statistics(probe, bits)
        q = np.percentile(ps.numpy(), [0, 25, 50, 75, 100])
        keys.append({"flipped_bits": f, "wm_psnr_mean": float(ps.mean()), "wm_psnr_quartiles": q.round(2).tolist(),
                     "rejected": float((st < thr).double().mean()), "mean_statistic": float(st.mean())})
    res["keys"] = keys
    return res


def message_curves(task: str, cache: Path) -> dict:
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import photo_patches
    from nnmark.outputs.hosts import host_for_task

    kind = MESSAGE_HOSTS[task]
    host = host_for_task(task, kind)
    host.load_state_dict(torch.load(cache / f"{task}-{kind}-marked.pt", weights_only=True))
    host.eval()
    key = Key.from_seed(f"owner-{task}")
    scheme = OutputMessage.create(key, None)
    x, _ = photo_patches(task, 32, "test", 256, 606)
    with torch.no_grad():
        marked = host(x).clamp(0, 1)
    res: dict = {"task": task, "host": kind, "bits": int(scheme.bits), "images": len(marked)}
    for family, levels in attack_fns(3).items():
        rows = []
        for level, fn in levels.items():
            img = fn(marked)
            r, _ = scheme.image_readouts(img)
            acc = float(((r > 0).long().numpy() == scheme.message[None]).mean())
            single, batch = scheme.p_values(img, 1), scheme.p_values(img, 16)
            rows.append({"level": level, "bit_accuracy": acc, "single_p_lt_1e-6": float((single < 1e-6).mean()),
                         "batch16_p_lt_1e-6": float((batch < 1e-6).mean())})
            print(task, family, level, rows[-1], flush=True)
        res[family] = rows
    secret = bytes.fromhex(key.to_hex())
    rng = np.random.default_rng(13)
    keys = []
    for f in MESSAGE_FLIPS:
        bits = np.unpackbits(np.frombuffer(secret, np.uint8)).copy()
        pos = rng.choice(len(bits), f, replace=False)
        bits[pos] ^= 1
        wrong = OutputMessage.create(Key.from_hex(np.packbits(bits).tobytes().hex()), None)
        p = wrong.p_values(marked[:128], 1)
        read = (wrong.image_readouts(marked[:128])[0] > 0).long().numpy()
        keys.append({"flipped_key_bits": f, "median_p": float(np.median(p)),
                     "share_p_lt_1e-6": float((p < 1e-6).mean()),
                     "bit_accuracy_vs_that_keys_message": float((read == wrong.message[None]).mean())})
    res["keys"] = keys
    return res


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for family, xlabel in (("noise", "Gaussian noise sigma (images in [0, 1])"),
                           ("crop", "side of the square kept (px of 32; rest zeroed)")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for r in results["wu"]:
            lab = f"output-wu {r['task']}/{r['host']}"
            xs = [row["level"] for row in r[family]]
            axes[0].plot(xs, [row["wm_psnr_db"] for row in r[family]], "o-", label=lab)
            axes[1].plot(xs, [row["detection_rate"] for row in r[family]], "o-", label=lab + " (alpha 0.01)")
            axes[1].plot(xs, [row["negatives_claimed"] for row in r[family]], "x:", label=lab + " negatives claimed")
        for r in results["message"]:
            xs = [row["level"] for row in r[family]]
            axes[1].plot(xs, [row["bit_accuracy"] for row in r[family]], "s--",
                         label=f"output-message {r['task']} bit acc.")
        axes[0].set_xlabel(xlabel)
        axes[0].set_ylabel("extracted watermark PSNR (dB)")
        axes[0].set_title("Fig. 9/10 analogue: watermark PSNR" if family == "noise" else "watermark PSNR vs crop")
        axes[1].set_xlabel(xlabel)
        axes[1].set_ylabel("rate")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].legend(fontsize=6)
        if family == "crop":
            for ax in axes:
                ax.invert_xaxis()
        fig.tight_layout()
        fig.savefig(out / f"robustness_{family}.png", dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results["wu"]:
        xs = [max(k["flipped_bits"], 0.5) for k in r["keys"]]
        axes[0].plot(xs, [k["wm_psnr_mean"] for k in r["keys"]], "o-", label=f"output-wu {r['task']}/{r['host']}")
        axes[0].fill_between(xs, [k["wm_psnr_quartiles"][1] for k in r["keys"]],
                             [k["wm_psnr_quartiles"][3] for k in r["keys"]], alpha=0.2)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("wrong bits of the 1,024-bit extraction key (0 drawn at 0.5)")
    axes[0].set_ylabel("extracted watermark PSNR (dB)")
    axes[0].set_title("Fig. 11/12 analogue (band: quartiles)")
    axes[0].legend(fontsize=7)
    for r in results["message"]:
        xs = [max(k["flipped_key_bits"], 0.5) for k in r["keys"]]
        axes[1].plot(xs, [max(k["median_p"], 1e-30) for k in r["keys"]], "s--", label=f"output-message {r['task']}")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("flipped bits of the 256-bit owner secret")
    axes[1].set_ylabel("median p of marked outputs")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "key_sensitivity.png", dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["# Robustness and key-sensitivity curves (written by figures_curves.py)", ""]
    for r in results["wu"]:
        lines += [f"## output-wu {r['task']} / {r['host']} ({r['watermark']} watermark, {r['images']} outputs, "
                  f"{r['negatives']} negatives, threshold {r['threshold_alpha_0.01']:.3f} at alpha 0.01)", ""]
        for family in ("noise", "crop", "jpeg", "resize"):
            lines += [f"| {family} | wm PSNR dB | detected | negatives claimed [95% CI] | verify refuses (noise) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {row['level']} | {row['wm_psnr_db']:.1f} | {row['detection_rate']:.3f} | "
                      f"{row['negatives_claimed']:.3f} [{row['negatives_claimed_ci95'][0]:.3f}, "
                      f"{row['negatives_claimed_ci95'][1]:.3f}] | "
                      + ("both" if row["verify_refuses_marked"] and row["verify_refuses_negatives"] else
                         "marked" if row["verify_refuses_marked"] else
                         "negatives" if row["verify_refuses_negatives"] else "no") + " |" for row in r[family]]
            lines.append("")
        lines += ["| wrong key bits | wm PSNR mean (min / q1 / median / q3 / max) | rejected |", "|---|---|---|"]
        for k in r["keys"]:
            quart = " / ".join(f"{v:.1f}" for v in k["wm_psnr_quartiles"])
            lines.append(f"| {k['flipped_bits']} | {k['wm_psnr_mean']:.1f} ({quart}) | {k['rejected']:.3f} |")
        lines.append("")
    for r in results["message"]:
        lines += [f"## output-message {r['task']} / {r['host']} ({r['bits']} bits, {r['images']} outputs)", ""]
        for family in ("noise", "crop", "jpeg", "resize"):
            lines += [f"| {family} | bit accuracy | single p < 1e-6 | batches of 16 p < 1e-6 |", "|---|---|---|---|"]
            lines += [f"| {row['level']} | {row['bit_accuracy']:.3f} | {row['single_p_lt_1e-6']:.3f} | "
                      f"{row['batch16_p_lt_1e-6']:.3f} |" for row in r[family]]
            lines.append("")
        lines += ["| flipped secret bits | median p | share p < 1e-6 | bit acc. vs that key's message |",
                  "|---|---|---|---|"]
        lines += [f"| {k['flipped_key_bits']} | {k['median_p']:.2g} | {k['share_p_lt_1e-6']:.3f} | "
                  f"{k['bit_accuracy_vs_that_keys_message']:.3f} |" for k in r["keys"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wu", action="append", default=[], help="TASK:HOST:FOLDER of a wu_measure.py --save run")
    ap.add_argument("--message-cache", default=None, help="mark_hosts.py --cache folder (output-message hosts)")
    ap.add_argument("--message-tasks", nargs="+", default=list(MESSAGE_HOSTS))
    ap.add_argument("--out", default="experiments/results/outputs/figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"wu": [], "message": []}
    for spec in args.wu:
        task, host, folder = spec.split(":", 2)
        results["wu"].append(wu_curves(task, host, Path(folder)))
    if args.message_cache:
        for task in args.message_tasks:
            results["message"].append(message_curves(task, Path(args.message_cache)))
    (out / "curves.json").write_text(json.dumps(results, indent=1))
    (out / "curves.md").write_text(table(results))
    plot(results, out)
    print(f"wrote {out}/curves.json, curves.md, robustness_noise.png, robustness_crop.png, key_sensitivity.png")


if __name__ == "__main__":
    main()
