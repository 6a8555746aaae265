"""``harmon eval shapes``: score a model on the shapes world (wire :func:`add_eval_parser` into the main CLI).

``add_eval_parser(subparsers)`` adds ``eval`` with the ``shapes`` subcommand, whose
function (``args.func``) is :func:`cmd_eval_shapes`; it returns an exit code.
User errors raise ``ValueError`` (the main CLI prints them as one line, exit 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import world
from .evaluate import DEFAULT_EVAL_SEED


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``shapes``) to an ``add_subparsers()`` object; returns the ``eval`` parser."""
    p = subparsers.add_parser("eval", help="evaluate a model (shapes: the synthetic world of SHAPES.md)",
                              description="Evaluate a model on a benchmark.")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    s = sub.add_parser("shapes", help="GenEval-style generation scores and understanding accuracy on shapes",
                       description="Generate images for fresh shapes-world prompts and check them with a "
                       "deterministic analyser (GenEval-style, per category), then ask questions about freshly "
                       "rendered scenes (exact match per question type). Prints a table, writes OUT/results.json "
                       "and GenEval's layout OUT/<index>/metadata.jsonl + samples/<k>.png.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = s.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="DIR", help="model folder")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    s.add_argument("--n", type=int, default=200, metavar="N", help="number of prompts (and of understanding scenes)")
    s.add_argument("--scenes", type=int, default=None, metavar="N",
                   help="understanding scenes (None: as many as --n)")
    s.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, metavar="S",
                   help="seed of the evaluation prompts, image seeds and scenes (separate from training streams)")
    s.add_argument("--out", default="shapes-eval", metavar="DIR", help="output folder")
    s.add_argument("--size", type=int, default=world.DEFAULT_SIZE, metavar="PX", help="image side (multiple of 16)")
    s.add_argument("--images-per-prompt", type=int, default=1, metavar="K", help="images per prompt (GenEval: 4)")
    s.add_argument("--num-iter", type=int, default=16, metavar="N", help="MAR iterations")
    s.add_argument("--num-steps", type=int, default=None, metavar="N", help="diffusion steps (None: the model's)")
    s.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--batch-size", type=int, default=8, metavar="B", help="images generated at once")
    s.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="longest answer")
    s.add_argument("--no-generation", action="store_true", help="skip the generation part")
    s.add_argument("--no-understanding", action="store_true", help="skip the understanding part")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_eval_shapes)
    return p


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    """Run :func:`harmon.shapes.evaluate.evaluate_model` from parsed arguments; 0 on success."""
    from ..checkpoint import load_model, read_config
    from ..hub import load_tokenizer, pick_device, pick_dtype, resolve_model_folder
    from ..processing import check_image_size
    from .evaluate import evaluate_model

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.scenes is not None and args.scenes < 0:
        raise ValueError(f"--scenes must be >= 0, got {args.scenes}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for name in ("images_per_prompt", "num_iter", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.no_generation and args.no_understanding:
        raise ValueError("nothing to do: both --no-generation and --no-understanding given")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out is not a folder: {out}")
    folder = resolve_model_folder(args.model)
    config = read_config(folder)
    check_image_size(args.size, args.size, config.mar.vae_stride)
    device = pick_device(args.device)
    model = load_model(folder, device=device, dtype=pick_dtype(args.dtype, device))
    tokenizer = load_tokenizer(folder, int(model.config.llm["vocab_size"]))
    evaluate_model(model, tokenizer, n_prompts=args.n, seed=args.seed, out_dir=out, image_size=args.size,
                   images_per_prompt=args.images_per_prompt, num_iter=args.num_iter, num_steps=args.num_steps,
                   guidance_scale=args.cfg, temperature=args.temperature, batch_size=args.batch_size,
                   n_scenes=args.scenes, max_new_tokens=args.max_new_tokens,
                   generation=not args.no_generation, understanding=not args.no_understanding,
                   progress=not args.quiet)
    print(f"results: {out / 'results.json'}")
    return 0
