"""Reward fine-tuning of the shipped shapes model with the world's evaluator as reward (resumable).

Usage: OMP_NUM_THREADS=1 python scripts/probes/grpo_shapes.py OUT_DIR [MAX_STEPS]

Writes OUT_DIR/prompts.jsonl (2,000 GenEval-style records from the world's prompt sampler with a seed
of its own, so they are not the evaluation's draws; the grammar is small, so single-object prompts
recur) and runs ``harmon train`` on the config below; running it again resumes from the last
checkpoint. The rollouts use fewer diffusion steps than inference (20 against 100) to be affordable
on a CPU; the model is evaluated at its default settings afterwards (``harmon eval shapes --model
OUT_DIR/final``). ``OUT_DIR/log.jsonl`` holds the reward per step and category.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from harmon.hub import default_model_folder
from harmon.shapes import world
from harmon.train.config import TrainConfig
from harmon.train.trainer import train

PROMPT_SEED = 777


def main() -> None:
    out = Path(sys.argv[1])
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        records = world.make_prompts(2000, PROMPT_SEED)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = TrainConfig.from_dict({
        "model": str(default_model_folder()), "output_dir": str(out / "run"), "max_steps": max_steps,
        "save_every": 5, "log_every": 1, "progress": True, "gradient_checkpointing": False, "freeze": ["llm"],
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "grpo": {"prompts": str(prompts), "reward": "harmon.shapes.reward:ShapesReward", "prompts_per_step": 4,
                 "group_size": 8, "reverse_steps": 4, "updates": 1, "clip": 0.2, "kl": 0.0,
                 "generation": {"num_steps": 20}},
    })
    result = train(cfg)
    print(f"reached step {result.steps}; model: {result.final_dir}")


if __name__ == "__main__":
    main()
