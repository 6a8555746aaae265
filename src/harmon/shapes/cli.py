"""``harmon eval shapes`` and ``harmon train-shapes`` (wired into the main CLI by :mod:`harmon.cli`).

``add_eval_parser(subparsers)`` adds ``eval`` with the ``shapes`` subcommand
(:func:`cmd_eval_shapes`); ``add_train_shapes_parser(subparsers)`` adds
``train-shapes`` (:func:`cmd_train_shapes`). Both functions return an exit code;
user errors raise ``ValueError`` (the main CLI prints them as one line, exit 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import world
from .evaluate import DEFAULT_EVAL_SEED


def add_eval_parser(subparsers, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """Add ``eval`` (with ``shapes``) to an ``add_subparsers()`` object; returns the ``eval`` parser."""
    p = subparsers.add_parser("eval", help="evaluate a model (shapes: the synthetic world of SHAPES.md)",
                              description="Evaluate a model on a benchmark.")
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    s = sub.add_parser("shapes", help="GenEval-style generation scores and understanding accuracy on shapes",
                       description="Generate images for fresh shapes-world prompts and check them with a "
                       "deterministic analyser (GenEval-style, per category), then ask questions about freshly "
                       "rendered scenes (exact match per question type). Prints a table, writes OUT/results.json "
                       "and GenEval's layout OUT/<index>/metadata.jsonl + samples/<k>.png.",
                       formatter_class=formatter_class)
    g = s.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="DIR", help="model folder (default: the shipped shapes model)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    s.add_argument("--n", type=int, default=200, metavar="N", help="number of prompts (and of understanding scenes)")
    s.add_argument("--scenes", type=int, default=None, metavar="N",
                   help="understanding scenes (None: as many as --n)")
    s.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, metavar="S",
                   help="seed of the evaluation prompts, image seeds and scenes (separate from training streams)")
    s.add_argument("--out", default="shapes-eval", metavar="DIR", help="output folder")
    s.add_argument("--size", type=int, default=world.DEFAULT_SIZE, metavar="PX",
                   help="image side (a multiple of the VAE stride)")
    s.add_argument("--images-per-prompt", type=int, default=1, metavar="K", help="images per prompt (GenEval: 4)")
    s.add_argument("--num-iter", type=int, default=None, metavar="N", help="MAR iterations (None: the model's)")
    s.add_argument("--num-steps", type=int, default=None, metavar="N", help="diffusion steps (None: the model's)")
    s.add_argument("--fast", action="store_true",
                   help="generate in the fast mode (half the MAR iterations, diffusion steps annealed 50 -> 5, "
                   "for whichever of --num-iter / --num-steps is not given)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the diffusion head and MAR blocks first (same scores up to float rounding)")
    s.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--batch-size", type=int, default=8, metavar="B", help="images generated at once")
    s.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="longest answer")
    s.add_argument("--no-generation", action="store_true", help="skip the generation part")
    s.add_argument("--no-understanding", action="store_true", help="skip the understanding part")
    s.add_argument("--inpainting", type=int, default=0, metavar="N",
                   help="also complete N scenes with one object masked out, scored against text-only generation "
                   "(OUT/inpainting.json)")
    s.add_argument("--context", type=int, default=0, metavar="N",
                   help="also measure how much the MAR decoder uses already drawn tokens, on N fresh scenes "
                   "(the loss of the same tokens with 0/30/60/90%% of the others visible; OUT/context.json)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_eval_shapes)

    t = sub.add_parser("shapes-task", help="write the shapes understanding questions as an lmms-eval task",
                       description="Write the questions `harmon eval shapes` asks (same scenes and seed) as a local "
                       "lmms-eval task (harmon_shapes_qa), to run with `lmms-eval --model harmon --tasks "
                       "harmon_shapes_qa --include_path OUT`: it must report the accuracy `harmon eval shapes` does.",
                       formatter_class=formatter_class)
    t.add_argument("--out", required=True, metavar="DIR", help="task folder to write")
    t.add_argument("--scenes", type=int, default=200, metavar="N", help="understanding scenes")
    t.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, metavar="S", help="seed of the scenes")
    t.add_argument("--size", type=int, default=world.DEFAULT_SIZE, metavar="PX", help="image side")
    t.set_defaults(func=cmd_eval_shapes_task)
    return p


def cmd_eval_shapes_task(args: argparse.Namespace) -> int:
    """Write the lmms-eval task of the shapes understanding questions."""
    from .lmms_task import TASK_NAME, write_task

    folder = write_task(args.out, args.scenes, args.seed, args.size)
    print(f"wrote the lmms-eval task {TASK_NAME} to {folder} (--include_path {folder})")
    return 0


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    """Run :func:`harmon.shapes.evaluate.evaluate_model` from parsed arguments; 0 on success."""
    from ..checkpoint import read_config
    from ..files import check_folder_path
    from ..hub import load_pretrained, resolve_model_folder
    from ..processing import check_image_size
    from .context import context_use
    from .evaluate import evaluate_inpainting, evaluate_model

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.scenes is not None and args.scenes < 0:
        raise ValueError(f"--scenes must be >= 0, got {args.scenes}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    for name in ("images_per_prompt", "num_iter", "batch_size", "max_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("inpainting", "context"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.no_generation and args.no_understanding and not (args.inpainting or args.context):
        raise ValueError("nothing to do: --no-generation and --no-understanding given without --inpainting "
                         "or --context")
    out = check_folder_path(args.out, "--out")
    folder = resolve_model_folder(args.model)
    config = read_config(folder)
    check_image_size(args.size, args.size, config.mar.vae_stride)
    model, tokenizer = load_pretrained(folder, device=args.device, dtype=args.dtype)
    if args.compile:
        model.compile_for_sampling()
    written = []
    if not (args.no_generation and args.no_understanding):
        evaluate_model(model, tokenizer, n_prompts=args.n, seed=args.seed, out_dir=out, image_size=args.size,
                       images_per_prompt=args.images_per_prompt, num_iter=args.num_iter,
                       num_steps=args.num_steps, fast=args.fast,
                       guidance_scale=args.cfg, temperature=args.temperature, batch_size=args.batch_size,
                       n_scenes=args.scenes, max_new_tokens=args.max_new_tokens,
                       generation=not args.no_generation, understanding=not args.no_understanding,
                       progress=not args.quiet)
        written.append(out / "results.json")
    if args.inpainting:
        evaluate_inpainting(model, tokenizer, n_scenes=args.inpainting, seed=args.seed, out_dir=out,
                            image_size=args.size, num_iter=args.num_iter, num_steps=args.num_steps,
                            guidance_scale=args.cfg,
                            temperature=args.temperature, progress=not args.quiet)
        written.append(out / "inpainting.json")
    if args.context:
        context_use(model, tokenizer, n_scenes=args.context, seed=args.seed, out_dir=out)
        written.append(out / "context.json")
    print("results: " + ", ".join(str(p) for p in written))
    return 0


def add_train_shapes_parser(subparsers, formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """Add ``train-shapes`` (the whole shapes recipe) to an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "train-shapes", help="train the small shapes-world Harmon from nothing (the shipped default model)",
        description="Write the shapes-world training data, learn a tokenizer, train the KL autoencoder, then "
        "train Harmon with `harmon train`'s trainer, all from one seed. The finished model is OUT/model. "
        "Running the same command again continues an interrupted run.", formatter_class=formatter_class)
    p.add_argument("--out", required=True, metavar="DIR", help="working folder (data, checkpoints, model)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of everything")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_shapes)
    return p


def cmd_train_shapes(args: argparse.Namespace) -> int:
    """Run :func:`harmon.shapes.recipe.run_recipe` with the shipped model's settings; 0 on success."""
    from .recipe import RecipeConfig, run_recipe

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    model_dir = run_recipe(args.out, RecipeConfig(seed=args.seed, progress=not args.quiet))
    seconds = json.loads((Path(args.out) / "recipe.json").read_text())["seconds"]
    print(f"model: {model_dir} (stages took {seconds})")
    return 0
