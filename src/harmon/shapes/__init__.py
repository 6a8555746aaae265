"""The shapes world (SHAPES.md): synthetic scenes, training data writers, and a GenEval-style evaluator."""
from .datasets import write_datasets
from .evaluate import analyze, check, evaluate_model, score_image
from .world import (CATEGORIES, COLORS, PALETTE, QUESTION_TYPES, SHAPES, Obj, Scene, describe, make_prompts,
                    make_rng, questions, render, sample_scene)

__all__ = ["CATEGORIES", "COLORS", "PALETTE", "QUESTION_TYPES", "SHAPES", "Obj", "Scene", "analyze", "check",
           "describe", "evaluate_model", "make_prompts", "make_rng", "questions", "render", "sample_scene",
           "score_image", "write_datasets"]
