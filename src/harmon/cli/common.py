"""What several commands share: the model options, the options of :class:`~harmon.settings.GenerationSettings`
and :class:`~harmon.settings.DecodingSettings` (flag = field name with dashes), and output-file checks.

Each ``add_*`` function declares options; the function beside it reads them into the library's own value
(a settings object, a model folder), which checks itself. Nothing here changes the parsed arguments.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..files import check_folder_path
from ..hub import load_pretrained, resolve_model_folder
from ..models.harmon import Harmon
from ..settings import DecodingSettings, GenerationSettings

GENERATION = GenerationSettings()  # the defaults shown by --help are the settings types' own
DECODING = DecodingSettings()
MODELS_SIZE = "the model's, 512 for the released models"


class HelpFormatter(argparse.HelpFormatter):
    """Shows "(default: X)" for options with a real default that their help does not already mention."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def add_command(subparsers, name: str, func, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand ``name`` running ``func(args)``, with the project's help format."""
    parser = subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    parser.set_defaults(func=func)
    return parser


# -- the model --------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--quantize``."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="model folder (ours, the Hugging Face release's, or from `harmon "
                   "convert`), or a Hugging Face repo id such as wusize/Harmon-1_5B (the local cache first, else "
                   "downloaded) (default: the shapes-world model shipped with harmon)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (default: auto = cuda, else mps, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (default: auto = bfloat16 on cuda, float32 elsewhere)")
    g.add_argument("--quantize", default="none", metavar="{none,int8}",
                   help="int8: store the LLM's and MAR blocks' linear weights as int8 (torchao, weight-only: "
                   "activations stay in --dtype; cpu or cuda): the released models' weights in about a third of "
                   "float32's memory, half of bfloat16's (docs/performance.md) (default: none)")


def model_folder(args: argparse.Namespace) -> Path:
    """The local folder of ``--model`` (downloaded first for a hub id; the shipped model when absent)."""
    return resolve_model_folder(args.model)


def load(args: argparse.Namespace, folder: Path) -> tuple[Harmon, object]:
    """(model, tokenizer) of ``folder`` on ``--device`` in ``--dtype``, quantized as ``--quantize`` says."""
    return load_pretrained(folder, device=args.device, dtype=args.dtype, quantize=args.quantize)


def add_compile_argument(parser: argparse.ArgumentParser, same: str = "same images") -> None:
    """``--compile``: torch.compile the sampling modules before the work (``same``: what stays equal)."""
    parser.add_argument("--compile", action="store_true",
                        help=f"torch.compile the diffusion head and MAR blocks first ({same} up to float rounding; "
                        "pays off over many images: compiling takes tens of seconds)")


# -- generation settings -----------------------------------------------------------------------------
def diffusion_steps(text: str) -> int | str:
    """A ``--num-steps`` value: a count, or a respacing string of the original (``ddim25``, ``10,5``)."""
    return int(text) if text.strip().isdigit() else text


def add_generation_arguments(parser: argparse.ArgumentParser, size: str | None = MODELS_SIZE) -> None:
    """The options of :class:`GenerationSettings`; with ``size`` (what the default image side is) also
    ``--size`` / ``--height`` / ``--width``."""
    g = parser.add_argument_group("generation settings")
    g.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=float, default=GENERATION.guidance_scale,
                   metavar="G", help="classifier-free guidance scale (1 disables it)")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"], default=GENERATION.cfg_schedule,
                   help="how guidance grows over the MAR iterations")
    g.add_argument("--temperature", type=float, default=GENERATION.temperature, metavar="T",
                   help="temperature of the diffusion head's sampling")
    g.add_argument("--num-iter", type=int, default=GENERATION.num_iter, metavar="N",
                   help="MAR iterations (default: the model's, 64 for the released models)")
    g.add_argument("--num-steps", type=diffusion_steps, default=GENERATION.num_steps, metavar="N",
                   help="diffusion steps per token, or a respacing string such as ddim25 (default: the model's, "
                   "100 for the released models)")
    g.add_argument("--fast", action="store_true",
                   help="fast mode: half the model's MAR iterations (32 for the released models), diffusion steps "
                   "annealed 50 -> 5 (for whichever of --num-iter / --num-steps is not given)")
    if size is not None:
        g.add_argument("--size", type=int, default=None, metavar="PX",
                       help=f"square image side, a multiple of the VAE stride (default: {size})")
        g.add_argument("--height", type=int, default=None, metavar="H", help="image height (overrides --size)")
        g.add_argument("--width", type=int, default=None, metavar="W",
                       help="image width (overrides --size; default: --size, else --height)")
    g.add_argument("--vae-tile", type=int, default=GENERATION.vae_tile, metavar="CELLS",
                   help="decode the image in overlapping tiles of CELLS x CELLS latent cells, within bounded memory, "
                   "for images too large to decode whole (changes pixels slightly at tile seams; default: whole)")
    g.add_argument("--self-check", type=int, default=GENERATION.self_check, metavar="K",
                   help="draw K candidates per image and keep the one the model itself judges closest to the prompt "
                   "(it answers questions derived from the prompt; costs about K times the drawing; 1: off)")


def image_sides(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(height, width) of ``--size`` / ``--height`` / ``--width``; None where the settings' default applies."""
    height = args.height if args.height is not None else args.size
    width = args.width if args.width is not None else (args.size if args.height is None else None)
    return height, width


def generation_settings(args: argparse.Namespace, height: int | None = None,
                        width: int | None = None) -> GenerationSettings:
    """The :class:`GenerationSettings` of the parsed options (checked as they are built)."""
    return GenerationSettings(guidance_scale=args.guidance_scale, cfg_schedule=args.cfg_schedule,
                              temperature=args.temperature, num_iter=args.num_iter, num_steps=args.num_steps,
                              fast=args.fast, height=height, width=width, vae_tile=args.vae_tile,
                              self_check=args.self_check)


# -- decoding settings -------------------------------------------------------------------------------
def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`DecodingSettings`, the sampling seed and the understanding image size."""
    g = parser.add_argument_group("decoding settings")
    g.add_argument("--max-new-tokens", type=int, default=DECODING.max_new_tokens, metavar="N",
                   help="stop after this many new tokens")
    g.add_argument("--do-sample", "--sample", dest="do_sample", action="store_true",
                   help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=DECODING.temperature, metavar="T",
                   help="sampling temperature, with --do-sample")
    g.add_argument("--top-p", type=float, default=DECODING.top_p, metavar="P",
                   help="nucleus sampling threshold in (0, 1], with --do-sample")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the sampling generator, with --do-sample (default: random)")
    g.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="side the image is padded and resized to (default: the model's, 512 for the released models)")


def decoding_settings(args: argparse.Namespace) -> DecodingSettings:
    """The :class:`DecodingSettings` of the parsed options (checked as they are built)."""
    return DecodingSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature, top_p=args.top_p)


def decoding_generator(args: argparse.Namespace) -> torch.Generator | None:
    """The generator of ``--seed``; None lets sampling draw a fresh random seed."""
    return None if args.seed is None else torch.Generator().manual_seed(args.seed)


# -- output files ------------------------------------------------------------------------------------
def png_path(value: str, flag: str) -> Path:
    """An output file named by ``flag``: a .png path that is not a folder and whose folder can be made."""
    path = Path(value)
    if path.suffix.lower() != ".png":
        raise InputError(f"{flag} must name a .png file, got {path}")
    if path.is_dir():
        raise InputError(f"{flag} is a folder ({path}); name a .png file")
    check_folder_path(path.parent, f"the folder of {flag}")
    return path
