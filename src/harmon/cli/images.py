"""``harmon generate``, ``harmon edit`` and ``harmon batch``: images from text, edits of images, and many
prompts into a folder. Each PNG carries its prompt, seed and resolved settings (:mod:`harmon.outputs`)."""
from __future__ import annotations

import argparse
import re
import secrets
from pathlib import Path

import torch

from ..batch import BatchOptions, run_batch
from ..checkpoint import read_config
from ..errors import InputError
from ..files import check_folder_path, write_atomically
from ..outputs import BENCHMARKS, edit_details, grid_metadata, image_metadata, make_grid, png_bytes
from ..pipelines import (EditPipeline, KnownRegion, TextToImagePipeline, inpaint_region, outpaint_region,
                         variation_region)
from ..quantize import check_quantization
from ..validation import check_prompt
from .common import (add_command, add_compile_argument, add_generation_arguments, add_model_arguments,
                     generation_settings, image_sides, load, model_folder, png_path)


def add_parsers(subparsers) -> None:
    """Add ``generate``, ``edit`` and ``batch``."""
    add_generate(subparsers)
    add_edit(subparsers)
    add_batch(subparsers)


# -- generate ---------------------------------------------------------------------------------------
def add_generate(subparsers) -> None:
    """``harmon generate PROMPT``."""
    p = add_command(subparsers, "generate", cmd_generate, "draw images from a text prompt (PNG files)",
                    "Generate images from PROMPT. Image k gets seed S+k; each PNG stores the prompt, seed and "
                    "settings in its text chunks.")
    p.add_argument("prompt", metavar="PROMPT", help="what to draw")
    add_model_arguments(p)
    o = p.add_argument_group("output").add_mutually_exclusive_group()
    o.add_argument("--out", metavar="FILE.png", help="output file; with several images FILE_0.png, FILE_1.png, ...")
    o.add_argument("--out-dir", metavar="DIR", default=".", help="folder for PROMPT_SEED.png files")
    p.add_argument("--num-images", type=int, default=1, metavar="N", help="how many images")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the first image (default: random)")
    add_generation_arguments(p)
    p.add_argument("--grid", action="store_true", help="also write one grid image of all outputs")
    add_compile_argument(p)
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="images generated at once")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_")[:limit].rstrip("_")
    return slug or "image"


def _output_paths(args: argparse.Namespace, seeds: list[int]) -> tuple[list[Path], Path | None]:
    """The PNG of each seed and the grid's (None without ``--grid``); their folders can be made."""
    if args.out is not None:
        out = png_path(args.out, "--out")
        paths = [out] if len(seeds) == 1 else [out.parent / f"{out.stem}_{k}{out.suffix}" for k in range(len(seeds))]
        return paths, out.parent / f"{out.stem}_grid{out.suffix}" if args.grid else None
    folder = check_folder_path(args.out_dir, "--out-dir")
    stem = _slug(args.prompt)
    return [folder / f"{stem}_{s}.png" for s in seeds], folder / f"{stem}_{seeds[0]}_grid.png" if args.grid else None


