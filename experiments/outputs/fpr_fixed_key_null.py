"""Why one fixed key's binomial verdict over-claims on 128 px negatives, and whether a null fitted on the key
holder's own negatives repairs it.

    .venv/bin/python experiments/outputs/fpr_study.py --size 128 --cropped 1000 --natural 4000 --per-host 1000 \
        --cache <hosts> --out /tmp/fpr128.json --save-readouts /tmp/fpr128_readouts.npz
    .venv/bin/python experiments/outputs/fpr_fixed_key_null.py /tmp/fpr128_readouts.npz \
        --out experiments/results/outputs/fpr_tiled128_null.json

Inputs: the per-image calibrated read-outs of fpr_study's 11,000 negatives (test / attacker photos and host
outputs on their patches, shipped decoder). The key holder's negatives, never among the measured ones:
``--holder`` natural 128 px crops of the train photos (3/4) and of the val draw (1/4), read the same way.
For each of the study's three fixed keys this measures, on the held-out negatives at alpha 1e-2, 1e-3, 1e-6
(claims with the 99% Clopper-Pearson interval):
- the shipped binomial verdict (centre from 32 px train patches);
- the binomial verdict with per-bit thresholds at the median of the holder's 128 px read-outs;
- a beta-binomial null whose overdispersion is fitted (method of moments, mean k/2) on the holder's match
  counts for this key (binomial when they are not overdispersed);
- an empirical (conformal) p-value ``(1 + #{holder negatives with >= matches}) / (n + 1)``.
And, per source photo (the 3 measured and the holder's 7), the mean and spread of matched bits and the share
of crops claimed: crops of one photo share most of their content, so their bits are nearly the same and they
are one unit of evidence, not many; the photo-weighted rate (each photo counted once) is the fixed-key rate
over photos rather than over crops (10 photos: no interval is claimed for it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

ALPHAS = (1e-2, 1e-3, 1e-6)


def claims(p: np.ndarray) -> dict[str, object]:
    out = {}
    for a in ALPHAS:
        k = int((p < a).sum())
        ci = sps.binomtest(k, len(p)).proportion_ci(confidence_level=0.99, method="exact")
        out[f"{a:g}"] = {"claims": k, "n": len(p), "fpr": k / len(p), "ci99": [float(ci.low), float(ci.high)]}
    return out


def natural_sources(split: str, size: int, n: int, seed: int) -> np.ndarray:
    """Source photo name of each of ``natural_images(n, size, seed, split)``'s crops (the same draw)."""
    from nnmark.outputs.data import _SPLIT_SEED, SOURCES, source_photos

    photos = source_photos(split)
    rng = np.random.default_rng([seed, _SPLIT_SEED[split], size])
    areas = np.array([p.shape[0] * p.shape[1] for p in photos], dtype=np.float64)
    return np.array(SOURCES[split])[rng.choice(len(photos), size=n, p=areas / areas.sum())]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("readouts", help=".npz written by fpr_study.py --save-readouts")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--natural", type=int, default=4000, help="as given to fpr_study.py")
    ap.add_argument("--holder", type=int, default=2000)
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/outputs/fpr_tiled128_null.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage, prepare_images
    from nnmark.outputs.data import natural_images
    from nnmark.outputs.extractor import load_shipped

    ev = np.load(args.readouts)
    cal, groups = torch.from_numpy(ev["cal"]), ev["group"]
    half = args.natural // 2
    sources = np.concatenate([natural_sources("test", args.size, half, 11),
                              natural_sources("attacker", args.size, args.natural - half, 12)])
    ext = load_shipped()
    n_train = args.holder * 3 // 4
    held = torch.cat([natural_images(n_train, args.size, 31, split="train"),
                      natural_images(args.holder - n_train, args.size, 32, split="val")])
    parts = []
    with torch.no_grad():
        for i in range(0, len(held), 256):
            tiles, counts, _ = prepare_images(held[i:i + 256])
            d = ext.decoder(tiles)
            parts += [q.mean(0) for q in ((d - ext.mu) @ ext.whiten.T).split(counts)]
    holder = torch.stack(parts)
    holder_sources = np.concatenate([natural_sources("train", args.size, n_train, 31),
                                     natural_sources("val", args.size, args.holder - n_train, 32)])
    k = ext.bits
    result = {"n": len(cal), "holder": len(holder), "size": args.size, "keys": {}}
    for i in range(args.keys):
        key = Key.from_seed(f"fpr-fixed-{i}")
        s = OutputMessage.create(key, None, extractor="shipped")
        u, uh = cal @ s.rotation.T, holder @ s.rotation.T
        centre_h = uh.median(0).values
        row = {}
        for label, c in (("centre 32 px", s.centre), ("holder median", centre_h)):
            m = ((u - c > 0).long().numpy() == s.message).sum(1)
            mh = ((uh - c > 0).long().numpy() == s.message).sum(1)
            rho = max(0.0, (float(mh.var()) / (k / 4) - 1) / (k - 1))
            ab = (1 / rho - 1) / 2 if rho > 0 else None
            p_bb = sps.betabinom.sf(m - 1, k, ab, ab) if ab else sps.binom.sf(m - 1, k, 0.5)
            row[label] = {"binomial": claims(sps.binom.sf(m - 1, k, 0.5)),
                          "beta_binomial": {"rho": rho, "holder_mean": float(mh.mean()), "holder_var": float(mh.var()),
                                            **claims(p_bb)},
                          "conformal": claims((1 + (mh[None, :] >= m[:, None]).sum(1)) / (len(mh) + 1))}
            if label == "centre 32 px":  # the 10 source photos: 3 measured, 7 the holder's
                nat = np.concatenate([m[groups == "natural"], mh])
                src = np.concatenate([sources, holder_sources])
                need = {f"{a:g}": int(next(j for j in range(k + 1) if sps.binom.sf(j - 1, k, 0.5) < a)) for a in ALPHAS}
                row["per_source_photo"] = {
                    str(ph): {"crops": int((src == ph).sum()), "mean_matches": float(nat[src == ph].mean()),
                              "sd": float(nat[src == ph].std()),
                              **{f"fpr_{a}": float((nat[src == ph] >= j).mean()) for a, j in need.items()}}
                    for ph in np.unique(src)}
                photos = row["per_source_photo"].values()
                row["photo_weighted_fpr"] = {a: float(np.mean([v[f"fpr_{a}"] for v in photos])) for a in need}
        result["keys"][key.key_id] = row
        print(key.key_id, "photo-weighted", row["photo_weighted_fpr"],
              {ph: round(v["mean_matches"], 1) for ph, v in row["per_source_photo"].items()}, flush=True)
        for label in ("centre 32 px", "holder median"):
            print(" ", label, {t: {a: row[label][t][a]["claims"] for a in ("0.01", "0.001")}
                               for t in ("binomial", "beta_binomial", "conformal")}, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
