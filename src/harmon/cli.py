"""The ``harmon`` command. Each subcommand is a plain function taking parsed arguments.

User errors (missing files, bad sizes, unusable model folders, ...) end with one
``harmon: error: ...`` line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import secrets
import sys
from pathlib import Path

from .validation import check_guidance, check_prompt

EXIT_USER_ERROR = 2
DEFAULT_QUESTION = "Describe the image."  # the shipped shapes model was trained on exactly this question


class UserError(Exception):
    """A problem with what the user asked for, reported as one line and exit code 2."""


# -- shared helpers -------------------------------------------------------------------------------
def _version() -> str:
    from . import __version__

    return __version__


def _model_folder(args: argparse.Namespace) -> Path:
    from .hub import resolve_model_folder

    return resolve_model_folder(args.model)


def _load(args: argparse.Namespace, folder: Path):
    """(model, tokenizer) of a model folder on the chosen device and dtype."""
    from .hub import load_pretrained

    return load_pretrained(folder, device=args.device, dtype=args.dtype)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="model folder (ours, the Hugging Face release's, or from `harmon "
                   "convert`), or a Hugging Face repo id such as wusize/Harmon-1_5B (the local cache first, else "
                   "downloaded) (default: the shapes-world model shipped with harmon)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (default: auto = cuda, else mps, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (default: auto = bfloat16 on cuda, float32 elsewhere)")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    """The sampling settings shared by ``generate``, ``edit`` and ``batch`` (defaults are the original's)."""
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 disables it)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default="constant", help="guidance schedule")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--num-iter", type=int, default=None, metavar="N",
                   help="MAR iterations (default: the model's, 64 for the released models)")
    p.add_argument("--num-steps", type=int, default=None, metavar="N",
                   help="diffusion steps per token (default: the model's, 100 for the released models)")


def _add_fast_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help="fast mode: half the model's MAR iterations (32 for the released models), diffusion steps "
                   "annealed 50 -> 5 (for whichever of --num-iter / --num-steps is not given)")


def _add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the diffusion head and MAR blocks first (same images up to float rounding; "
                   "pays off over many images: compiling takes tens of seconds)")


def _add_size_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="square image side, a multiple of the VAE stride (default: the model's, 512 for the released "
                   "models)")
    p.add_argument("--height", type=int, default=None, metavar="H", help="image height (overrides --size)")
    p.add_argument("--width", type=int, default=None, metavar="W", help="image width (overrides --size)")


def _add_vae_tile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae-tile", type=int, default=None, metavar="CELLS",
                   help="decode the image in overlapping tiles of CELLS x CELLS latent cells, within bounded memory, "
                   "for images too large to decode whole (changes pixels slightly at tile seams; default: whole)")


def _add_decode_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=1024, metavar="N",
                   help="stop after this many new tokens (default: 1024)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature, with --sample (default: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling threshold in (0, 1], with --sample (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the sampling generator, with --sample (default: random)")
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="side the image is padded and resized to (default: the model's, 512 for the released models)")


def _decode_kwargs(args: argparse.Namespace) -> dict:
    import torch

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.sample:
        return {"max_new_tokens": args.max_new_tokens}
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    seed = args.seed if args.seed is not None else secrets.randbits(62)
    return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature,
            "top_p": args.top_p, "generator": torch.Generator().manual_seed(seed)}


def _check_understanding_inputs(args: argparse.Namespace, folder: Path):
    """Open the image and check --image-size before the (slow) model load."""
    from .checkpoint import read_config
    from .processing import check_understanding_size, load_image

    image = load_image(args.image)
    config = read_config(folder)
    if args.image_size is None:
        args.image_size = config.image_size
    check_understanding_size(args.image_size, config.mar.vae_stride, config.mar.buffer_size, config.max_positions)
    return image


