"""``nnmark outputs``: marks carried by every image an image-to-image host outputs.

    nnmark outputs train --task sr2 --out run/ [--host unet] [--n 2048] [--host-epochs 4] [--mark-epochs 4]
    nnmark outputs train --task denoise --out run/ --head-steps 4000 --head-psnr 37.6 --input-variation 1
    nnmark outputs generate run/marked.safetensors --out images/ [--count 16]
    nnmark outputs generate run/unmarked.safetensors --out images/ --refine-key run/owner.key [--robust]
    nnmark outputs keygen --extractor shipped-luma2 --out run/companion.key
    nnmark outputs generate run/unmarked.safetensors --out images/ --refine-key run/owner.key --robust \
        --companion-key run/companion.key
    nnmark outputs attack images/ attacked/ --jpeg 50 [--noise 0.05] [--crop 0.25] [--resize 0.5]
    nnmark outputs verify --key run/owner.key images/ [--each] [--json] [--test soft]
        [--companion-key run/companion.key]

``train`` trains the host on the bundled photo patches (or starts from ``--host-file``), then fine-tunes a
copy to carry the key's message (scheme ``output-message``); ``run/`` holds the unmarked host, the
marked host, the key (mode 0600, committed, never printed) and per-epoch checkpoints, so re-running the
same command resumes. ``verify`` reads every PNG / JPEG in a folder (at most 64 MB and 16 M pixels each,
checked before decoding) and tests them together; it exits 0 when the images are claimed, 1 when not,
2 on bad input.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from nnmark.errors import NNMarkError

MAX_FILE_BYTES = 64 * 2**20
MAX_PIXELS = 16 * 2**20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image_folder(folder: str | Path, limit: int = 10_000) -> tuple[list, list[str]]:
    """``(images as (C, H, W) float tensors in [0, 1], file names)`` for the PNG / JPEG files of ``folder``
    (sorted by name). Files over 64 MB or 16 M pixels, other formats and unreadable files are refused with
    a message naming the file; palette / CMYK / 16-bit images are converted to RGB (or L for grey)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NNMarkError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise NNMarkError(f"{folder} holds no .png / .jpg / .jpeg file")
    if len(files) > limit:
        raise NNMarkError(f"{folder} holds {len(files)} images; at most {limit} are read at once")
    return [read_image(f) for f in files], [f.name for f in files]


def read_image(f: Path):
    """One PNG / JPEG file as a ``(C, H, W)`` float tensor in [0, 1] (C = 1, 3 or 4), sizes bounded
    before decoding (see :func:`read_image_folder`)."""
    import numpy as np
    import torch
    from PIL import Image

    if f.stat().st_size > MAX_FILE_BYTES:
        raise NNMarkError(f"{f.name}: file larger than {MAX_FILE_BYTES >> 20} MB")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow itself refuses (DecompressionBombError) beyond twice this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below by our own bound
            with Image.open(f) as pic:
                if pic.format not in ("PNG", "JPEG"):
                    raise NNMarkError(f"{f.name}: a {pic.format} file, not PNG or JPEG")
                w, h = pic.size
                if w * h > MAX_PIXELS:
                    raise NNMarkError(f"{f.name}: {w}x{h} pixels, more than {MAX_PIXELS} (resize it first)")
                mode = "L" if pic.mode in ("L", "I;16", "I", "1") else ("RGBA" if "A" in pic.mode else "RGB")
                arr = np.asarray(pic.convert(mode))
    except NNMarkError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise NNMarkError(f"{f.name}: cannot read image ({type(exc).__name__}: {str(exc)[:120]})") from None
    t = torch.from_numpy(arr.copy()).float().div(255.0)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)