def _write_png(path: Path, image, text: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # now that there is an image to write
    write_atomically(path, png_bytes(image, text))
    print(path, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """Text to image(s): one PNG per image, seeds S, S+1, ..., settings in the PNG text chunks."""
    prompt = check_prompt(args.prompt)
    settings = generation_settings(args, *image_sides(args))
    if args.num_images < 1:
        raise InputError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    folder = model_folder(args)
    settings.resolve(read_config(folder))  # what the model cannot draw fails before its weights load
    start = args.seed if args.seed is not None else secrets.randbits(31)
    seeds = [start + k for k in range(args.num_images)]
    paths, grid_path = _output_paths(args, seeds)

    model, tokenizer = load(args, folder)
    if args.compile:
        model.compile_for_sampling()
    pipe = TextToImagePipeline(model, tokenizer)
    images = []
    for first in range(0, len(seeds), args.batch_size):
        batch = seeds[first:first + args.batch_size]
        out = pipe(prompt, settings, num_images_per_prompt=len(batch), seeds=batch, progress=not args.quiet)
        for i, (image, seed, path) in enumerate(zip(out.images, batch, paths[first:first + len(batch)])):
            _write_png(path, image, image_metadata(prompt, seed, out.settings, model, folder, out.details(i)))
            images.append(image)
    if grid_path is not None:
        _write_png(grid_path, make_grid(images), grid_metadata(prompt, seeds, model.config.name))
    return 0


# -- edit -------------------------------------------------------------------------------------------
def add_edit(subparsers) -> None:
    """``harmon edit IMAGE PROMPT`` with one of --mask, --box, --extend, --strength."""
    p = add_command(subparsers, "edit", cmd_edit, "inpaint, outpaint or vary an image under a prompt",
                    "Complete a partly known image: the known region's latent tokens are kept and only the rest "
                    "is generated, in the same MAR loop as text to image. Choose one of --mask (white = "
                    "regenerate), --box L,T,R,B (pixels), --extend L,T,R,B (margins, multiples of the VAE stride) "
                    "or --strength S (regenerate that fraction of tokens at random, chosen by the seed).")
    p.add_argument("image", help="the image to edit")
    p.add_argument("prompt", help="what the edited image shows")
    add_model_arguments(p)
    p.add_argument("--out", default="edited.png", metavar="FILE.png", help="output file")
    p.add_argument("--mask", metavar="MASK.png", help="inpainting mask, same size as the image (white = regenerate)")
    p.add_argument("--box", metavar="L,T,R,B", help="inpaint this box (pixels)")
    p.add_argument("--extend", metavar="L,T,R,B", help="outpaint: margins to add (pixels, multiples of the model's "
                   "VAE stride: 16, or 8 for the shapes model)")
    p.add_argument("--strength", type=float, metavar="S", help="variations: fraction of tokens to regenerate (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed (default: random)")
    add_generation_arguments(p, size=None)  # an edit is drawn at its canvas's size


def _four_integers(text: str, flag: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise InputError(f"{flag} takes four integers separated by commas, got {text!r}")
    return values


def _edit_region(args: argparse.Namespace, stride: int, seed: int) -> tuple[str, KnownRegion]:
    """(edit mode, region) of the one edit option given."""
    if args.mask is not None:
        return "inpaint", inpaint_region(args.image, args.mask, stride=stride)
    if args.box is not None:
        return "inpaint", inpaint_region(args.image, _four_integers(args.box, "--box"), stride=stride)
    if args.extend is not None:
        left, top, right, bottom = _four_integers(args.extend, "--extend")
        return "outpaint", outpaint_region(args.image, left=left, top=top, right=right, bottom=bottom, stride=stride)
    generator = torch.Generator().manual_seed(seed)  # chooses the regenerated tokens
    return "variation", variation_region(args.image, args.strength, generator, stride=stride)


def cmd_edit(args: argparse.Namespace) -> int:
    """Inpaint (--mask or --box), outpaint (--extend) or vary (--strength) an image under a prompt."""
    if sum(value is not None for value in (args.mask, args.box, args.extend, args.strength)) != 1:
        raise InputError("give exactly one of --mask, --box, --extend, --strength")
    check_prompt(args.prompt)
    settings = generation_settings(args)
    path = png_path(args.out, "--out")
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    folder = model_folder(args)
    config = read_config(folder)
    mode, region = _edit_region(args, config.mar.vae_stride, seed)
    settings.replace(height=region.canvas.height, width=region.canvas.width).resolve(config)  # before the load
    model, tokenizer = load(args, folder)
    out = EditPipeline(model, tokenizer)(region, args.prompt, settings, seed=seed)
    details = edit_details(mode, region, str(args.image))
    _write_png(path, out.images[0], image_metadata(args.prompt, seed, out.settings, model, folder, details))
    return 0


# -- batch ------------------------------------------------------------------------------------------
def add_batch(subparsers) -> None:
    """``harmon batch PROMPTS_FILE --out-dir DIR``."""
    p = add_command(
        subparsers, "batch", cmd_batch, "draw images for every prompt of a JSON/JSONL file (resumable, torchrun)",
        "Generate NUM_IMAGES images per prompt of PROMPTS_FILE (a JSON list of strings or objects with \"prompt\", "
        "or JSONL: one object or string per line) into OUT: OUT/<i:05d>_<k:02d>.png + .json sidecar, or, with "
        "--benchmark, what that benchmark's official scorer reads: GenEval's OUT/<i:05d>/metadata.jsonl and "
        "samples/<k:04d>.png; DPG-Bench's 2x2 grids OUT/images/<item_id>.png (PROMPTS_FILE: its prompts/ folder); "
        "WISE's OUT/images/<prompt_id>.png (PROMPTS_FILE: one of its data/*.json). Image k of prompt i uses seed "
        "S + i*NUM_IMAGES + k. Rerunning the same command skips finished images; other settings into the same "
        "OUT are refused (OUT/run.json). Under `torchrun --nproc_per_node N` each rank takes a disjoint share.")
    p.add_argument("prompts_file", metavar="PROMPTS_FILE",
                   help="prompts: .json list, .jsonl, or .txt (one per line); or a benchmark's (see --benchmark)")
    add_model_arguments(p)
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder (resumable)")
    p.add_argument("--benchmark", choices=BENCHMARKS, default=None,
                   help="write the layout the benchmark's scorer reads (GenEval: --num-images 4; DPG-Bench: 4, "
                   "grids of 2x2; WISE: 1)")
    p.add_argument("--num-images", type=int, default=1, metavar="K", help="images per prompt")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of image 0 of prompt 0; image k of prompt i gets S + i*K + k (default: 0)")
    add_generation_arguments(p)
    add_compile_argument(p)
    p.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help="images generated at once (not a setting of the run: may change when resuming)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def cmd_batch(args: argparse.Namespace) -> int:
    """Many prompts from a JSON/JSONL file -> images in a folder; resumable and shardable under torchrun."""
    settings = generation_settings(args, *image_sides(args))
    options = BatchOptions(seed=args.seed, num_images=args.num_images, batch_size=args.batch_size,
                           benchmark=args.benchmark, device=args.device, dtype=args.dtype,
                           quantize=check_quantization(args.quantize), compile=args.compile,
                           progress=not args.quiet)
    run_batch(args.prompts_file, model_folder(args), args.out_dir, settings, options)
    return 0
