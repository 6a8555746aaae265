"""What the shapes evaluation asks of a model: how many prompts, images and scenes, drawn from which seed.

The seed fixes everything asked (prompts, image seeds, scenes and questions, through the evaluation streams
of :data:`~.world.STREAMS`, never the training one), so that two runs with the same plan ask the same.
How the images are drawn is the other half of a run: a :class:`~harmon.settings.GenerationSettings`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..validation import check_field_types

DEFAULT_EVAL_SEED = 20_250_001  # evaluation streams differ from the training stream whatever the seed
INPAINT_CATEGORIES = ("two_object", "position", "color_attr")  # the inpainting scenes' categories, in turn


@dataclass(frozen=True)
class ShapesEval:
    """The plan of one evaluation (checked when made).

    Generation: ``n_prompts`` prompts, ``images_per_prompt`` images each, drawn ``batch_size`` at a time.
    Understanding: ``n_scenes`` scenes (None: ``n_prompts``), one question of each applicable type, answers
    of at most ``max_new_tokens`` tokens. ``generation`` / ``understanding`` switch the halves on and off.
    """

    n_prompts: int = 200
    seed: int = DEFAULT_EVAL_SEED
    images_per_prompt: int = 1
    batch_size: int = 8
    n_scenes: int | None = None
    max_new_tokens: int = 48
    generation: bool = True
    understanding: bool = True

    def __post_init__(self):
        check_field_types(self, "")
        low = {"n_prompts": 1 if self.generation else 0, "seed": 0, "images_per_prompt": 1, "batch_size": 1,
               "n_scenes": 0, "max_new_tokens": 1}
        for name, minimum in low.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise InputError(f"{name} must be >= {minimum}, got {value}")

    @property
    def scenes(self) -> int:
        """How many scenes the understanding half asks about."""
        return self.n_prompts if self.n_scenes is None else self.n_scenes

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values under its own names."""
        return dataclasses.asdict(self)
