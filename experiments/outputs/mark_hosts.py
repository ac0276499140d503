"""Mark image-to-image hosts with ``output-message`` and measure fidelity and robustness.

    .venv/bin/python experiments/outputs/mark_hosts.py            # all three tasks
    .venv/bin/python experiments/outputs/mark_hosts.py --tasks sr2 --n 1024 --host-epochs 2
    .venv/bin/python experiments/outputs/mark_hosts.py --extractor keyed --strength 1.0 \
        --cache /tmp/nnmark-outputs-keyed --out experiments/results/outputs/marks_keyed.json

For each task (sr2 on a U-Net, colourise on a U-Net, denoise on a ResNet): train the host on train-photo
patches, fine-tune a copy to carry the owner's message, then on 256 test-photo patches (photos never
trained on) measure

- fidelity: PSNR / SSIM of marked vs unmarked outputs (torchmetrics), and the task's PSNR against the
  ground truth for both hosts;
- single outputs: bit accuracy, median p-value, share with p < 1e-6 (and < 1e-3);
- after JPEG quality 50 (Pillow), noise sigma 0.05, a crop keeping 1/4 of the area, a x0.5 resize:
  single-output bit accuracy and p-values, and the p-value of each batch of 16 outputs (16 batches).

Hosts (unmarked and marked) are saved under ``--cache`` for the false-positive study (fpr_study.py).
Writes experiments/results/outputs/marks.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

HOSTS = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}


def attacks(seed: int):
    from nnmark.outputs import augment

    gen = torch.Generator().manual_seed(seed)
    return {
        "none": lambda x: x,
        "jpeg50": lambda x: augment.jpeg_real(x, 50),
        "noise0.05": lambda x: augment.gaussian_noise(x, 0.05, gen),
        "crop0.25": lambda x: torch.cat([augment.crop_keep(x[i:i + 1], 0.25, gen) for i in range(len(x))]),
        "resize0.5": lambda x: augment.resize(x, 0.5),
        # kept at half size: the verifier resizes back to the host's output size (size=...)
        "half": lambda x: torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True,
                                                          align_corners=False).clamp(0, 1),
    }


def psnr_each(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=list(HOSTS))
    ap.add_argument("--n", type=int, default=1024, help="training patches")
    ap.add_argument("--host-epochs", type=int, default=3)
    ap.add_argument("--mark-epochs", type=int, default=12)
    ap.add_argument("--fidelity", type=float, default=0.05)
    ap.add_argument("--psnr-target", type=float, default=40.0)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--cache", default="/tmp/nnmark-outputs")
    ap.add_argument("--out", default="experiments/results/outputs/marks.json")
    ap.add_argument("--tag", default="")
    ap.add_argument("--size", type=int, default=32, help="side of the training patches the host is marked on")
    ap.add_argument("--eval-size", type=int, default=32, help="side of the test outputs (read as 32 px tiles)")
    ap.add_argument("--eval-n", type=int, default=256, help="test outputs")
    ap.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
    ap.add_argument("--windows", type=int, default=4, help="random 32 px windows per output (size >= 64)")
    ap.add_argument("--input-variation", type=float, default=0.0,
                    help="strength of the random variation of the host's inputs while marking (0: off)")
    ap.add_argument("--width", type=int, default=16, help="host base channels")
    ap.add_argument("--extra-grey", type=int, default=0,
                    help="add this many tinted grey-photo patches (data.tinted_grey_patches) to the marking set")
    ap.add_argument("--extra-leaves", type=int, default=0,
                    help="add this many synthetic dead-leaves images (data.dead_leaves_patches) to the marking set")
    ap.add_argument("--psnr-floor", type=float, default=0.0,
                    help="adapt the fidelity weight to hold marked-vs-unmarked PSNR at this (dB; 0: fixed weight)")
    ap.add_argument("--companion-extractor", default=None,
                    help="also mark for a second key read by this extractor (.safetensors); verdicts are then "
                         "reported for each mark and for both by a union bound")
    ap.add_argument("--companion-strength", type=float, default=1.0,
                    help="distortion strength of the companion mark's term")
    ap.add_argument("--companion-weight", type=float, default=1.0, help="weight of the companion mark's term")
    ap.add_argument("--host-cache", default=None, help="folder holding the unmarked hosts (default: --cache)")
    ap.add_argument("--start-marked", action="store_true",
                    help="start fine-tuning from the marked host in --host-cache (e.g. one marked on 32 px patches)")
    ap.add_argument("--eval-only", action="store_true",
                    help="no fine-tuning: evaluate the marked host in --host-cache as it is")
    ap.add_argument("--head-steps", type=int, default=0,
                    help="> 0: leave the host as it is and train a mark head (nnmark.outputs.mark_head) for this "
                         "many steps on the host's outputs and train photo patches instead of fine-tuning")
    ap.add_argument("--head-psnr", type=float, default=35.3, help="the mark head's PSNR budget (dB)")
    ap.add_argument("--head-width", type=int, default=32, help="the mark head's channels")
    ap.add_argument("--head-extremes", type=float, default=0.0,
                    help="add this share of the head's pool again as darkened / brightened copies")
    ap.add_argument("--refine-steps", type=int, default=0,
                    help="> 0: refine every test output for this many steps (nnmark.outputs.refine), starting "
                         "from the head's / fine-tuned host's marked output, or from nothing with --refine-only")
    ap.add_argument("--refine-only", action="store_true",
                    help="leave the host unmarked (no fine-tuning, no head) and mark its outputs by refinement")
    ap.add_argument("--refine-psnr", type=float, default=None, help="refinement budget (dB; default --head-psnr)")
    ap.add_argument("--refine-crop-weight", type=float, default=0.0,
                    help="refinement also reads every output cropped to 1/4 at its own place, each step, at this "
                         "weight (refine_outputs crop_weight)")
    ap.add_argument("--refine-crop-grid", type=int, default=1,
                    help="refinement crops on multiples of this many pixels (refine_outputs crop_grid)")
    ap.add_argument("--refine-centre-grid", type=int, default=4,
                    help="refinement looks crop read-out centres up on this grid (refine_outputs centre_grid; "
                         "runs before round 9 used exact centres, i.e. 1)")
    ap.add_argument("--refine-strength", type=float, default=0.0,
                    help="distortion strength while refining (augment.random_augment; 0: undistorted)")
    ap.add_argument("--refine-lr", type=float, default=0.05)
    ap.add_argument("--refine-threats", action="store_true",
                    help="refine through the named threats (refine.NAMED_THREATS: identity, JPEG 50, noise 0.05, "
                         "crop 1/4, x0.5 resize) instead of random distortions at --refine-strength")
    ap.add_argument("--owner", default="owner-{task}",
                    help="seed of the owner's key ({task} is replaced by the task; its companion key adds -companion)")
    ap.add_argument("--extractor", default="shipped",
                    help="'shipped', 'keyed' (low-pass decoder drawn from the key) or an extractor .safetensors file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage, joint_p_values, union_p_value
    from nnmark.outputs.data import dead_leaves_patches, degrade, photo_patches, tinted_grey_patches
    from nnmark.outputs.hosts import host_for_task, train_host

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "tasks": {}}
    for task in args.tasks:
        kind = HOSTS[task]
        host = host_for_task(task, kind, args.width, seed=0)
        suffix = "" if args.width == 16 else f"-w{args.width}"
        path = Path(args.host_cache or cache) / f"{task}-{kind}{suffix}-unmarked.pt"
        x, y = photo_patches(task, args.size, "train", args.n, seed=0)
        if args.extra_grey:  # more kinds of content to mark on (no targets needed: marking compares hosts)
            x = torch.cat([x, degrade(task, tinted_grey_patches(args.extra_grey, args.size, 17), 6)])
        if args.extra_leaves:
            x = torch.cat([x, degrade(task, dead_leaves_patches(args.extra_leaves, args.size, 23), 7)])
        if path.exists():
            host.load_state_dict(torch.load(path, weights_only=True))
            host_stats = json.loads(path.with_suffix(".json").read_text())
        else:
            host_stats = train_host(host, task, args.host_epochs, seed=0,
                                    data=photo_patches(task, 32, "train", args.n, seed=0))
            torch.save(host.state_dict(), path)
            path.with_suffix(".json").write_text(json.dumps(host_stats))
        print(f"{task}/{kind}: host trained in {host_stats['seconds']:.0f} s, test PSNR {host_stats['test_psnr']:.2f}",
              flush=True)
        owner = args.owner.replace("{task}", task)
        key = Key.from_seed(owner)
        scheme = OutputMessage.create(key, host, epochs=args.mark_epochs, fidelity=args.fidelity,
                                      psnr_target=args.psnr_target, strength=args.strength,
                                      extractor=args.extractor, windows=args.windows, lr=args.lr,
                                      input_variation=args.input_variation, psnr_floor=args.psnr_floor)
        companions = []
        if args.companion_extractor:
            companions.append(OutputMessage.create(Key.from_seed(f"{owner}-companion"), host,
                                                   extractor=args.companion_extractor,
                                                   strength=args.companion_strength, windows=args.windows))
        marked = host_for_task(task, kind, args.width)
        marked.load_state_dict(host.state_dict())
        if args.start_marked or args.eval_only:
            start = Path(args.host_cache or cache) / f"{task}-{kind}{suffix}-marked.pt"
            marked.load_state_dict(torch.load(start, weights_only=True))
        if args.head_steps:
            from nnmark.outputs.mark_head import mark_with_head

            marked, emb = mark_with_head(scheme, host, x, psnr=args.head_psnr, width=args.head_width,
                                         steps=args.head_steps, variation=args.input_variation,
                                         progress=lambda s, st: print(f"  head step {s}: {st}", flush=True),
                                         companions=companions, companion_weight=args.companion_weight,
                                         extremes=args.head_extremes,
                                         checkpoint=cache / f"{task}-{kind}{suffix}-head.ckpt.safetensors")
            from nnmark.outputs.hosts import save_host

            save_host(cache / f"{task}-{kind}{suffix}-marked.safetensors", marked, task)  # host and head
        elif args.eval_only or args.refine_only:
            emb = {"seconds": 0.0, "epochs": 0, "losses": [], "bit_acc": None}
        else:
            emb = scheme.embed_host(marked, x, progress=lambda e, s: print(f"  mark epoch {e}: {s}", flush=True),
                                    reference=host, companions=companions,
                                    companion_weight=args.companion_weight)
        marked.eval()
        if not args.head_steps and not args.refine_only:
            torch.save(marked.state_dict(), cache / f"{task}-{kind}{suffix}-marked.pt")
        if args.host_cache:  # the false-positive study reads both hosts from one folder
            torch.save(host.state_dict(), cache / f"{task}-{kind}{suffix}-unmarked.pt")
            (cache / f"{task}-{kind}{suffix}-unmarked.json").write_text(json.dumps(host_stats))
        xt, yt = photo_patches(task, args.eval_size, "test", args.eval_n, seed=1)
        with torch.no_grad():
            clean = host(xt).clamp(0, 1)
            out = marked(xt).clamp(0, 1)
        if args.refine_steps:
            from nnmark.outputs.refine import NAMED_THREATS, refine_outputs

            psnr = args.head_psnr if args.refine_psnr is None else args.refine_psnr
            out, ref = refine_outputs(scheme, clean, None if args.refine_only else out, psnr=psnr,
                                      steps=args.refine_steps, lr=args.refine_lr, strength=args.refine_strength,
                                      companions=companions, companion_weight=args.companion_weight, chunk=64,
                                      distortions=NAMED_THREATS if args.refine_threats else None,
                                      crop_weight=args.refine_crop_weight, crop_grid=args.refine_crop_grid,
                                      centre_grid=args.refine_centre_grid,
                                      progress=lambda d, t: print(f"  refined {d}/{t}", flush=True))
            emb["refine"] = ref
            print(f"  refinement: {ref}", flush=True)
        fid = {
            "psnr_marked_vs_unmarked": float(psnr_each(out, clean).mean()),
            "psnr_marked_vs_unmarked_min": float(psnr_each(out, clean).min()),
            "ssim_marked_vs_unmarked": float(structural_similarity_index_measure(out, clean, data_range=1.0)),
            "task_psnr_unmarked": float(psnr_each(clean, yt).mean()),
            "task_psnr_marked": float(psnr_each(out, yt).mean()),
        }
        fid["task_psnr_drop"] = fid["task_psnr_unmarked"] - fid["task_psnr_marked"]
        # a mark uncorrelated with the host's error adds its MSE to the host's: a drop <= 0.5 dB needs
        # MSE_mark <= (10**0.05 - 1) MSE_host, i.e. a mark PSNR >= host PSNR + 9.14 dB
        fid["mark_psnr_needed_for_0.5dB_drop"] = fid["task_psnr_unmarked"] - 10 * np.log10(10 ** 0.05 - 1)
        rob = {}
        for name, attack in attacks(5).items():
            t0 = time.perf_counter()
            img = attack(out)
            size = tuple(out.shape[-2:]) if name == "half" else None
            r, _ = scheme.image_readouts(img, size)
            bits = (r > 0).long().numpy()
            acc = float((bits == scheme.message[None]).mean())
            single = scheme.p_values(img, 1, size)
            batch = scheme.p_values(img, 16, size)
            rob[name] = {"bit_acc": acc, "single_median_p": float(np.median(single)),
                         "single_frac_p_lt_1e-6": float((single < 1e-6).mean()),
                         "single_frac_p_lt_1e-3": float((single < 1e-3).mean()),
                         "batch16_max_p": float(batch.max()), "batch16_frac_p_lt_1e-6": float((batch < 1e-6).mean()),
                         "batch16_frac_p_lt_1e-3": float((batch < 1e-3).mean()),
                         "seconds_per_image": (time.perf_counter() - t0) / len(img)}
            if companions:
                for test in ("binomial", "soft"):
                    own_s, own_b = scheme.p_values(img, 1, size, test), scheme.p_values(img, 16, size, test)
                    com_s = companions[0].p_values(img, 1, size, test)
                    com_b = companions[0].p_values(img, 16, size, test)
                    uni_s = np.array([union_p_value(pair) for pair in zip(own_s, com_s, strict=True)])
                    uni_b = np.array([union_p_value(pair) for pair in zip(own_b, com_b, strict=True)])
                    # both marks' bits read as one message (joint_p_values), and the union of all three
                    joi_s = joint_p_values([scheme, companions[0]], img, 1, size, test)
                    joi_b = joint_p_values([scheme, companions[0]], img, 16, size, test)
                    u3_s = np.array([union_p_value(t) for t in zip(own_s, com_s, joi_s, strict=True)])
                    u3_b = np.array([union_p_value(t) for t in zip(own_b, com_b, joi_b, strict=True)])
                    oj_s = np.array([union_p_value(t) for t in zip(own_s, joi_s, strict=True)])
                    oj_b = np.array([union_p_value(t) for t in zip(own_b, joi_b, strict=True)])
                    cr, _ = companions[0].image_readouts(img, size)
                    rob[name][test] = {
                        "companion_bit_acc": float(((cr > 0).long().numpy() == companions[0].message[None]).mean()),
                        **{f"{who}_{unit}_frac_p_lt_1e-6": float((v < 1e-6).mean())
                           for who, unit, v in (("own", "single", own_s), ("own", "batch16", own_b),
                                                ("companion", "single", com_s), ("companion", "batch16", com_b),
                                                ("union", "single", uni_s), ("union", "batch16", uni_b),
                                                ("joint", "single", joi_s), ("joint", "batch16", joi_b),
                                                ("union3", "single", u3_s), ("union3", "batch16", u3_b),
                                                ("own_or_joint", "single", oj_s), ("own_or_joint", "batch16", oj_b))}}
            print(f"  {name}: {rob[name]}", flush=True)
        results["tasks"][task] = {"host": kind, "host_train_seconds": host_stats["seconds"],
                                  "mark_seconds": emb["seconds"],
                                  "cost_multiple": emb["seconds"] / host_stats["seconds"],
                                  "fidelity": fid, "robustness": rob, "embed": emb}
        print(f"  fidelity: {fid}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
