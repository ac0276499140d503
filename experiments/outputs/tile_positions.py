"""Does a marked host's mark repeat over larger outputs? Bit accuracy per 32 px tile position, and per image.

    .venv/bin/python experiments/outputs/tile_positions.py /tmp/nnmark-outputs shipped 128
    .venv/bin/python experiments/outputs/tile_positions.py /tmp/nnmark-outputs-luma2b \\
        experiments/results/outputs/extractor48_luma2.safetensors 128

Arguments: a mark_hosts.py cache (unmarked and marked hosts), the extractor, the output side. For each task, 32
test-photo outputs (photos never trained on): PSNR marked vs unmarked, bit accuracy per tile position (rows of
the tile grid), and per image (tiles averaged) clean, after JPEG 50, noise 0.05 and a x0.5 resize.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

HOSTS = {"sr2": "unet", "colourise": "unet", "denoise": "resnet"}


def main() -> None:
    torch.set_num_threads(1)
    from nnmark.keys import Key
    from nnmark.outputs import augment
    from nnmark.outputs.agnostic import OutputMessage, prepare_images
    from nnmark.outputs.data import photo_patches
    from nnmark.outputs.hosts import host_for_task

    cache, ext = sys.argv[1], sys.argv[2]
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    for task, kind in HOSTS.items():
        scheme = OutputMessage.create(Key.from_seed(f"owner-{task}"), None, extractor=ext)
        marked, unmarked = host_for_task(task, kind), host_for_task(task, kind)
        marked.load_state_dict(torch.load(f"{cache}/{task}-{kind}-marked.pt", weights_only=True))
        unmarked.load_state_dict(torch.load(f"{cache}/{task}-{kind}-unmarked.pt", weights_only=True))
        marked.eval()
        unmarked.eval()
        xt, _ = photo_patches(task, size, "test", 32, seed=1)
        with torch.no_grad():
            out = (marked(xt).clamp(0, 1) * 255).round() / 255
            clean = unmarked(xt).clamp(0, 1)
        psnr = float((-10 * torch.log10(((out - clean) ** 2).flatten(1).mean(1))).mean())
        tiles, _, _ = prepare_images(out)
        with torch.no_grad():
            hits = (scheme.readout(tiles) > 0).long().numpy() == scheme.message[None]
        pos = hits.mean(1).reshape(len(out), -1).mean(0).reshape(size // 32, size // 32)
        print(task, f"psnr {psnr:.2f} tile acc {hits.mean():.3f} by position", np.round(pos, 2).tolist())
        gen = torch.Generator().manual_seed(5)
        attacked = {"none": out, "jpeg50": augment.jpeg_real(out, 50),
                    "noise": augment.gaussian_noise(out, 0.05, gen), "resize": augment.resize(out, 0.5)}
        for name, img in attacked.items():
            r, _ = scheme.image_readouts(img)
            acc = float(((r > 0).long().numpy() == scheme.message[None]).mean())
            p = scheme.p_values(img, 1)
            print(f"   {name}: image bit acc {acc:.3f}, p<1e-6 {(p < 1e-6).mean():.2f}, median p {np.median(p):.1e}")


if __name__ == "__main__":
    main()