def write_images(images, folder: str | Path, names: list[str] | None = None, fmt: str = "png",
                 quality: int = 95) -> list[Path]:
    """Write ``(N, C, H, W)`` (or a list of ``(C, H, W)``) images in [0, 1] as PNG (or JPEG)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, img in enumerate(images):
        arr = (img.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        pic = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        stem = Path(names[i]).stem if names else f"{i:05d}"
        path = folder / f"{stem}.{fmt}"
        pic.save(path, **({"quality": quality} if fmt == "jpg" else {}))
        out.append(path)
    return out


@click.group()
def outputs() -> None:
    """Output-image marks: mark an image-to-image host, verify or attack its output images."""


@outputs.command()
@click.option("--task", type=click.Choice(["sr2", "colourise", "denoise"]), default="sr2", show_default=True)
@click.option("--host", "kind", type=click.Choice(["unet", "resnet"]), default="unet", show_default=True)
@click.option("--host-file", type=click.Path(dir_okay=False), default=None,
              help="start from this trained host (from a previous run) instead of training one")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="run folder")
@click.option("--n", default=1024, show_default=True, help="training patches (32x32)")
@click.option("--host-epochs", default=3, show_default=True)
@click.option("--mark-epochs", default=12, show_default=True)
@click.option("--fidelity", default=0.05, show_default=True, help="weight of the fidelity term")
@click.option("--psnr-target", default=40.0, show_default=True, help="PSNR at which that term equals its weight")
@click.option("--strength", default=0.5, show_default=True, help="distortion strength while marking (0..1)")
@click.option("--extractor", default="shipped", show_default=True,
              help="'shipped', 'keyed' (drawn from the key) or a safetensors extractor")
@click.option("--input-variation", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="vary half of each batch of host inputs while marking (flips, zooms, gains; 0: off)")
@click.option("--psnr-floor", default=0.0, show_default=True, type=click.FloatRange(0.0, 80.0),
              help="adapt the fidelity weight to hold marked-vs-unmarked PSNR at this (dB; 0: fixed weight)")
@click.option("--head-steps", default=0, show_default=True, type=click.IntRange(0, 100_000),
              help="> 0: leave the host as it is and append a mark head trained for this many steps "
                   "(nnmark.outputs.mark_head) instead of fine-tuning it")
@click.option("--head-psnr", default=35.3, show_default=True, type=click.FloatRange(20.0, 60.0),
              help="PSNR of every marked output against the unmarked one, with a mark head (dB)")
@click.option("--head-width", default=32, show_default=True, type=click.IntRange(4, 256),
              help="channels of the mark head (64 reached 98% bit accuracy on sr2 test photos, 32 did not)")
@click.option("--seed", default=0, show_default=True)
def train(task: str, kind: str, host_file: str | None, out_dir: str, n: int, host_epochs: int, mark_epochs: int,
          fidelity: float, psnr_target: float, strength: float, extractor: str, input_variation: float,
          psnr_floor: float, head_steps: int, head_psnr: float, head_width: int, seed: int) -> None:
    """Train (or load) a host, then fine-tune a marked copy (or append a mark head to it: --head-steps);
    resumes an interrupted run."""
    import torch

    from nnmark.keyfile import load_key_file
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage
    from nnmark.outputs.data import photo_patches
    from nnmark.outputs.hosts import host_for_task, load_host, save_host, train_host

    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    x, y = photo_patches(task, 32, "train", n, seed)
    unmarked_path = run / "unmarked.safetensors"
    if unmarked_path.exists():
        host, _ = load_host(unmarked_path)
        click.echo(f"host: resumed from {unmarked_path}")
    elif host_file:
        host, _ = load_host(host_file)
        save_host(unmarked_path, host, task)
    else:
        host = host_for_task(task, kind, seed=seed)
        stats = train_host(host, task, host_epochs, seed, data=(x, y),
                           progress=lambda e, l: click.echo(f"host epoch {e + 1}/{host_epochs}: loss {l:.4f}"))
        save_host(unmarked_path, host, task, train_seconds=stats["seconds"], test_psnr=stats["test_psnr"])
        click.echo(f"host: test PSNR {stats['test_psnr']:.2f} dB in {stats['seconds']:.0f} s")
    key_path = run / "owner.key"
    key = load_key_file(key_path).key if key_path.exists() else Key.generate()
    scheme = OutputMessage.create(key, host, extractor=extractor, epochs=mark_epochs, fidelity=fidelity,
                                  psnr_target=psnr_target, strength=strength, input_variation=input_variation,
                                  psnr_floor=psnr_floor)
    marked = host_for_task(task, kind) if host_file is None else load_host(unmarked_path)[0]
    marked.load_state_dict(host.state_dict())
    if not key_path.exists():  # the key is fixed (committed) before the marked host exists
        scheme.save(key_path)
    if head_steps and (run / "marked.safetensors").exists():
        click.echo(f"marked host: {run / 'marked.safetensors'} exists (delete it to train the head again)")
        return
    if head_steps:
        from nnmark.outputs.mark_head import mark_with_head

        head_ckpt = run / "head.ckpt.safetensors"
        if head_ckpt.exists():
            click.echo(f"mark head: resuming from {head_ckpt}")
        marked, emb = mark_with_head(scheme, host, x, psnr=head_psnr, width=head_width, steps=head_steps,
                                     variation=input_variation, seed=seed, checkpoint=head_ckpt,
                                     progress=lambda s, st: click.echo(
                                         f"mark head step {s}/{head_steps}: loss {st['loss']:.4f}"))
    else:
        emb = scheme.embed_host(marked, x, seed=seed, checkpoint=run / "marking.ckpt.safetensors",
                                progress=lambda e, s: click.echo(
                                    f"marking epoch {e}/{mark_epochs}: loss {s['loss']:.4f}"))
    with torch.no_grad():
        xt, _ = photo_patches(task, 32, "test", 64, seed)
        psnr = float(10 * torch.log10(1 / ((marked(xt).clamp(0, 1) - host(xt).clamp(0, 1)) ** 2).mean()))
    save_host(run / "marked.safetensors", marked, task, mark_seconds=emb["seconds"])
    click.echo(f"marked host: {run / 'marked.safetensors'} (bit accuracy {emb['bit_acc']:.3f} on training "
               f"inputs, PSNR marked vs unmarked {psnr:.1f} dB on test photos); key: {key_path}")


def output_message_keys(paths: list[str]) -> list:
    """The ``output-message`` schemes of these key files, in order; a key of another scheme, or one key given
    twice, is refused with a message naming the file."""
    from nnmark.schemes.base import load_scheme

    schemes = []
    for path in paths:
        scheme = load_scheme(path)
        if scheme.name != "output-message":
            raise NNMarkError(f"{path}: a key for scheme {scheme.name!r}; marks of several keys are read from "
                              "output-message keys")
        if any(scheme.key.key_id == other.key.key_id for other in schemes):
            raise NNMarkError(f"{path}: the same key as an earlier key file; each mark needs its own key")
        schemes.append(scheme)
    return schemes


@outputs.command()
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="key file to write")
@click.option("--extractor", default="shipped", show_default=True,
              help="'shipped', 'shipped-luma2' (a companion decoder that survives JPEG and resizing), 'keyed' or "
                   "a safetensors extractor")
def keygen(out_path: str, extractor: str) -> None:
    """Write a fresh output-message key (mode 0600; never overwrites a file), e.g. a companion key for
    `generate --companion-key`."""
    from nnmark.keys import Key
    from nnmark.outputs.agnostic import OutputMessage

    if Path(out_path).exists():
        raise NNMarkError(f"{out_path} exists; a key file is never overwritten")
    scheme = OutputMessage.create(Key.generate(), None, extractor=extractor)
    scheme.save(out_path)
    click.echo(f"wrote a {scheme.bits}-bit output-message key ({extractor} decoder) to {out_path}")


@outputs.command()
@click.argument("host_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--count", default=16, show_default=True, help="test-photo patches to run through the host")
@click.option("--size", default=32, show_default=True, help="patch side (pixels)")
@click.option("--seed", default=0, show_default=True)
@click.option("--refine-key", "refine_key", default=None, type=click.Path(dir_okay=False, exists=True),
              help="an output-message key file: refine every output for this key before it is written "
                   "(nnmark.outputs.refine; the host may be unmarked)")
@click.option("--refine-steps", default=200, show_default=True, type=click.IntRange(1, 5000),
              help="optimisation steps per output with --refine-key")
@click.option("--refine-psnr", default=35.3, show_default=True, type=click.FloatRange(20.0, 60.0),
              help="PSNR of every refined output against the host's own output (dB)")
@click.option("--robust", is_flag=True,
              help="with --refine-key: refine through random crops, noise, JPEG and resizing (strength 1), "
                   "and read every 32 px output cropped to a quarter each step (crop_weight 1)")
@click.option("--companion-key", "companion_keys", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="with --refine-key: also refine for this key's mark (e.g. one made by `keygen --extractor "
                   "shipped-luma2`, which survives JPEG and resizing); verify with the same --companion-key")
@click.option("--companion-weight", default=1.5, show_default=True, type=click.FloatRange(0.0, 10.0),
              help="weight of each companion mark's term against the main mark's")
def generate(host_file: str, out_dir: str, count: int, size: int, seed: int, refine_key: str | None,
             refine_steps: int, refine_psnr: float, robust: bool, companion_keys: tuple[str, ...],
             companion_weight: float) -> None:
    """Write a host's outputs on test-photo patches as PNG files (refined for a key with --refine-key)."""
    import torch

    from nnmark.outputs.data import photo_patches
    from nnmark.outputs.hosts import load_host

    host, info = load_host(host_file)
    x, _ = photo_patches(info["task"], size, "test", count, seed)
    with torch.no_grad():
        out = host(x).clamp(0, 1)
    if refine_key is not None:
        from nnmark.outputs.refine import refine_outputs

        scheme, *companions = output_message_keys([refine_key, *companion_keys])
        if out.shape[1] != 3 or min(out.shape[-2:]) < 32:
            raise NNMarkError(f"refinement marks RGB outputs of at least 32 px; this host gives {tuple(out.shape[1:])}")
        out, stats = refine_outputs(scheme, out, psnr=refine_psnr, steps=refine_steps, seed=seed,
                                    strength=1.0 if robust else 0.0, crop_weight=1.0 if robust else 0.0, chunk=64,
                                    companions=companions, companion_weight=companion_weight,
                                    progress=lambda d, t: click.echo(f"refined {d}/{t} outputs"))
        click.echo(f"refined {len(out)} outputs at {refine_psnr:g} dB in {stats['seconds']:.1f} s "
                   f"(bit accuracy {stats['bit_acc']:.3f} before writing)")
    elif companion_keys:
        raise NNMarkError("--companion-key is read with --refine-key")
    paths = write_images(out, out_dir)
    click.echo(f"wrote {len(paths)} images to {out_dir}")


