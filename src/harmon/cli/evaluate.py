"""Evaluation: ``harmon eval shapes`` (generation, understanding, inpainting and context use on the shapes
world of SHAPES.md) and ``harmon eval shapes-task`` (its questions as an lmms-eval task)."""
from __future__ import annotations

import argparse

from ..checkpoint import read_config
from ..errors import InputError
from ..files import check_folder_path
from ..shapes import world
from ..shapes.context import context_use
from ..shapes.evaluate import DEFAULT_EVAL_SEED, ShapesEval, evaluate_inpainting, evaluate_model
from ..shapes.lmms_task import TASK_NAME, write_task
from .common import (HelpFormatter, add_command, add_compile_argument, add_generation_arguments,
                     add_model_arguments, generation_settings, image_sides, load, model_folder)

SHAPES_SIZE = f"the shapes world's, {world.DEFAULT_SIZE}"


def add_parsers(subparsers) -> None:
    """Add ``eval`` with its benchmarks ``shapes`` and ``shapes-task``."""
    p = subparsers.add_parser("eval", help="evaluate a model (shapes: the synthetic world of SHAPES.md)",
                              description="Evaluate a model on a benchmark.", formatter_class=HelpFormatter)
    benchmarks = p.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")
    add_shapes(benchmarks)
    p = add_command(benchmarks, "shapes-task", cmd_eval_shapes_task,
                    "write the shapes understanding questions as an lmms-eval task",
                    "Write the questions `harmon eval shapes` asks (same scenes and seed) as a local lmms-eval task "
                    f"({TASK_NAME}), to run with `lmms-eval --model harmon --tasks {TASK_NAME} --include_path OUT`: "
                    "it must report the accuracy `harmon eval shapes` does.")
    p.add_argument("--out", required=True, metavar="DIR", help="task folder to write")
    p.add_argument("--scenes", type=int, default=200, metavar="N", help="understanding scenes")
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, metavar="S", help="seed of the scenes")
    p.add_argument("--size", type=int, default=world.DEFAULT_SIZE, metavar="PX", help="image side")


def add_shapes(benchmarks) -> None:
    """``harmon eval shapes``."""
    p = add_command(benchmarks, "shapes", cmd_eval_shapes,
                    "GenEval-style generation scores and understanding accuracy on shapes",
                    "Generate images for fresh shapes-world prompts and check them with a deterministic analyser "
                    "(GenEval-style, per category), then ask questions about freshly rendered scenes (exact match "
                    "per question type). Prints a table, writes OUT/results.json and GenEval's layout "
                    "OUT/<index>/metadata.jsonl + samples/<k>.png.")
    add_model_arguments(p)
    p.add_argument("--n", type=int, default=200, metavar="N", help="number of prompts (and of understanding scenes)")
    p.add_argument("--scenes", type=int, default=None, metavar="N", help="understanding scenes (default: --n)")
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, metavar="S",
                   help="seed of the evaluation prompts, image seeds and scenes (separate from training streams)")
    p.add_argument("--out", default="shapes-eval", metavar="DIR", help="output folder")
    p.add_argument("--images-per-prompt", type=int, default=1, metavar="K", help="images per prompt (GenEval: 4)")
    add_generation_arguments(p, size=SHAPES_SIZE)
    add_compile_argument(p, same="same scores")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="images generated at once")
    p.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="longest answer")
    p.add_argument("--no-generation", action="store_true", help="skip the generation part")
    p.add_argument("--no-understanding", action="store_true", help="skip the understanding part")
    p.add_argument("--inpainting", type=int, default=0, metavar="N",
                   help="also complete N scenes with one object masked out, scored against text-only generation "
                   "(OUT/inpainting.json)")
    p.add_argument("--context", type=int, default=0, metavar="N",
                   help="also measure how much the MAR decoder uses already drawn tokens, on N fresh scenes "
                   "(the loss of the same tokens with 0/30/60/90%% of the others visible; OUT/context.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _plan(args: argparse.Namespace) -> ShapesEval | None:
    """The generation / understanding evaluation asked for; None when both parts are skipped."""
    if args.no_generation and args.no_understanding:
        return None
    return ShapesEval(n_prompts=args.n, seed=args.seed, images_per_prompt=args.images_per_prompt,
                      batch_size=args.batch_size, n_scenes=args.scenes, max_new_tokens=args.max_new_tokens,
                      generation=not args.no_generation, understanding=not args.no_understanding)


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    """Run the shapes evaluations asked for; the files written are printed last."""
    plan, settings = _plan(args), generation_settings(args, *image_sides(args))
    for flag, value in (("--inpainting", args.inpainting), ("--context", args.context)):
        if value < 0:
            raise InputError(f"{flag} must be >= 0 (0 skips it), got {value}")
    if plan is None and not (args.inpainting or args.context):
        raise InputError("nothing to do: --no-generation and --no-understanding given without --inpainting "
                         "or --context")
    out = check_folder_path(args.out, "--out")
    folder = model_folder(args)
    config = read_config(folder)
    sized = settings if settings.height is not None else settings.replace(height=world.DEFAULT_SIZE)
    sized.resolve(config)  # what the model cannot draw fails before its weights load
    model, tokenizer = load(args, folder)
    if args.compile:
        model.compile_for_sampling()
    written = []
    if plan is not None:
        evaluate_model(model, tokenizer, plan=plan, settings=settings, out_dir=out, progress=not args.quiet)
        written.append(out / "results.json")
    if args.inpainting:
        evaluate_inpainting(model, tokenizer, n_scenes=args.inpainting, seed=args.seed, settings=settings,
                            out_dir=out)
        written.append(out / "inpainting.json")
    if args.context:
        context_use(model, tokenizer, n_scenes=args.context, seed=args.seed, out_dir=out)
        written.append(out / "context.json")
    print("results: " + ", ".join(str(p) for p in written))
    return 0


def cmd_eval_shapes_task(args: argparse.Namespace) -> int:
    """Write the lmms-eval task of the shapes understanding questions."""
    folder = write_task(args.out, args.scenes, args.seed, args.size)
    print(f"wrote the lmms-eval task {TASK_NAME} to {folder} (--include_path {folder})")
    return 0
