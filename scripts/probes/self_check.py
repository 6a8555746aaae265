"""Self-check on the shapes world: scores and costs for N = 1, 2, 4, 8 candidates from one set of draws.

Usage: OMP_NUM_THREADS=1 python scripts/probes/self_check.py [N_PROMPTS] [MODEL_DIR] [OUT_JSON]

For each of the evaluation's first N_PROMPTS prompts (``harmon eval shapes``' prompts and image seeds, so
candidate 0 is the image the evaluation draws), it draws the 8 candidates that ``--self-check 8`` draws
(``candidate_seeds``; their first N are those of ``--self-check N``), has the model score each (as
self-check does) and the GenEval-style evaluator judge each. Best-of-N by the model's scores gives the
self-check result for every N at once; "oracle" (any of the N correct) bounds what a perfect judge could
reach. Costs: seconds per drawn image and per judged image, measured here.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from harmon.hub import load_pretrained
from harmon.pipelines import ImageToTextPipeline, TextToImagePipeline
from harmon.pipelines.self_check import SelfChecker, candidate_seeds
from harmon.settings import GenerationSettings
from harmon.shapes.detect import score_image
from harmon.shapes.eval_generation import image_seeds, make_prompts_for_eval
from harmon.shapes.eval_plan import DEFAULT_EVAL_SEED
from harmon.shapes.report import summarize

COUNTS = (1, 2, 4, 8)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    model, tokenizer = load_pretrained(sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None)
    out = sys.argv[3] if len(sys.argv) > 3 else "self_check_probe.json"
    prompts = make_prompts_for_eval(n, DEFAULT_EVAL_SEED, model.config.image_size)
    seeds = [row[0] for row in image_seeds(DEFAULT_EVAL_SEED, n, 1)]
    pipe, checker = TextToImagePipeline(model, tokenizer), SelfChecker(ImageToTextPipeline(model, tokenizer))
    k = max(COUNTS)
    rows, draw_s, judge_s = [], 0.0, 0.0
    for i, (record, seed) in enumerate(zip(prompts, seeds)):
        started = time.perf_counter()
        images = pipe([record["prompt"]] * k, GenerationSettings(), seeds=candidate_seeds(seed, k), progress=False).images
        judged = time.perf_counter()
        scores = checker.scores(images, record["prompt"])
        draw_s, judge_s = draw_s + judged - started, judge_s + time.perf_counter() - judged
        correct = [score_image(record, image)["correct"] for image in images]
        rows.append({"prompt": record["prompt"], "category": record["category"], "seed": seed, "scores": scores,
                     "correct": correct})
        if (i + 1) % 10 == 0:
            print(f"{i + 1}/{n} prompts, {draw_s:.0f} s drawing, {judge_s:.0f} s judging", flush=True)
    report = {"n_prompts": n, "seconds_per_image": draw_s / (n * k), "seconds_per_judged_image": judge_s / (n * k),
              "by_count": {}}
    categories = [r["category"] for r in rows]
    for count in COUNTS:
        chosen = [r["correct"][int(np.argmax(r["scores"][:count]))] for r in rows]
        oracle = [any(r["correct"][:count]) for r in rows]
        first = [r["correct"][0] for r in rows]
        report["by_count"][count] = {
            "self_check": summarize(categories, chosen), "oracle": summarize(categories, oracle),
            "chosen_share": float(np.mean(chosen)), "plain_share": float(np.mean(first)),
            "standard_error": float(np.std(chosen) / np.sqrt(n)),
            "seconds_per_image": count * (report["seconds_per_image"] + report["seconds_per_judged_image"])
            if count > 1 else report["seconds_per_image"]}
        print(f"N={count}: self-check {report['by_count'][count]['self_check']['overall']:.3f} "
              f"oracle {report['by_count'][count]['oracle']['overall']:.3f}")
    report["rows"] = rows
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"draw {report['seconds_per_image']:.2f} s/image, judge {report['seconds_per_judged_image']:.3f} s/image; "
          f"written {out}")


if __name__ == "__main__":
    main()
