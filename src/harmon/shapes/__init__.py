"""The shapes world (SHAPES.md): synthetic scenes, training data writers, and a GenEval-style evaluator."""
from .datasets import write_datasets
from .detect import analyze, check, score_image
from .evaluate import ShapesEval, evaluate_inpainting, evaluate_model
from .world import (CATEGORIES, COLORS, PALETTE, QUESTION_TYPES, SHAPES, Obj, Scene, describe, make_prompts,
                    make_rng, questions, render, sample_scene)

__all__ = ["CATEGORIES", "COLORS", "PALETTE", "QUESTION_TYPES", "SHAPES", "Obj", "Scene", "ShapesEval", "analyze",
           "check", "describe", "evaluate_inpainting", "evaluate_model", "make_prompts", "make_rng", "questions",
           "render", "sample_scene", "score_image", "write_datasets"]
