"""The shapes world's reward for reward fine-tuning (``grpo.reward: harmon.shapes.reward:ShapesReward``)."""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from .detect import analyze, check, matching


class ShapesReward:
    """1.0 for an image the GenEval-style evaluator accepts (:func:`~harmon.shapes.detect.check`), else half
    the share of the prompt's objects that are there (each ``include`` item: matching detections over its
    count, at most 1), so that a group whose images all fail still ranks them. Records are
    :func:`~harmon.shapes.world.make_prompts` items; ``category`` is their GenEval tag."""

    def __call__(self, images: Sequence[Image.Image], records: Sequence[dict[str, Any]]) -> list[float]:
        return [self.score(image, record) for image, record in zip(images, records)]

    def score(self, image: Image.Image, record: dict[str, Any]) -> float:
        """The reward of one image for its prompt record."""
        detections = analyze(image)
        if check(record, detections)[0]:
            return 1.0
        include = record["include"]
        present = [min(len(matching(detections, item)), item.get("count", 1)) / item.get("count", 1)
                   for item in include]
        return 0.5 * sum(present) / len(present)

    def category(self, record: dict[str, Any]) -> str:
        return str(record.get("category") or record.get("tag") or "all")
