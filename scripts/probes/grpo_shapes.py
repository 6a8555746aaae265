"""The recipe's grpo stage alone, from the shipped model (resumable).

Usage: OMP_NUM_THREADS=1 python scripts/probes/grpo_shapes.py OUT_DIR [MAX_STEPS] [MODEL]

Runs :func:`harmon.shapes.recipe.reward_fine_tune` with the recipe's settings (``grpo.steps`` = MAX_STEPS,
default the recipe's) from MODEL (default: the shipped model), writing ``OUT_DIR/prompts.jsonl``,
``OUT_DIR/run`` (checkpoints, ``log.jsonl`` with the reward per step and category) and the exported model
``OUT_DIR/run/final``; running it again resumes from the last checkpoint. Evaluate a midway checkpoint with
``harmon export-checkpoint OUT_DIR/run --step N --out M`` then ``harmon eval shapes --model M``.
"""
from __future__ import annotations

import sys
from pathlib import Path

from harmon.hub import default_model_folder
from harmon.shapes.recipe import RecipeConfig, RewardStageConfig, reward_fine_tune


def main() -> None:
    out = Path(sys.argv[1])
    cfg = RecipeConfig(grpo=RewardStageConfig(**({"steps": int(sys.argv[2])} if len(sys.argv) > 2 else {})))
    model = Path(sys.argv[3]) if len(sys.argv) > 3 else default_model_folder()
    print(f"model: {reward_fine_tune(model, out, cfg)}")


if __name__ == "__main__":
    main()