@outputs.command()
@click.argument("in_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--crop", type=float, default=None, help="keep a random square with this share of the area")
@click.option("--noise", type=float, default=None, help="Gaussian noise of this std (images in [0, 1])")
@click.option("--jpeg", type=int, default=None, help="JPEG quality (Pillow); output files are .jpg")
@click.option("--resize", type=float, default=None, help="scale down by this factor and back up")
@click.option("--seed", default=0, show_default=True)
def attack(in_dir: str, out_dir: str, crop: float | None, noise: float | None, jpeg: int | None,
           resize: float | None, seed: int) -> None:
    """Distort every image of a folder (applied in the order crop, noise, resize, JPEG)."""
    import torch

    from nnmark.outputs import augment

    if crop is None and noise is None and jpeg is None and resize is None:
        raise NNMarkError("choose at least one of --crop, --noise, --jpeg, --resize")
    if crop is not None and not 0 < crop <= 1 or resize is not None and not 0 < resize <= 1 \
            or noise is not None and noise < 0 or jpeg is not None and not 1 <= jpeg <= 100:
        raise NNMarkError("--crop and --resize need (0, 1], --noise >= 0, --jpeg 1..100")
    images, names = read_image_folder(in_dir)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for img in images:
        x = img[None]
        if crop is not None:
            x = augment.crop_keep(x, crop, gen)
        if noise is not None:
            x = augment.gaussian_noise(x, noise, gen)
        if resize is not None:
            x = augment.resize(x, resize)
        if jpeg is not None:
            x = augment.jpeg_real(x, jpeg)
        out.append(x[0])
    paths = write_images(out, out_dir, names, fmt="jpg" if jpeg is not None else "png", quality=jpeg or 95)
    click.echo(f"wrote {len(paths)} attacked images to {out_dir}")


