"""Reward fine-tuning of the shipped shapes model with the world's evaluator as reward (resumable).

Usage: OMP_NUM_THREADS=1 python scripts/probes/grpo_shapes.py OUT_DIR [MAX_STEPS] [LR]

Writes OUT_DIR/prompts.jsonl (2,000 GenEval-style records from the world's prompt sampler with a seed of
its own, so they are not the evaluation's draws; the grammar is small, so prompts recur) and runs
``harmon train`` on the config below (``OUT_DIR/run``); running it again resumes from the last
checkpoint. Only the MAR decoder and the diffusion head learn (LLM, MAR encoder and projections frozen),
so the model's answers stay the shipped model's. The rollouts draw at 20 diffusion steps (inference: 100)
to be affordable on a CPU. ``OUT_DIR/run/log.jsonl`` holds the reward per step and category
(``grpo_curve.py`` draws it); evaluate a checkpoint with ``harmon export-checkpoint OUT_DIR/run --step N
--out M`` and ``harmon eval shapes --no-understanding --model M``. Measured in docs/shapes.md ("Reward
fine-tuning (GRPO)").
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from harmon.hub import default_model_folder
from harmon.rng import derive_seed
from harmon.shapes import world
from harmon.train.config import TrainConfig
from harmon.train.trainer import train

PROMPT_SEED = derive_seed(0, 105)


def main() -> None:
    p = argparse.ArgumentParser(description="Reward fine-tuning of the shipped shapes model (resumable).")
    p.add_argument("out", type=Path)
    p.add_argument("max_steps", type=int, nargs="?", default=200)
    p.add_argument("lr", type=float, nargs="?", default=1e-4, help="constant learning rate (checked by TrainConfig)")
    args = p.parse_args()
    out, max_steps, lr = args.out, args.max_steps, args.lr
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        records = world.make_prompts(2000, PROMPT_SEED)
        prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = TrainConfig.from_dict({
        "model": str(default_model_folder()), "output_dir": str(out / "run"), "max_steps": max_steps,
        "save_every": 5, "log_every": 1, "progress": True, "gradient_checkpointing": False,
        "freeze": ["llm", "mar_encoder", "projections"],
        "optim": {"lr": lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
        "grpo": {"prompts": str(prompts), "reward": "harmon.shapes.reward:ShapesReward", "prompts_per_step": 4,
                 "group_size": 8, "reverse_steps": 4, "updates": 1, "clip": 0.2, "kl": 0.0,
                 "generation": {"num_steps": 20}},
    })
    result = train(cfg)
    print(f"reached step {result.steps}; model: {result.final_dir}")


if __name__ == "__main__":
    main()