def _image_shape(args: argparse.Namespace, config) -> tuple[int, int]:
    """(height, width) from --size / --height / --width, the model's image size where none is given; checked."""
    from .processing import check_image_size

    size = config.image_size if args.size is None else args.size
    height = args.height if args.height is not None else size
    width = args.width if args.width is not None else (size if args.height is None else height)
    check_image_size(height, width, config.mar.vae_stride)
    return height, width


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_")[:limit].rstrip("_")
    return slug or "image"


def make_grid(images):
    """All images on one canvas, in rows of up to ceil(sqrt(n)) columns."""
    from PIL import Image

    n = len(images)
    cols = 1
    while cols * cols < n:
        cols += 1
    rows = (n + cols - 1) // cols
    w, h = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# -- generate ------------------------------------------------------------------------------------
def _output_paths(args: argparse.Namespace, seeds: list[int]) -> tuple[list[Path], Path | None]:
    from .files import check_folder_path

    n = len(seeds)
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise UserError(f"--out must name a .png file, got {out}")
        if out.is_dir():
            raise UserError(f"--out is a folder ({out}); use --out-dir for folders")
        folder = check_folder_path(out.parent, "the folder of --out")
        paths = [out] if n == 1 else [folder / f"{out.stem}_{k}{out.suffix}" for k in range(n)]
        grid = folder / f"{out.stem}_grid{out.suffix}" if args.grid else None
    else:
        folder = check_folder_path(args.out_dir, "--out-dir")
        stem = _slug(args.prompt)
        paths = [folder / f"{stem}_{s}.png" for s in seeds]
        grid = folder / f"{stem}_{seeds[0]}_grid.png" if args.grid else None
    return paths, grid


def cmd_generate(args: argparse.Namespace) -> int:
    """Text to image(s): one PNG per image, seeds S, S+1, ..., settings in the PNG text chunks."""
    from .batch import image_metadata, png_bytes, write_atomic
    from .checkpoint import read_config
    from .pipelines import TextToImagePipeline

    prompt = check_prompt(args.prompt)
    check_guidance(args.cfg, args.cfg_schedule, args.temperature)
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_vae_tile(args)
    folder = _model_folder(args)
    height, width = _image_shape(args, read_config(folder))  # fail before loading the weights
    start = args.seed if args.seed is not None else secrets.randbits(31)
    seeds = [start + k for k in range(args.num_images)]
    paths, grid_path = _output_paths(args, seeds)

    model, tokenizer = _load(args, folder)
    if args.compile:
        model.compile_for_sampling()
    pipe = TextToImagePipeline(model, tokenizer)
    images = []
    for first in range(0, len(seeds), args.batch_size):
        batch = seeds[first:first + args.batch_size]
        out = pipe(prompt, num_images_per_prompt=len(batch), seeds=batch, guidance_scale=args.cfg,
                   cfg_schedule=args.cfg_schedule, temperature=args.temperature, height=height, width=width,
                   vae_tile=args.vae_tile, progress=not args.quiet, num_iter=args.num_iter, num_steps=args.num_steps,
                   fast=args.fast)
        for image, seed, path in zip(out.images, batch, paths[first:first + len(batch)]):
            meta = image_metadata({"prompt": prompt, "seed": seed, "cfg": args.cfg, "cfg_schedule": args.cfg_schedule,
                                   "temperature": args.temperature, "num_iter": out.settings["num_iter"],
                                   "fast": args.fast, "num_steps": out.settings["num_steps"], "height": height,
                                   "width": width, "vae_tile": args.vae_tile}, model, folder)
            path.parent.mkdir(parents=True, exist_ok=True)  # now that there is an image to write
            write_atomic(path, png_bytes(image, meta))
            images.append(image)
            print(path, flush=True)
    if grid_path is not None:
        write_atomic(grid_path, png_bytes(make_grid(images),
                          {"prompt": prompt, "seeds": ",".join(map(str, seeds)), "model": model.config.name,
                           "harmon_version": _version(), "software": f"harmon {_version()}"}))
        print(grid_path, flush=True)
    return 0


