"""Filtered self-training (RAFT) of the shipped shapes model: fine-tune it on its own accepted images.

Usage: python scripts/probes/raft_shapes.py OUT [--prompts 1600] [--images-per-prompt 2] [--steps 100] [--lr 1e-4]

1. Draws ``images-per-prompt`` images for each of the first ``prompts`` prompts of the GRPO probe's stream
   (``world.make_prompts(N, derive_seed(0, 105))``, not the evaluation's draws) at 20 diffusion steps, 32 at a
   time, image seeds ``derive_seed(7, i)``; scores each with the world's evaluator; writes every score to
   ``OUT/all.jsonl`` and the accepted images (reward 1) to ``OUT/images`` and ``OUT/t2i.jsonl``. Skipped when
   ``OUT/t2i.jsonl`` exists.
2. Fine-tunes the shipped model on ``OUT/t2i.jsonl`` with the supervised text-to-image loss (``harmon train``:
   32 images a step, constant ``lr``, LLM, MAR encoder and projections frozen so that the answers stay the
   shipped model's) into ``OUT/run``; checkpoints every 25 steps (``OUT/run/final`` at the end).

Evaluate with ``harmon eval shapes --n 200 --no-understanding --model OUT/run/final``. Measured in
docs/shapes.md ("Reward fine-tuning (GRPO)").
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harmon.errors import InputError
from harmon.hub import default_model_folder
from harmon.pipelines import TextToImagePipeline
from harmon.rng import derive_seed
from harmon.settings import GenerationSettings
from harmon.shapes import world
from harmon.shapes.reward import ShapesReward
from harmon.train.config import TrainConfig
from harmon.train.trainer import train

PROMPT_SEED, IMAGE_STREAM, BATCH = derive_seed(0, 105), 7, 32


def draw_and_keep(out: Path, n_prompts: int, per_prompt: int) -> None:
    """Step 1: the accepted images of the shipped model for the probe's prompts, in the trainer's t2i format."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    pipe = TextToImagePipeline.from_pretrained(default_model_folder())
    settings, reward = GenerationSettings(num_steps=20), ShapesReward()
    jobs = [r for r in world.make_prompts(n_prompts, PROMPT_SEED) for _ in range(per_prompt)]
    kept, start = [], time.perf_counter()
    with open(out / "all.jsonl", "w", encoding="utf-8") as scores:
        for first in range(0, len(jobs), BATCH):
            batch = jobs[first:first + BATCH]
            seeds = [derive_seed(IMAGE_STREAM, i) for i in range(first, first + len(batch))]
            images = pipe([r["prompt"] for r in batch], settings, seeds=seeds, progress=False).images
            for record, image, score, seed in zip(batch, images, reward(images, batch), seeds):
                scores.write(json.dumps({"prompt": record["prompt"], "category": reward.category(record),
                                         "reward": score, "seed": seed}) + "\n")
                if score == 1.0:
                    path = f"images/{len(kept):06d}.png"
                    image.save(out / path)
                    kept.append({"image": path, "caption": record["prompt"]})
            print(f"{first + len(batch)} drawn, {len(kept)} accepted, {time.perf_counter() - start:.0f} s", flush=True)
    (out / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description="Fine-tune the shipped shapes model on its own accepted images.")
    p.add_argument("out", type=Path)
    p.add_argument("--prompts", type=int, default=1600)
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (checked by TrainConfig)")
    args = p.parse_args()
    if args.prompts < 1 or args.images_per_prompt < 1:
        p.error("--prompts and --images-per-prompt must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"{args.out} exists and is not a folder")
    try:
        cfg = TrainConfig.from_dict({
            "model": str(default_model_folder()), "output_dir": str(args.out / "run"), "max_steps": args.steps,
            "save_every": 25, "keep_checkpoints": 20, "log_every": 5, "progress": False,
            "gradient_checkpointing": False, "device": "cpu", "freeze": ["llm", "mar_encoder", "projections"],
            "data": {"jsonl": [str(args.out / "t2i.jsonl")], "image_size": 64, "t2i_batch_size": BATCH,
                     "i2t_batch_size": 0},
            "optim": {"lr": args.lr, "warmup_ratio": 0.0, "min_lr_ratio": 1.0},
        })
    except InputError as err:
        p.error(str(err))
    if not (args.out / "t2i.jsonl").is_file():
        draw_and_keep(args.out, args.prompts, args.images_per_prompt)
    if not (args.out / "t2i.jsonl").read_text(encoding="utf-8").strip():
        p.error(f"no image was accepted: {args.out / 't2i.jsonl'} is empty")
    print(f"model: {train(cfg).final_dir}")


if __name__ == "__main__":
    main()
