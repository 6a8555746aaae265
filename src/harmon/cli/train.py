"""Training: ``harmon train``, ``harmon export-checkpoint`` and ``harmon train-shapes``."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..errors import InputError
from ..shapes.recipe import RecipeConfig, run_recipe
from ..train.config import TrainConfig
from ..train.trainer import export_checkpoint, train
from .common import add_command


def add_parsers(subparsers) -> None:
    """Add ``train``, ``export-checkpoint`` and ``train-shapes``."""
    p = add_command(subparsers, "train", cmd_train, "fine-tune from a YAML config (torchrun for several processes)",
                    "Fine-tune Harmon with the original's objectives and recipe. Run under `torchrun "
                    "--nproc_per_node N -m harmon.cli train CONFIG` for data parallelism. Running the same command "
                    "again resumes from the latest checkpoint.")
    p.add_argument("config", help="YAML (or JSON) training configuration; see README.md")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps of the config")

    p = add_command(subparsers, "export-checkpoint", cmd_export_checkpoint,
                    "a model folder from a training run's checkpoint",
                    "Write a model folder (weights, config, tokenizer; LoRA merged) from a checkpoint of a `harmon "
                    "train` run, e.g. to evaluate the run midway.")
    p.add_argument("run", help="the run's output_dir")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")

    p = add_command(subparsers, "train-shapes", cmd_train_shapes,
                    "train the small shapes-world Harmon from nothing (the shipped default model)",
                    "Write the shapes-world training data, learn a tokenizer, train the KL autoencoder, then train "
                    "Harmon with `harmon train`'s trainer, all from one seed. The finished model is OUT/model. "
                    "Running the same command again continues an interrupted run.")
    p.add_argument("--out", required=True, metavar="DIR", help="working folder (data, checkpoints, model)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of everything")
    p.add_argument("--precision", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="autocast of the VAE and Harmon stages; auto (default): bfloat16 where the CPU has bf16 "
                        "matrix instructions (AVX512-BF16 or AMX), else float32; a run continues only with the "
                        "precision it started with")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune from a YAML config; resumes from the output folder's latest checkpoint."""
    config = TrainConfig.from_yaml(args.config)
    if args.max_steps is not None:
        config = dataclasses.replace(config, max_steps=args.max_steps)  # checked again, as the file's value is
    result = train(config)
    if result.final_dir is not None:
        print(f"trained {result.steps} steps; model written to {result.final_dir}")
    return 0


def cmd_export_checkpoint(args: argparse.Namespace) -> int:
    """A model folder from a training run's checkpoint."""
    print(f"wrote {export_checkpoint(args.run, args.out, args.step)}")
    return 0


def cmd_train_shapes(args: argparse.Namespace) -> int:
    """Run :func:`harmon.shapes.recipe.run_recipe` with the shipped model's settings; 0 on success."""
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    model_dir = run_recipe(args.out, RecipeConfig(seed=args.seed, precision=args.precision,
                                                    progress=not args.quiet))
    seconds = json.loads((Path(args.out) / "recipe.json").read_text())["seconds"]
    print(f"model: {model_dir} (stages took {seconds})")
    return 0