def _check_vae_tile(args: argparse.Namespace) -> None:
    if args.vae_tile is not None and args.vae_tile < 2:
        raise UserError(f"--vae-tile must be at least 2 latent cells, got {args.vae_tile}")


def _parse_box(text: str, what: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"{what} takes four integers separated by commas, got {text!r}")
    return values


def cmd_edit(args: argparse.Namespace) -> int:
    """Inpaint (--mask or --box), outpaint (--extend) or vary (--strength) an image under a prompt."""
    import torch

    from .batch import image_metadata, png_bytes, write_atomic
    from .checkpoint import read_config
    from .files import check_folder_path
    from .pipelines import EditPipeline, inpaint_region, outpaint_region, variation_region

    chosen = [name for name in ("mask", "box", "extend", "strength") if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise UserError("give exactly one of --mask, --box, --extend, --strength")
    check_prompt(args.prompt)
    check_guidance(args.cfg, args.cfg_schedule, args.temperature)
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out must name a .png file, got {args.out}")
    if Path(args.out).is_dir():
        raise UserError(f"--out is a folder: {args.out}")
    check_folder_path(Path(args.out).parent, "the folder of --out")
    _check_vae_tile(args)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    folder = _model_folder(args)
    stride = read_config(folder).mar.vae_stride
    if args.mask is not None:
        region = inpaint_region(args.image, args.mask, stride=stride)
    elif args.box is not None:
        region = inpaint_region(args.image, _parse_box(args.box, "--box"), stride=stride)
    elif args.extend is not None:
        left, top, right, bottom = _parse_box(args.extend, "--extend")
        region = outpaint_region(args.image, left=left, top=top, right=right, bottom=bottom, stride=stride)
    else:
        region = variation_region(args.image, args.strength, torch.Generator().manual_seed(seed), stride=stride)
    model, tokenizer = _load(args, folder)
    out = EditPipeline(model, tokenizer)(region, args.prompt, seed=seed, guidance_scale=args.cfg,
                                         cfg_schedule=args.cfg_schedule, temperature=args.temperature,
                                         num_iter=args.num_iter, num_steps=args.num_steps, fast=args.fast,
                                         vae_tile=args.vae_tile)
    meta = image_metadata({"prompt": args.prompt, "seed": seed, "edit": chosen[0], "source_image": str(args.image),
                           **out.settings}, model, folder)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png_bytes(out.images[0], meta))
    print(path, flush=True)
    return 0


# -- batch ----------------------------------------------------------------------------------------
def cmd_batch(args: argparse.Namespace) -> int:
    """Many prompts from a JSON/JSONL file -> images in a folder; resumable and shardable under torchrun."""
    from .batch import run_batch
    from .checkpoint import read_config

    folder = _model_folder(args)
    height, width = _image_shape(args, read_config(folder))
    run_batch(args.prompts_file, folder, args.out_dir, seed=args.seed, num_images=args.num_images,
              batch_size=args.batch_size, benchmark=args.benchmark, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
              temperature=args.temperature, num_iter=args.num_iter, num_steps=args.num_steps, fast=args.fast,
              height=height, width=width, vae_tile=args.vae_tile, device=args.device, dtype=args.dtype,
              compile=args.compile, progress=not args.quiet)
    return 0


