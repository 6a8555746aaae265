"""One of the recipe's restarts applied to a finished model folder: how the shipped shapes model was made from
the one shipped before it, twice (docs/shapes.md, "Restarts").

    .venv/bin/python scripts/probes/restart.py OUT [MODEL]

Writes the recipe's training data to OUT/data (seed 0, as the first run had it), trains MODEL (default: the
shipped model) with the recipe's restart settings (`harmon.shapes.recipe.harmon_train_config`: 1,750 steps,
fresh AdamW, warm-up to lr 5e-4 then cosine to 5%, both objectives, readout loss 1, compiled, precision by the
CPU) into OUT/run, and stores the result in float16, the shipped form, in OUT/model. The run resumes if
interrupted (the same command again). One hour on a 2-core AVX2 CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harmon.checkpoint import CONFIG_NAME
from harmon.config import shapes
from harmon.errors import InputError
from harmon.hub import default_model_folder
from harmon.shapes.datasets import write_datasets
from harmon.shapes.recipe import RecipeConfig, harmon_train_config, store_float16
from harmon.train.trainer import train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="restart.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="working folder (data, run, model)")
    p.add_argument("model", type=Path, nargs="?", default=None, help="model folder to train on (default: shipped)")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"{args.out} is a file, not a folder")
    model = args.model or default_model_folder()
    if not (model / CONFIG_NAME).is_file():
        p.error(f"{model} is not a model folder (no {CONFIG_NAME})")
    cfg = RecipeConfig(progress=False)
    data = args.out / "data"
    if not (data / "llava.json").is_file():
        write_datasets(data, cfg.n_images, cfg.seed, shapes().mar.img_size)
    try:
        result = train(harmon_train_config(cfg, model, data, args.out / "run", cfg.restart_steps, cfg.restart_lr))
    except InputError as err:
        p.error(str(err))
    stored = args.out / "model"
    store_float16(result.final_dir, result.final_dir, stored)
    print(f"trained {result.steps} steps; float16 model in {stored}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
