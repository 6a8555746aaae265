"""The understanding half of the shapes evaluation: questions about freshly rendered scenes, answered greedily
by :class:`~harmon.pipelines.ImageToTextPipeline` and compared after :func:`~.world.normalize_answer`.

The same scenes and questions feed ``harmon eval shapes`` and the lmms-eval task of :mod:`.lmms_task`.
"""
from __future__ import annotations

from typing import Any, Iterator

from PIL import Image

from ..pipelines import ImageToTextPipeline
from ..processing import IMAGE_TOKEN, chat_prompt
from ..settings import DecodingSettings
from . import world
from .eval_plan import DEFAULT_EVAL_SEED, ShapesEval
from .report import summarize_answers, summarize_by_scene_kind


def understanding_scenes(n_scenes: int, seed: int = DEFAULT_EVAL_SEED, image_size: int = world.DEFAULT_SIZE
                         ) -> Iterator[tuple[int, Image.Image, list[dict[str, Any]]]]:
    """The understanding evaluation's scenes: ``(j, image, questions)`` for scene j of the ``eval_scenes``
    stream, with one question of each applicable type (dicts of ``scene``, ``scene_kind``, ``type``,
    ``question``, ``expected``)."""
    for j in range(n_scenes):
        rng = world.make_rng(seed, "eval_scenes", j)
        scene = world.sample_scene(world.CATEGORIES[j % len(world.CATEGORIES)], rng, image_size)
        image = world.render(scene)
        kind = world.scene_kind(scene.objects)
        by_type: dict[str, list[dict[str, Any]]] = {}
        for q in world.questions(scene.objects, rng):
            by_type.setdefault(q["type"], []).append(q)
        chosen = []
        for qtype in world.QUESTION_TYPES:
            if qtype in by_type:
                q = by_type[qtype][int(rng.integers(len(by_type[qtype])))]
                chosen.append({"scene": j, "scene_kind": kind, "type": qtype, "question": q["question"],
                               "expected": q["answer"]})
        yield j, image, chosen


def answer_correct(predicted: str, expected: str) -> bool:
    """Exact match of two answers after :func:`~.world.normalize_answer`."""
    return world.normalize_answer(predicted) == world.normalize_answer(expected)


def answer(pipe: ImageToTextPipeline, image_embeds, question: str, settings: DecodingSettings) -> str:
    """The answer to one question about an already encoded image (1, N, H), as ``pipe(image, question,
    settings)`` gives it."""
    embeds = pipe.prompt_embeds(chat_prompt(f"{IMAGE_TOKEN}\n{question}"), image_embeds)
    ids = list(pipe.generate_ids(embeds, settings))
    return pipe.tokenizer.decode(ids, skip_special_tokens=True)


def understanding_results(model, tokenizer, plan: ShapesEval, image_size: int) -> dict[str, Any]:
    """Ask ``plan.scenes`` scenes of ``image_size`` px their questions: accuracy per question type, its mean,
    the split by kind of scene (``by_scene_kind``) and every item with its answer."""
    pipe = ImageToTextPipeline(model, tokenizer, image_size=image_size)
    decoding = DecodingSettings(max_new_tokens=plan.max_new_tokens)
    items = []
    for _, image, scene_questions in understanding_scenes(plan.scenes, plan.seed, image_size):
        embeds = pipe.image_embeds(image)  # encoded once, shared by the scene's questions
        for q in scene_questions:
            predicted = answer(pipe, embeds, q["question"], decoding)
            items.append({**q, "predicted": predicted, "correct": answer_correct(predicted, q["expected"])})
    types, oks = [i["type"] for i in items], [i["correct"] for i in items]
    und = summarize_answers(types, oks)
    und["by_scene_kind"] = summarize_by_scene_kind([i["scene_kind"] for i in items], types, oks)
    und["items"] = items
    return und