# -- describe and chat ------------------------------------------------------------------------------
def cmd_describe(args: argparse.Namespace) -> int:
    """Answer one question about an image, streaming the answer to stdout."""
    from .pipelines import ImageToTextPipeline

    question = check_prompt(DEFAULT_QUESTION if args.question is None else args.question, "the question")
    folder = _model_folder(args)
    image = _check_understanding_inputs(args, folder)
    decode = _decode_kwargs(args)
    model, tokenizer = _load(args, folder)
    pipe = ImageToTextPipeline(model, tokenizer, image_size=args.image_size)
    for piece in pipe.stream(image, question, **decode):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn conversation about one image: questions from stdin, answers streamed to stdout."""
    from .pipelines import ChatSession, ImageToTextPipeline

    folder = _model_folder(args)
    image = _check_understanding_inputs(args, folder)
    decode = _decode_kwargs(args)
    model, tokenizer = _load(args, folder)
    session = ChatSession(ImageToTextPipeline(model, tokenizer, image_size=args.image_size), image)
    # bytes that are not UTF-8 reach the question check (one clear error) instead of failing the read
    if hasattr(sys.stdin, "reconfigure"):  # a real text stream (tests may give a StringIO)
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask about the image; an empty line, /quit or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        question = line.strip()
        if not line or not question or question in ("/quit", "/exit"):
            return 0
        check_prompt(question, "the question")
        for piece in session.stream(question, **decode):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


# -- serve ------------------------------------------------------------------------------------------
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    """Web page + OpenAI-style HTTP API (images/generations, chat/completions) in front of one model worker."""
    from .checkpoint import read_config

    try:
        from .server import Engine, ServerSettings, serve
    except ImportError as err:
        raise UserError(f"the server needs extra packages ({err.name} is missing): pip install 'harmon[serve]'")

    api_key = args.api_key if args.api_key is not None else os.environ.get("HARMON_API_KEY") or None
    for name in ("queue_size", "max_images", "max_new_tokens", "max_upload_mb"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    folder = _model_folder(args)
    config = read_config(folder)
    stride = config.mar.vae_stride
    args.size = config.image_size if args.size is None else args.size
    args.image_size = config.image_size if args.image_size is None else args.image_size
    args.num_iter = config.num_iter if args.num_iter is None else args.num_iter
    for name in ("size", "max_size", "image_size"):
        value = getattr(args, name)
        if value < stride or value % stride:
            raise UserError(f"--{name.replace('_', '-')} must be a positive multiple of {stride}, got {value}")
    if args.size > args.max_size:
        raise UserError(f"--size {args.size} is larger than --max-size {args.max_size}")
    if args.host not in LOOPBACK_HOSTS and not api_key:
        print(f"harmon: warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    settings = ServerSettings(api_key=api_key, queue_size=args.queue_size, size=args.size, max_size=args.max_size,
                              num_iter=args.num_iter, num_steps=args.num_steps, max_images=args.max_images,
                              image_size=args.image_size, max_new_tokens=args.max_new_tokens,
                              max_upload_bytes=args.max_upload_mb * 1024 * 1024)
    model, tokenizer = _load(args, folder)
    if args.compile:
        model.compile_for_sampling()
    engine = Engine(model, tokenizer, folder, image_size=args.image_size)
    print(f"harmon: serving {model.config.name} on http://{args.host}:{args.port}/ "
          f"(API key {'required' if api_key else 'not required'})", file=sys.stderr, flush=True)
    serve(engine, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# -- info -------------------------------------------------------------------------------------------
PARTS = ("vae", "llm", "mar", "proj_in", "proj_out")


def folder_info(folder: Path) -> dict:
    """What a model folder holds, from config.json and the weights' headers (no model is built)."""
    from .checkpoint import (EMBED_KEY, LAYOUTS, TIED_KEY, config_layout, folder_weights_path, read_config, read_json,
                             weight_headers)
    from .hub import TOKENIZER_FILES, has_tokenizer

    if not folder.is_dir():
        raise UserError(f"not a folder: {folder}")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder: it has no config.json")
    raw = read_json(folder / "config.json")
    config = read_config(folder)
    weights = folder_weights_path(folder)
    layout = LAYOUTS[config_layout(raw)]
    shapes, dtypes = weight_headers(weights)
    tied = bool(config.llm.get("tie_word_embeddings", False))
    counts = {part: 0 for part in PARTS}
    other = 0
    for key, shape in shapes.items():
        if tied and key == TIED_KEY and EMBED_KEY in shapes:
            continue  # one tensor serves both
        n = 1
        for d in shape:
            n *= d
        part = key.split(".", 1)[0]
        if part in counts:
            counts[part] += n
        else:
            other += n
    tokenizer = next((name for name in TOKENIZER_FILES if (folder / name).is_file()), None)
    return {"folder": str(folder), "config": config.name, "layout": layout, "weights": weights.name,
            "dtypes": sorted(set(dtypes.values())), "parameters": counts, "other": other,
            "total": sum(counts.values()) + other, "tokenizer": tokenizer if has_tokenizer(folder) else None,
            "vocab_size": int(config.llm["vocab_size"])}


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a model folder without loading the model."""
    from .hub import QWEN2_5_VOCAB_SIZE, resolve_model_folder

    info = folder_info(resolve_model_folder(args.folder))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"folder:    {info['folder']}")
    print(f"config:    {info['config']}")
    print(f"layout:    {info['layout']}")
    print(f"weights:   {info['weights']} ({', '.join(info['dtypes'])})")
    print("parameters:")
    for part, n in info["parameters"].items():
        print(f"  {part:<9} {n:>15,}")
    if info["other"]:
        print(f"  {'other':<9} {info['other']:>15,}")
    print(f"  {'total':<9} {info['total']:>15,}")
    if info["tokenizer"]:
        print(f"tokenizer: present ({info['tokenizer']})")
    else:
        rebuilt = "Qwen2.5, rebuilt offline" if info["vocab_size"] >= QWEN2_5_VOCAB_SIZE else "byte-level"
        print(f"tokenizer: absent (the {rebuilt} tokenizer is used)")
    return 0


# -- convert ----------------------------------------------------------------------------------------
def _convert_config(spec: str | None):
    from .checkpoint import CheckpointError, config_from_reference, read_config, read_json
    from .config import PRESETS, HarmonConfig

    if spec is None:
        return None
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec)
    if path.is_dir():
        return read_config(path)
    if not path.is_file():
        raise UserError(f"--config is neither a preset ({', '.join(PRESETS)}) nor a config.json: {spec}")
    data = read_json(path)
    try:
        return config_from_reference(data) if "mar_kwargs" in data else HarmonConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"cannot read {path} as a Harmon config: {err}") from err


def _output_folder(path: str, force: bool) -> Path:
    """``--out``: a folder that does not exist, is empty, or may be overwritten (``--force``)."""
    from .files import check_folder_path

    out = check_folder_path(path, "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out folder {out} is not empty (use --force to overwrite)")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    """Released harmon_*.pth + kl16.ckpt -> a self-contained model folder (config, weights, tokenizer)."""
    from .checkpoint import load_original, save_model
    from .hub import DTYPES, default_tokenizer
    from .tokenizer import save_tokenizer

    for flag, value in (("--pth", args.pth), ("--vae", args.vae)):
        if not Path(value).is_file():
            raise UserError(f"{flag} file not found: {value}")
    if args.qwen is not None and not Path(args.qwen).is_dir():
        raise UserError(f"--qwen folder not found: {args.qwen}")
    out = _output_folder(args.out, args.force)
    config = _convert_config(args.config)
    model = load_original(args.pth, args.vae, config=config, qwen_dir=args.qwen, dtype=DTYPES[args.dtype])
    if args.qwen is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.qwen, local_files_only=True)
        except Exception as err:
            raise UserError(f"cannot load the tokenizer of --qwen {args.qwen}: {err}") from err
    else:
        tokenizer = default_tokenizer(int(model.config.llm["vocab_size"]))
    save_model(model, out)
    save_tokenizer(tokenizer, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.config.name}, {n:,} parameters, {args.dtype}, with tokenizer)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model (any layout, or a hub id) in our layout, the Hugging Face release's, or the .pth layout."""
    from .checkpoint import folder_weights_path, read_config, save_model, save_original, save_release, stored_dtype
    from .hub import DTYPES, load_pretrained, resolve_model_folder
    from .release import release_config
    from .tokenizer import save_tokenizer

    folder = resolve_model_folder(args.model)
    if args.layout == "release":
        release_config(read_config(folder), "float32")  # before the load: a model the release cannot hold
    out = _output_folder(args.out, args.force)
    dtype = DTYPES[args.dtype] if args.dtype != "keep" else stored_dtype(folder_weights_path(folder))
    model, tokenizer = load_pretrained(folder, dtype=dtype)  # cast while read: never a float32 copy of 16-bit
    if args.layout == "original":
        out.mkdir(parents=True, exist_ok=True)
        stem = model.config.name.replace("-", "_") if model.config.name.startswith("harmon") else "harmon"
        save_original(model, out / f"{stem}.pth", out / "kl16.ckpt")
        written = f"{stem}.pth + kl16.ckpt (no tokenizer: the original code takes Qwen2.5's)"
    else:
        (save_release if args.layout == "release" else save_model)(model, out, dtype=dtype)
        save_tokenizer(tokenizer, out)
        written = "config.json, model.safetensors, tokenizer"
    print(f"wrote {out}: {written}; {model.config.name}, {str(dtype).removeprefix('torch.')}, {args.layout} layout")
    if args.layout == "release":
        print("to load it with the release's remote code (AutoModel, trust_remote_code=True), copy the release's "
              "configuration_harmon.py, modeling_harmon.py and their modules into it", file=sys.stderr)
    return 0