@outputs.command()
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="the owner's key file")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--alpha", default=1e-6, show_default=True, help="significance level")
@click.option("--each", is_flag=True, help="also test every image alone")
@click.option("--json", "as_json", is_flag=True, help="print the verdict(s) as JSON")
@click.option("--size", "resize_to", default=None, metavar="HxW",
              help="output-message: resize every image to the host's output size HxW before it is read tile by tile "
                   "(undoes a rescale)")
@click.option("--phases", default=1, show_default=True, type=click.IntRange(1, 8),
              help="output-message: also read the tile grid shifted by 0..N-1 px (N*N reads, p times N*N)")
@click.option("--test", "test", type=click.Choice(["binomial", "soft"]), default="binomial", show_default=True,
              help="output-message: count matched bits (binomial) or weigh each bit by its read-out's margin (soft "
                   "sign test; same null)")
@click.option("--companion-key", "companion_keys", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="output-message: also read this key's mark; the verdict is the union of the marks "
                   "(min(1, marks x smallest p); nnmark.outputs.agnostic.union_verdict)")
def verify(key_path: str, folder: str, alpha: float, each: bool, as_json: bool, resize_to: str | None,
           phases: int, test: str, companion_keys: tuple[str, ...]) -> None:
    """Test whether the images of FOLDER were made by the host marked with this key (all together). Large
    images are read as 32 x 32 tiles (output-message: only the tiles inside what a zeroing crop kept)."""
    from nnmark.schemes.base import load_scheme

    scheme = load_scheme(key_path)  # any output-image scheme, by the name in its key file
    if scheme.name not in ("output-message", "output-wu"):
        raise NNMarkError(f"{key_path}: a key for scheme {scheme.name!r}, not an output-image scheme "
                          "(output-message, output-wu)")
    options = {}
    if resize_to is not None:
        if scheme.name != "output-message":
            raise NNMarkError("--size is read by output-message keys only")
        try:
            h, w = (int(v) for v in resize_to.lower().split("x"))
        except ValueError:
            raise NNMarkError(f"--size {resize_to!r}: give HxW, e.g. 128x128") from None
        if not (8 <= h <= 4096 and 8 <= w <= 4096):
            raise NNMarkError("--size: each side 8..4096 pixels")
        options["size"] = (h, w)
    if phases > 1:
        if scheme.name != "output-message":
            raise NNMarkError("--phases is read by output-message keys only")
        options["phases"] = phases
    if test != "binomial":
        if scheme.name != "output-message":
            raise NNMarkError("--test is read by output-message keys only")
        options["test"] = test
    check = scheme.verify
    if companion_keys:
        from nnmark.outputs.agnostic import union_verdict

        if scheme.name != "output-message":
            raise NNMarkError("--companion-key is read with output-message keys only")
        marks = output_message_keys([key_path, *companion_keys])

        def check(target, **kw):
            return union_verdict(marks, target, **kw)
    images, names = read_image_folder(folder)
    verdict = check(images, alpha=alpha, **options)
    singles = [(name, check([img], alpha=alpha, **options))
               for name, img in zip(names, images, strict=True)] if each else []
    if as_json:
        click.echo(json.dumps({"batch": verdict.to_dict(), "files": names,
                               "each": {n: v.to_dict() for n, v in singles}}, indent=1))
    else:
        for note in verdict.details.get("conversions", []):
            click.echo(f"note: {note}")
        for name, v in singles:
            click.echo(f"{name}: {'claimed' if v.owned else 'not claimed'} ({v.statistic:g}/{v.n} bits, "
                       f"p = {v.p_value:.3g})")
        click.echo(f"{len(images)} images: {verdict.summary()}")
        click.echo(f"null: {verdict.null_hypothesis}")
    sys.exit(0 if verdict.owned else 1)
