"""Output-image marks side by side: nnmark's ``output-message`` and ``output-wu`` hosts vs ``invisible-watermark``.

    .venv/bin/pip install -e ".[outputs-peer]"
    .venv/bin/python benchmarks/bench_output_marks.py [--size 512] [--cache /tmp/nnmark-outputs]

Images: 5 bundled photos (chelsea, flower: never trained on; coffee, astronaut, rocket: train photos),
centre-cropped to ``--size`` px (or the largest multiple of 32 that fits: 288 for chelsea).
- peer: invisible-watermark's DWT-DCT (the watermark Stable Diffusion ships) embeds 32 bits into each
  photo after the fact; PSNR against the photo; bits decoded with its decoder.
- output-message: the x2 super-resolution host marked by experiments/outputs/mark_hosts.py (from
  ``--cache``, else trained here) runs on the photo's x0.5 bicubic copy; PSNR of the marked output
  against the unmarked host's output; 48 bits read over 32x32 tiles (p-value per image).
- output-wu: the x2 super-resolution host and committed key of experiments/outputs/wu_measure.py
  (``--wu``, default the checked-in ``experiments/results/outputs/wu_sr2_binary_model``) on the same x0.5
  copies; E reads each output as non-overlapping 32x32 tiles: the share of tiles above the calibrated
  alpha = 0.01 threshold, and the verdict's conformal p-value per image (median over its tiles).
Both after: nothing, JPEG quality 50 (Pillow), a crop keeping a quarter (rest zeroed), a x0.5 resize,
Gaussian noise sigma 0.05. Writes benchmarks/results/output_marks.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

PHOTOS = ("chelsea", "flower", "coffee", "astronaut", "rocket")


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w, size) // 32 * 32
    r, c = (h - s) // 2, (w - s) // 2
    return np.ascontiguousarray(img[r:r + s, c:c + s])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cache", default="/tmp/nnmark-outputs")
    ap.add_argument("--out", default="benchmarks/results/output_marks.json")
    ap.add_argument("--wu", default="experiments/results/outputs/wu_sr2_binary_model",
                    help="output-wu folder (key, committed calibration, marked and unmarked sr2 U-Net)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    from nnmark.keys import Key
    from nnmark.outputs import augment
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import _photo, degrade
    from nnmark.outputs.hosts import host_for_task

    gen = torch.Generator().manual_seed(0)
    attacks = {
        "none": lambda x: x,
        "jpeg50": lambda x: augment.jpeg_real(x, 50),
        "crop0.25": lambda x: augment.crop_keep(x, 0.25, gen),
        "resize0.5": lambda x: augment.resize(x, 0.5),
        "noise0.05": lambda x: augment.gaussian_noise(x, 0.05, gen),
    }
    photos = [centre_crop(_photo(n), args.size) for n in PHOTOS]
    tens = [torch.from_numpy(p.copy()).permute(2, 0, 1).float().div(255)[None] for p in photos]
    res: dict = {"photos": list(PHOTOS), "size": args.size, "peer": {}, "output_message": {}, "output_wu": {}}

    # peer: invisible-watermark, 32 bits, DWT-DCT
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, 32).tolist()
    enc = WatermarkEncoder()
    enc.set_watermark("bits", bits)
    dec = WatermarkDecoder("bits", 32)
    t0 = time.perf_counter()
    marked = []
    for p in photos:
        bgr = p[..., ::-1].copy()
        out = enc.encode(bgr, "dwtDct")[..., ::-1].copy()
        marked.append(torch.from_numpy(out).permute(2, 0, 1).float().div(255)[None])
    embed_s = (time.perf_counter() - t0) / len(photos)
    psnr = [float(peak_signal_noise_ratio(m, t, data_range=1.0)) for m, t in zip(marked, tens, strict=True)]
    res["peer"]["psnr"] = psnr
    res["peer"]["embed_seconds_per_image"] = embed_s
    for name, att in attacks.items():
        accs = []
        for m in marked:
            a = (att(m)[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            got = dec.decode(np.ascontiguousarray(a[..., ::-1]), "dwtDct")
            accs.append(float(np.mean(np.asarray(got, dtype=int) == np.asarray(bits))))
        res["peer"][name] = {"bit_acc": accs, "mean": float(np.mean(accs))}

    # nnmark output-message: the marked sr2 host of mark_hosts.py
    cache = Path(args.cache)
    host, ref = host_for_task("sr2", "unet"), host_for_task("sr2", "unet")
    for net, state in ((ref, "unmarked"), (host, "marked")):
        f = cache / f"sr2-unet-{state}.pt"
        if not f.exists():
            raise SystemExit(f"missing {f}: run experiments/outputs/mark_hosts.py --tasks sr2 first")
        net.load_state_dict(torch.load(f, weights_only=True))
        net.eval()
    scheme = OutputMessage.create(Key.from_seed("owner-sr2"), None)
    outs, clean = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in tens:
            x = degrade("sr2", t)
            outs.append(augment.quantize_uint8(host(x).clamp(0, 1)))
            clean.append(augment.quantize_uint8(ref(x).clamp(0, 1)))
    res["output_message"]["host_seconds_per_image"] = (time.perf_counter() - t0) / len(tens)
    res["output_message"]["psnr_vs_unmarked_output"] = [
        float(peak_signal_noise_ratio(o, c, data_range=1.0)) for o, c in zip(outs, clean, strict=True)]
    for name, att in attacks.items():
        accs, ps = [], []
        t0 = time.perf_counter()
        for o in outs:
            img = att(o)
            r, _ = scheme.image_readouts(img)
            accs.append(float(((r[0] > 0).long().numpy() == scheme.message).mean()))
            ps.append(float(scheme.p_values(img)[0]))
        res["output_message"][name] = {"bit_acc": accs, "mean": float(np.mean(accs)), "p_values": ps,
                                       "verify_seconds_per_image": (time.perf_counter() - t0) / len(outs)}
    # nnmark output-wu: the sr2 host marked jointly with E, read as 32x32 tiles
    from safetensors.torch import load_file

    from nnmark.schemes.base import load_scheme

    folder = Path(args.wu)
    wu = load_scheme(folder / "owner_key.json", expect="output-wu", log=folder / "commitments.log")
    wu_host, wu_ref = host_for_task("sr2", "unet", 16), host_for_task("sr2", "unet", 16)
    for net, state in ((wu_ref, "unmarked"), (wu_host, "marked")):
        net.load_state_dict(load_file(str(folder / f"{state}_host.safetensors")))
        net.eval()
    wu_outs, wu_clean = [], []
    with torch.no_grad():
        for t in tens:
            x = degrade("sr2", t)
            wu_outs.append(augment.quantize_uint8(wu_host(x).clamp(0, 1)))
            wu_clean.append(augment.quantize_uint8(wu_ref(x).clamp(0, 1)))
    res["output_wu"]["psnr_vs_unmarked_output"] = [
        float(peak_signal_noise_ratio(o, c, data_range=1.0)) for o, c in zip(wu_outs, wu_clean, strict=True)]
    thr = wu.threshold(0.01)
    for name, att in attacks.items():
        shares, ps = [], []
        t0 = time.perf_counter()
        for o in wu_outs:
            tiles, _ = wu.prepare_images([att(o)[0]])
            shares.append(float((wu.statistics(tiles) >= thr).double().mean()))
            ps.append(float(wu.verify(tiles, alpha=0.01).p_value))
        res["output_wu"][name] = {"tiles_detected": shares, "mean": float(np.mean(shares)), "p_values": ps,
                                  "verify_seconds_per_image": (time.perf_counter() - t0) / len(wu_outs)}
    clean_tiles = [float((wu.statistics(wu.prepare_images([c[0]])[0]) >= thr).double().mean()) for c in wu_clean]
    res["output_wu"]["unmarked_outputs_tiles_claimed"] = clean_tiles
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    wm = res["output_wu"]
    print(f"output-wu: PSNR vs unmarked {np.mean(wm['psnr_vs_unmarked_output']):.1f} dB; share of 32x32 tiles "
          "detected at alpha 0.01 (max verdict p): " + ", ".join(
              f"{n} {wm[n]['mean']:.3f} ({max(wm[n]['p_values']):.2g})" for n in attacks)
          + f"; unmarked outputs' tiles claimed {np.mean(clean_tiles):.3f}")
    print(f"{'':12s}{'invisible-watermark (32 bits)':>32s}{'output-message (48 bits)':>30s}")
    print(f"{'PSNR dB':12s}{np.mean(psnr):>24.1f} (min {min(psnr):.1f})"
          f"{np.mean(res['output_message']['psnr_vs_unmarked_output']):>20.1f} "
          f"(min {min(res['output_message']['psnr_vs_unmarked_output']):.1f})")
    for name in attacks:
        om = res["output_message"][name]
        print(f"{name:12s}{res['peer'][name]['mean']:>32.3f}{om['mean']:>22.3f} (max p {max(om['p_values']):.2g})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