# -- parity -----------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune from a YAML config; resumes from the output folder's latest checkpoint."""
    from .train.config import TrainConfig
    from .train.trainer import train

    cfg = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)  # checked again, as the file's value is
    result = train(cfg)
    if result.final_dir is not None:
        print(f"trained {result.steps} steps; model written to {result.final_dir}")
    return 0


def cmd_export_checkpoint(args: argparse.Namespace) -> int:
    """A model folder from a training run's checkpoint."""
    from .train.trainer import export_checkpoint

    folder = export_checkpoint(args.run, args.out, args.step)
    print(f"wrote {folder}")
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    """Run every case of a reference fixture folder; exit 1 if any fails."""
    from .parity import run_parity

    results = run_parity(args.folder, verbose=args.verbose, cases=args.case or None)
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


# -- parser -----------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" for options with a real default that their help does not already mention."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog="harmon", description="Harmon: one model to describe and draw images.",
        epilog="Get a model folder with `harmon convert` from the released weights; see `harmon CMD --help`.")
    parser.add_argument("--version", action="version", version=f"harmon {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="draw images from a text prompt (PNG files)",
                       description="Generate images from PROMPT. Image k gets seed S+k; each PNG stores the "
                       "prompt, seed and settings in its text chunks.", formatter_class=fmt)
    p.add_argument("prompt", metavar="PROMPT", help="what to draw")
    _add_model_options(p)
    o = p.add_argument_group("output").add_mutually_exclusive_group()
    o.add_argument("--out", metavar="FILE.png", help="output file; with several images FILE_0.png, FILE_1.png, ...")
    o.add_argument("--out-dir", metavar="DIR", default=".", help="folder for PROMPT_SEED.png files")
    p.add_argument("--num-images", type=int, default=1, metavar="N", help="how many images")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the first image (default: random)")
    _add_generation_options(p)
    _add_size_options(p)
    _add_vae_tile_option(p)
    p.add_argument("--grid", action="store_true", help="also write one grid image of all outputs")
    _add_fast_option(p)
    _add_compile_option(p)
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="images generated at once")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="inpaint, outpaint or vary an image under a prompt",
                       description="Complete a partly known image: the known region's latent tokens are kept and "
                       "only the rest is generated, in the same MAR loop as text to image. Choose one of --mask "
                       "(white = regenerate), --box L,T,R,B (pixels), --extend L,T,R,B (margins, multiples of "
                       "the VAE stride) or --strength S (regenerate that fraction of tokens at random, chosen by "
                       "the seed).",
                       formatter_class=fmt)
    p.add_argument("image", help="the image to edit")
    p.add_argument("prompt", help="what the edited image shows")
    _add_model_options(p)
    p.add_argument("--out", default="edited.png", metavar="FILE.png", help="output file")
    p.add_argument("--mask", metavar="MASK.png", help="inpainting mask, same size as the image (white = regenerate)")
    p.add_argument("--box", metavar="L,T,R,B", help="inpaint this box (pixels)")
    p.add_argument("--extend", metavar="L,T,R,B", help="outpaint: margins to add (pixels, multiples of the model's VAE stride: 16, or 8 "
                   "for the shapes model)")
    p.add_argument("--strength", type=float, metavar="S", help="variations: fraction of tokens to regenerate (0, 1]")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed (default: random)")
    _add_generation_options(p)
    _add_fast_option(p)
    _add_vae_tile_option(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("batch", help="draw images for every prompt of a JSON/JSONL file (resumable, torchrun)",
                       description="Generate NUM_IMAGES images per prompt of PROMPTS_FILE (a JSON list of strings "
                       "or objects with \"prompt\", or JSONL: one object or string per line) into OUT: "
                       "OUT/<i:05d>_<k:02d>.png + .json sidecar, or, with --benchmark, what that benchmark's "
                       "official scorer reads: GenEval's OUT/<i:05d>/metadata.jsonl and samples/<k:04d>.png; "
                       "DPG-Bench's 2x2 grids OUT/images/<item_id>.png (PROMPTS_FILE: its prompts/ folder); "
                       "WISE's OUT/images/<prompt_id>.png (PROMPTS_FILE: one of its data/*.json). Image k of "
                       "prompt i uses seed "
                       "S + i*NUM_IMAGES + k. Rerunning the same command skips finished images; other settings "
                       "into the same OUT are refused (OUT/run.json). Under `torchrun --nproc_per_node N` each "
                       "rank takes a disjoint share.", formatter_class=fmt)
    p.add_argument("prompts_file", metavar="PROMPTS_FILE",
                   help="prompts: .json list, .jsonl, or .txt (one per line); or a benchmark's (see --benchmark)")
    _add_model_options(p)
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder (resumable)")
    p.add_argument("--benchmark", choices=["geneval", "dpg", "wise"], default=None,
                   help="write the layout the benchmark's scorer reads (GenEval: --num-images 4; DPG-Bench: 4, "
                   "grids of 2x2; WISE: 1)")
    p.add_argument("--num-images", type=int, default=1, metavar="K", help="images per prompt")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of image 0 of prompt 0; image k of prompt i gets S + i*K + k (default: 0)")
    _add_generation_options(p)
    _add_fast_option(p)
    _add_compile_option(p)
    _add_size_options(p)
    _add_vae_tile_option(p)
    p.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help="images generated at once (not a setting of the run: may change when resuming)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("describe", help="answer a question about an image (streamed)",
                       description="Answer QUESTION about IMAGE, streaming the answer to stdout.", formatter_class=fmt)
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("question", metavar="QUESTION", nargs="?", default=None,
                   help=f'the question (default: "{DEFAULT_QUESTION}")')
    _add_model_options(p)
    _add_decode_options(p)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("chat", help="talk about an image, one question per line from stdin",
                       description="Multi-turn conversation about IMAGE: questions are read from stdin, answers "
                       "streamed to stdout; an empty line, /quit or end of input ends.", formatter_class=fmt)
    p.add_argument("image", metavar="IMAGE", help="image file")
    _add_model_options(p)
    _add_decode_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="web page + OpenAI-style HTTP API for generation and chat",
                       description="Serve a web page (text to image with live progress; chat about an uploaded "
                       "image, streamed) and an HTTP JSON API following OpenAI's conventions: POST "
                       "/v1/images/generations and POST /v1/chat/completions (\"stream\": true for server-sent "
                       "events). One model worker runs requests in order; requests beyond --queue-size waiting "
                       "ones get 429.", formatter_class=fmt)
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $HARMON_API_KEY, else none)")
    p.add_argument("--queue-size", type=int, default=8, metavar="N", help="requests that may wait for the model")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="default image side for generation (default: the model's)")
    p.add_argument("--max-size", type=int, default=1024, metavar="PX", help="largest image side a request may ask")
    p.add_argument("--num-iter", type=int, default=None, metavar="N",
                   help="default MAR iterations (default: the model's)")
    p.add_argument("--num-steps", type=int, default=None, metavar="N",
                   help="default diffusion steps per token (default: the model's)")
    p.add_argument("--max-images", type=int, default=4, metavar="N", help="most images per request")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="understanding: side images are resized to (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="most tokens an answer may have")
    p.add_argument("--max-upload-mb", type=int, default=10, metavar="MB", help="largest uploaded image")
    _add_compile_option(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="show what a model folder holds (without loading it)",
                       description="Config name, layout, parameters per part, stored dtype and tokenizer of a "
                       "model folder, read from config.json and the weights' headers.")
    p.add_argument("folder", metavar="DIR", help="model folder (any layout) or Hugging Face repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="released .pth + kl16.ckpt -> a self-contained model folder",
                       description="Load the released layout (harmon_*.pth + kl16.ckpt) and write DIR with "
                       "config.json, model.safetensors and the tokenizer.", formatter_class=fmt)
    p.add_argument("--pth", required=True, metavar="FILE", help="harmon_0.5b.pth or harmon_1.5b.pth")
    p.add_argument("--vae", required=True, metavar="FILE", help="kl16.ckpt")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--qwen", metavar="DIR", default=None,
                   help="Qwen2.5-Instruct folder: LLM config and tokenizer from it (default: the preset inferred "
                   "from the weights and the Qwen2.5 tokenizer rebuilt offline)")
    p.add_argument("--config", metavar="NAME|FILE", default=None,
                   help="preset name or config.json to use instead of inferring the preset (e.g. test models)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the stored weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a model in our layout, the Hugging Face release's, or the .pth layout",
                       description="Load MODEL (a folder in any layout, or a hub id) and write it to DIR: 'release' "
                       "as the official Hugging Face release (config.json with llm + mar, model.safetensors, "
                       "tokenizer; loadable by the release's remote code and transformers 4.45), 'ours' as harmon "
                       "writes model folders, 'original' as the released harmon_*.pth + kl16.ckpt.",
                       formatter_class=fmt)
    p.add_argument("model", metavar="MODEL", help="model folder (ours, the release's, a fixture) or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--layout", choices=["release", "ours", "original"], default="release", help="what to write")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep",
                   help="dtype of the written weights (keep: as stored, so that a round trip is bit for bit)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train", help="fine-tune from a YAML config (torchrun for several processes)",
                       description="Fine-tune Harmon with the original's objectives and recipe. Run under "
                                   "`torchrun --nproc_per_node N -m harmon.cli train CONFIG` for data parallelism. "
                                   "Running the same command again resumes from the latest checkpoint.")
    p.add_argument("config", help="YAML (or JSON) training configuration; see README.md")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps of the config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export-checkpoint", help="a model folder from a training run's checkpoint",
                       description="Write a model folder (weights, config, tokenizer; LoRA merged) from a checkpoint "
                                   "of a `harmon train` run, e.g. to evaluate the run midway.")
    p.add_argument("run", help="the run's output_dir")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    p.set_defaults(func=cmd_export_checkpoint)

    from .shapes.cli import add_eval_parser, add_train_shapes_parser

    add_eval_parser(sub, fmt)
    add_train_shapes_parser(sub, fmt)

    p = sub.add_parser("parity", help="reproduce a reference fixture folder and report errors per case")
    p.add_argument("folder", help="fixture folder with config.json, weights.safetensors and cases/")
    p.add_argument("--case", action="append", help="run only this case (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor's errors")
    p.set_defaults(func=cmd_parity)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from .checkpoint import CheckpointError

    try:
        return args.func(args)
    except (UserError, CheckpointError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
        print(f"harmon: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except torch.OutOfMemoryError as err:
        print(f"harmon: error: out of memory ({_one_line(err)}); try a smaller --size, --batch-size or "
              "--dtype bfloat16", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("harmon: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
