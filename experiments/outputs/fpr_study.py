"""False-positive study of ``output-message`` for FIXED keys over >= 10,000 negative images.

    .venv/bin/python experiments/outputs/fpr_study.py          # after mark_hosts.py (it reads its hosts)
    .venv/bin/python experiments/outputs/fpr_study.py --extractor keyed --cache /tmp/nnmark-outputs-keyed \
        --out experiments/results/outputs/fpr_keyed.json      # the keyed low-pass decoder
    .venv/bin/python experiments/outputs/fpr_study.py --size 128 --cropped 1000 --cache <hosts> \
        --out experiments/results/outputs/fpr_tiled128.json   # 128 px negatives read as 16 tiles each

With ``--size`` S > 32 every negative is S x S and is read as verify reads it (aligned 32 px tiles averaged);
``--cropped`` adds natural negatives after a crop keeping 1/4 with the rest zeroed (read over the kept tiles).

Negatives (32x32, none made with the keys tested):
- natural photo patches of the test and attacker photos (never used to train or calibrate the extractor);
- outputs of the unmarked hosts of mark_hosts.py on test / attacker inputs;
- outputs of the hosts marked under the owners' keys of mark_hosts.py (other keys than the ones tested;
  a host with a mark head is read from its ``-marked.safetensors`` file);
- with ``--refined N``: N outputs per task of the unmarked host marked by per-output refinement for the
  task's owner key (and its ``--refined-companion`` mark), as served refined outputs would be.

For each of ``--keys`` fixed keys, every negative is verified alone; the measured false-positive rate at
each nominal alpha (1e-2, 1e-3, 1e-6) is given with its two-sided 99% Clopper-Pearson interval, beside the
exact size of the binomial test at that alpha (the test is discrete: P[p < alpha] under H0). The same is
measured for the raw decoder (signs of its logits, no whitening, no keyed rotation, no centring) to show
what the calibration fixes. Also: the bits' bias and pairwise correlation over all negatives, for both.
``--test soft`` measures the soft sign test instead (no discrete size: rates beside the nominal alpha);
``--batch 16`` adds claims over batches of 16 negatives of one kind, read-outs averaged as verify does.
Writes experiments/results/outputs/fpr.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats as sps

ALPHAS = (1e-2, 1e-3, 1e-6)


def interval(k: int, n: int, conf: float = 0.99) -> tuple[float, float]:
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=conf, method="exact")
    return float(ci.low), float(ci.high)


def rates(matches: np.ndarray, bits: int) -> dict[str, dict[str, float]]:
    p = sps.binom.sf(matches - 1, bits, 0.5)
    out = {}
    for a in ALPHAS:
        m_star = next(m for m in range(bits + 1) if sps.binom.sf(m - 1, bits, 0.5) < a)
        k = int((p < a).sum())
        lo, hi = interval(k, len(p))
        size = float(sps.binom.sf(m_star - 1, bits, 0.5))
        out[f"{a:g}"] = {"claims": k, "n": len(p), "fpr": k / len(p), "ci99": [lo, hi], "exact_size": size,
                         "size_inside_ci": lo <= size <= hi}
    return out


def rates_from_p(p: np.ndarray) -> dict[str, dict[str, float]]:
    """Claims at each alpha from p-values of a test without a discrete size (the soft sign test): the
    measured rate with its 99% interval beside the nominal alpha."""
    out = {}
    for a in ALPHAS:
        k = int((p < a).sum())
        lo, hi = interval(k, len(p))
        out[f"{a:g}"] = {"claims": k, "n": len(p), "fpr": k / len(p), "ci99": [lo, hi],
                         "nominal_inside_ci": lo <= a <= hi, "at_or_below_nominal": lo <= a}
    return out


def soft_p(r: torch.Tensor, message: np.ndarray) -> np.ndarray:
    from nnmark.outputs.agnostic import readout_p_values

    return readout_p_values(r, message, "soft")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/nnmark-outputs")
    ap.add_argument("--natural", type=int, default=4000)
    ap.add_argument("--per-host", type=int, default=1000)
    ap.add_argument("--keys", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/outputs/fpr.json")
    ap.add_argument("--extractor", default="shipped", help="'shipped', 'keyed' or an extractor .safetensors file")
    ap.add_argument("--size", type=int, default=32, help="side of every negative (read as 32 px tiles)")
    ap.add_argument("--cropped", type=int, default=0,
                    help="also this many natural negatives after a crop keeping 1/4 (the rest zeroed)")
    ap.add_argument("--test", default="binomial", choices=("binomial", "soft"),
                    help="the verdict's test: matched signs (binomial) or the soft sign test")
    ap.add_argument("--batch", type=int, default=0,
                    help="also claims over batches of this many negatives of one kind (read-outs averaged)")
    ap.add_argument("--save-readouts", default="",
                    help="also save the per-image calibrated read-outs and group names (.npz; shared decoders only)")
    ap.add_argument("--width", type=int, default=16,
                    help="base channels of the cached hosts (mark_hosts.py --width; files named <task>-<kind>-w<W>-*)")
    ap.add_argument("--companion-extractor", default="",
                    help="also a companion key per fixed key read by this extractor (.safetensors): the union "
                         "verdict min(1, 2 min(p, p_companion)) is measured too (hosts marked with companions)")
    ap.add_argument("--refined", type=int, default=0,
                    help="also this many outputs per task of the unmarked host, marked by per-output refinement "
                         "(nnmark.outputs.refine) for the task's owner key of mark_hosts.py (other keys than the "
                         "ones tested)")
    ap.add_argument("--refined-psnr", type=float, default=35.3)
    ap.add_argument("--refined-steps", type=int, default=200)
    ap.add_argument("--refined-strength", type=float, default=1.0)
    ap.add_argument("--refined-companion", default="",
                    help="extractor of the refined outputs' second mark (mark_hosts.py --companion-extractor)")
    ap.add_argument("--refined-companion-weight", type=float, default=1.5)
    ap.add_argument("--refined-crop-weight", type=float, default=0.0,
                    help="crop term of the refinement (refine_outputs crop_weight; the CLI's --robust uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage, readout_p_values
    from nnmark.outputs.data import natural_images, photo_patches
    from nnmark.outputs.extractor import Extractor, bit_stats, load_shipped
    from nnmark.outputs.hosts import host_for_task, load_host

    hosts = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}
    t0 = time.perf_counter()
    groups: dict[str, torch.Tensor] = {}
    half = args.natural // 2
    size = args.size
    groups["natural"] = torch.cat([natural_images(half, size, 11, split="test"),
                                   natural_images(args.natural - half, size, 12, split="attacker")])
    if args.cropped:
        from nnmark.outputs import augment

        gen = torch.Generator().manual_seed(13)
        nat = torch.cat([natural_images(args.cropped // 2, size, 14, split="test"),
                         natural_images(args.cropped - args.cropped // 2, size, 15, split="attacker")])
        groups["natural-crop0.25"] = torch.cat([augment.crop_keep(nat[i:i + 1], 0.25, gen) for i in range(len(nat))])
    cache = Path(args.cache)
    refine_stats: dict[str, dict] = {}

    def refined_outputs(task: str, host: torch.nn.Module, size: int) -> torch.Tensor:
        """``--refined`` outputs of ``host`` on new test / attacker inputs, refined for the owner's key (and
        companion) of mark_hosts.py, rounded to 8 bits."""
        from nnmark.outputs.refine import refine_outputs

        n = args.refined
        tag = (f"n{n}-p{args.refined_psnr:g}-s{args.refined_steps}-st{args.refined_strength:g}"
               f"-{Path(args.refined_companion).stem or 'single'}-w{args.refined_companion_weight:g}"
               + (f"-crop{args.refined_crop_weight:g}" if args.refined_crop_weight else ""))
        stored = cache / f"{task}-refined-{tag}.pt"
        if stored.exists():  # this study's own earlier refinement (a tensor file it wrote)
            saved = torch.load(stored, weights_only=True)
            refine_stats[task] = {k: float(v) for k, v in saved["stats"].items()}
            return saved["images"]
        xr = torch.cat([photo_patches(task, size, "test", n // 2, seed=23)[0],
                        photo_patches(task, size, "attacker", n - n // 2, seed=24)[0]])
        with torch.no_grad():
            clean = torch.cat([host(xr[i:i + 64]).clamp(0, 1) for i in range(0, len(xr), 64)])
        owner = OutputMessage.create(Key.from_seed(f"owner-{task}"), None)
        comps = [OutputMessage.create(Key.from_seed(f"owner-{task}-companion"), None,
                                      extractor=args.refined_companion)] if args.refined_companion else []
        marked, st = refine_outputs(owner, clean, psnr=args.refined_psnr, steps=args.refined_steps,
                                    strength=args.refined_strength, companions=comps,
                                    companion_weight=args.refined_companion_weight, chunk=64,
                                    crop_weight=args.refined_crop_weight,
                                    progress=lambda d, t: print(f"  {task}: refined {d}/{t}", flush=True))
        refine_stats[task] = st
        images = (marked * 255).round() / 255
        torch.save({"images": images, "stats": {k: torch.tensor(float(v)) for k, v in st.items()}}, stored)
        return images

    for task, kind in hosts.items():
        xs = torch.cat([photo_patches(task, size, "test", args.per_host // 2, seed=21)[0],
                        photo_patches(task, size, "attacker", args.per_host - args.per_host // 2, seed=22)[0]])
        for state in ("unmarked", "marked"):
            suffix = "" if args.width == 16 else f"-w{args.width}"
            f = cache / f"{task}-{kind}{suffix}-{state}.pt"
            headed = cache / f"{task}-{kind}{suffix}-{state}.safetensors"  # a host with a mark head
            if headed.exists():
                host = load_host(headed)[0]
            elif f.exists():
                host = host_for_task(task, kind, args.width)
                host.load_state_dict(torch.load(f, weights_only=True))
                host.eval()
            else:
                print(f"missing {f}: run mark_hosts.py first; skipped")
                continue
            with torch.no_grad():
                out = torch.cat([host(xs[i:i + 64]).clamp(0, 1) for i in range(0, len(xs), 64)])
            groups[f"{task}-{state}"] = (out * 255).round() / 255  # as saved to PNG
            if state == "unmarked" and args.refined:
                groups[f"{task}-refined"] = refined_outputs(task, host, size)
    negatives = torch.cat(list(groups.values()))
    print(f"refinement: {json.dumps(refine_stats)}", flush=True)
    print(f"{len(negatives)} negatives ({', '.join(f'{k}: {len(v)}' for k, v in groups.items())}) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    def per_image(ext: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Means over each negative's tiles of the calibrated read-out ``W (d - mu)`` and of the raw logits
        ``d`` (what verify averages), ``(N, k)`` each; chunks of 512 images."""
        from nnmark.outputs.agnostic import prepare_images

        cal, raw = [], []
        with torch.no_grad():
            for i in range(0, len(negatives), 512):
                tiles, counts, _ = prepare_images(negatives[i:i + 512])
                d = torch.cat([ext.decoder(tiles[j:j + 1024]) for j in range(0, len(tiles), 1024)])
                cal += [q.mean(0) for q in ((d - ext.mu) @ ext.whiten.T).split(counts)]
                raw += [q.mean(0) for q in d.split(counts)]
        return torch.stack(cal), torch.stack(raw)

    result = {"negatives": {k: len(v) for k, v in groups.items()}, "n": len(negatives), "keys": {},
              "refinement": refine_stats,
              "extractor": args.extractor, "cache": args.cache, "size": size}
    keyed = args.extractor.startswith("keyed")
    if not keyed:  # one public decoder for every key: its read-outs are computed once
        cal, raw = per_image(load_shipped() if args.extractor == "shipped" else Extractor.load(args.extractor))
        result["raw_decoder_bits"] = bit_stats(raw)
        if args.save_readouts:
            names = np.concatenate([[k] * len(v) for k, v in groups.items()])
            np.savez(args.save_readouts, cal=cal.numpy(), group=names)
    if args.companion_extractor:
        comp_cal, _ = per_image(Extractor.load(args.companion_extractor))
    for i in range(args.keys):
        key = Key.from_seed(f"fpr-fixed-{i}")
        scheme = OutputMessage.create(key, None, extractor=args.extractor)
        if keyed:  # each key has its own decoder
            cal, raw = per_image(scheme.extractor)
        r = cal @ scheme.rotation.T - scheme.centre  # = scheme.image_readouts(negatives), rotation being linear
        if size == 32:  # one tile per negative: image_readouts also subtracts the crop-geometry centres
            r = r - scheme.geometry_offsets(negatives)
        matches = (((r > 0).long().numpy()) == scheme.message[None]).sum(1)
        raw_matches = (((raw > 0).long().numpy()) == scheme.message[None]).sum(1)
        soft = args.test == "soft"
        ps = soft_p(r, scheme.message) if soft else None
        per_group, batches, start = {}, [], 0
        for name, g in groups.items():
            sl = slice(start, start + len(g))
            per_group[name] = (rates_from_p(ps[sl]) if soft else rates(matches[sl], scheme.bits))["0.01"]
            if args.batch:
                nb = len(g) // args.batch
                means = r[sl][:nb * args.batch].view(nb, args.batch, -1).mean(1)
                batches.append(readout_p_values(means, scheme.message, args.test))
            start += len(g)
        result["keys"][key.key_id] = {
            "calibrated": rates_from_p(ps) if soft else rates(matches, scheme.bits),
            "raw_decoder": rates(raw_matches, scheme.bits), "test": args.test,
            **({f"batches_of_{args.batch}": rates_from_p(np.concatenate(batches))} if args.batch else {}),
            "calibrated_bits": bit_stats(r), "raw_bits": bit_stats(raw), "per_group_at_0.01": per_group,
            "max_matches": int(matches.max()), "max_matches_raw": int(raw_matches.max())}
        if args.companion_extractor:
            from nnmark.outputs.agnostic import union_p_value

            comp = OutputMessage.create(Key.from_seed(f"fpr-fixed-{i}-companion"), None,
                                        extractor=args.companion_extractor)
            rc = comp_cal @ comp.rotation.T - comp.centre
            if size == 32:
                rc = rc - comp.geometry_offsets(negatives)

            def p_of(x: torch.Tensor, sch: OutputMessage) -> np.ndarray:
                return readout_p_values(x, sch.message, args.test)

            p_own = ps if soft else sps.binom.sf(matches - 1, scheme.bits, 0.5)
            both = np.concatenate([scheme.message, comp.message])

            def p_joint(x: torch.Tensor, xc: torch.Tensor, both: np.ndarray = both) -> np.ndarray:
                """joint_p_values on read-outs already computed: both marks' bits as one message."""
                return readout_p_values(torch.cat([x, xc], 1), both, args.test)

            p_comp, p_j = p_of(rc, comp), p_joint(r, rc)
            p_union = np.array([union_p_value(pair) for pair in zip(p_own, p_comp, strict=True)])
            p_union3 = np.array([union_p_value(t) for t in zip(p_own, p_comp, p_j, strict=True)])
            entry = {"single": rates_from_p(p_union)}
            entry_joint = {"single": rates_from_p(p_j)}
            entry_union3 = {"single": rates_from_p(p_union3)}
            start = 0
            for e, pv in ((entry, p_union), (entry_joint, p_j), (entry_union3, p_union3)):
                e["per_group_at_0.01"], start = {}, 0
                for name, g in groups.items():
                    e["per_group_at_0.01"][name] = rates_from_p(pv[start:start + len(g)])["0.01"]
                    start += len(g)
            if args.batch:
                ub, jb, u3, start = [], [], [], 0
                for g in groups.values():
                    nb = len(g) // args.batch
                    sl = slice(start, start + nb * args.batch)
                    ma, mb = r[sl].view(nb, args.batch, -1).mean(1), rc[sl].view(nb, args.batch, -1).mean(1)
                    pa, pb, pj = p_of(ma, scheme), p_of(mb, comp), p_joint(ma, mb)
                    ub.append([union_p_value(pair) for pair in zip(pa, pb, strict=True)])
                    jb.append(pj)
                    u3.append([union_p_value(t) for t in zip(pa, pb, pj, strict=True)])
                    start += len(g)
                entry[f"batches_of_{args.batch}"] = rates_from_p(np.concatenate(ub))
                entry_joint[f"batches_of_{args.batch}"] = rates_from_p(np.concatenate(jb))
                entry_union3[f"batches_of_{args.batch}"] = rates_from_p(np.concatenate(u3))
            result["keys"][key.key_id]["union_with_companion"] = entry
            result["keys"][key.key_id]["joint_with_companion"] = entry_joint
            result["keys"][key.key_id]["union_of_own_companion_joint"] = entry_union3
            print("  union:", json.dumps(entry["single"]), flush=True)
            print("  joint:", json.dumps(entry_joint["single"]), flush=True)
        print(key.key_id, json.dumps(result["keys"][key.key_id]["calibrated"]), flush=True)
        print("  raw:", json.dumps(result["keys"][key.key_id]["raw_decoder"]), flush=True)
    pooled = {}
    for a in ALPHAS:
        k = sum(v["calibrated"][f"{a:g}"]["claims"] for v in result["keys"].values())
        n = sum(v["calibrated"][f"{a:g}"]["n"] for v in result["keys"].values())
        pooled[f"{a:g}"] = {"claims": k, "n": n, "fpr": k / n, "ci99": interval(k, n)}
    result["pooled_over_keys"] = pooled
    if args.batch:
        bk = f"batches_of_{args.batch}"
        result[f"pooled_{bk}"] = {a: {"claims": sum(v[bk][a]["claims"] for v in result["keys"].values()),
                                      "n": sum(v[bk][a]["n"] for v in result["keys"].values())}
                                  for a in next(iter(result["keys"].values()))[bk]}
        for v in result[f"pooled_{bk}"].values():
            v["ci99"] = interval(v["claims"], v["n"])
    for name in ("union_with_companion", "joint_with_companion", "union_of_own_companion_joint"):
        entries = [v[name] for v in result["keys"].values() if name in v]
        if not entries:
            continue
        result[f"pooled_{name}"] = {}
        for unit in [u for u in entries[0] if u != "per_group_at_0.01"]:
            result[f"pooled_{name}"][unit] = {}
            for a in entries[0][unit]:
                k, n = sum(e[unit][a]["claims"] for e in entries), sum(e[unit][a]["n"] for e in entries)
                result[f"pooled_{name}"][unit][a] = {"claims": k, "n": n, "fpr": k / n, "ci99": interval(k, n)}
    result["seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
