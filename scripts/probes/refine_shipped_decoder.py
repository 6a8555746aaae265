"""The recipe's decoder stage (harmon.shapes.recipe.refine_decoder), run on the shipped model.

The shipped model was trained before the recipe had that stage; this applies the stage to it as the recipe
would (its training data rewritten from the recipe's seed, RecipeConfig().decoder) and writes the result in the
shipped form (float16 weights, the same tokenizer) to OUT. It starts from the shipped float16 weights, as the
float32 export of that run was not kept.

    .venv/bin/python scripts/probes/refine_shipped_decoder.py WORK_DIR OUT
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from harmon.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model
from harmon.hub import default_model_folder
from harmon.saving import save_model
from harmon.shapes.datasets import write_datasets
from harmon.shapes.recipe import RecipeConfig, refine_decoder


def main() -> None:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = RecipeConfig()
    shipped = default_model_folder()
    data = work / "data"
    tick = time.perf_counter()
    if not (data / "t2i.jsonl").is_file():
        write_datasets(data, cfg.n_images, cfg.seed, 64)
    print(f"data {time.perf_counter() - tick:.0f} s", flush=True)
    tick = time.perf_counter()
    refine_decoder(shipped, data, work / "decoder", cfg)
    print(f"decoder stage {time.perf_counter() - tick:.0f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(shipped, out, ignore=shutil.ignore_patterns(WEIGHTS_NAME, CONFIG_NAME))
    save_model(load_model(work / "decoder", dtype=torch.float16), out)


if __name__ == "__main__":
    main()
