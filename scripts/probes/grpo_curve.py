"""The reward curve of a GRPO run: a PNG and a table from its ``log.jsonl``.

Usage: python scripts/probes/grpo_curve.py RUN_DIR OUT.png [WINDOW] [STEP:SCORE ...]

Draws the mean training reward per step (grey) and its running mean over WINDOW steps (default 25; black),
and prints the mean of every WINDOW steps, overall and per category (over the steps that drew the category;
a step's value is the mean of its images of it). STEP:SCORE pairs (e.g. ``0:0.124 100:0.15``) are drawn as
red dots on the same axis: the evaluation's scores of checkpoints, which count an image as right or wrong
where the reward gives partial credit, so they sit lower.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 320, 40


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values (fewer at the start) at each position."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def draw(rewards: list[float], window: int, scores: dict[int, float], out: Path) -> None:
    """The chart: steps on x (0 .. last step), reward 0..1 on y."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    pen = ImageDraw.Draw(image)
    last = max([len(rewards), *scores])

    def xy(step: float, value: float) -> tuple[float, float]:
        return (MARGIN + (WIDTH - 2 * MARGIN) * step / last, HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * value)

    pen.line([xy(0, 0), xy(last, 0)], fill="black")
    pen.line([xy(0, 0), xy(0, 1)], fill="black")
    for value in (0.25, 0.5, 0.75, 1.0):
        pen.line([xy(0, value), xy(last, value)], fill=(225, 225, 225))
        pen.text((4, xy(0, value)[1] - 6), f"{value:.2f}", fill="black")
    every = next(n for n in (5, 10, 25, 50, 100, 250, 500, 1000, last) if last // n <= 8)
    for step in range(0, last + 1, every):
        pen.text((xy(step, 0)[0] - 8, HEIGHT - MARGIN + 6), str(step), fill="black")
    pen.line([xy(i + 1, r) for i, r in enumerate(rewards)], fill=(190, 190, 190))
    pen.line([xy(i + 1, r) for i, r in enumerate(running_mean(rewards, window))], fill="black", width=2)
    for step, score in scores.items():
        x, y = xy(step, score)
        pen.ellipse([x - 4, y - 4, x + 4, y + 4], fill="red")
    pen.text((MARGIN + 8, 8), f"GRPO reward per step (grey), running mean of {window} (black); "
             "evaluation (red)", fill="black")
    image.save(out)


def score_point(text: str) -> tuple[int, float]:
    """``"100:0.15"`` -> (100, 0.15): a step >= 0 and a score in [0, 1]."""
    try:
        step, score = text.split(":")
        point = int(step), float(score)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give STEP:SCORE such as 100:0.15, not {text!r}") from None
    if point[0] < 0 or not 0 <= point[1] <= 1:
        raise argparse.ArgumentTypeError(f"a step >= 0 and a score in [0, 1], got {text!r}")
    return point


def main() -> None:
    p = argparse.ArgumentParser(description="The reward curve of a GRPO run (PNG and table).")
    p.add_argument("run", type=Path, help="the run's output_dir (holding log.jsonl)")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("window", type=int, nargs="?", default=25, help="steps per running mean and table row")
    p.add_argument("scores", type=score_point, nargs="*", metavar="STEP:SCORE", help="evaluation scores to mark")
    args = p.parse_args()
    if args.window < 1:
        p.error(f"the window must be at least 1 step, got {args.window}")
    if not (args.run / "log.jsonl").is_file():
        p.error(f"no log.jsonl in {args.run}")
    run, out, window, scores = args.run, args.out, args.window, dict(args.scores)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    if not records or any("reward" not in r for r in records):
        p.error(f"{run / 'log.jsonl'} is not the log of a GRPO run with at least one step (no reward)")
    rewards = [r["reward"] for r in records]
    draw(rewards, window, scores, out)
    categories = sorted({k.removeprefix("reward/") for r in records for k in r if k.startswith("reward/")})
    print("steps", "reward", *categories, sep=" | ")
    for end in range(window, len(records) + 1, window):
        part = records[end - window:end]
        per = []
        for c in categories:
            values = [r[f"reward/{c}"] for r in part if f"reward/{c}" in r]
            per.append(f"{sum(values) / len(values):.3f}" if values else "-")
        print(f"{end - window + 1}-{end}", f"{sum(r['reward'] for r in part) / window:.3f}", *per, sep=" | ")


if __name__ == "__main__":
    main()
