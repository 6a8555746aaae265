"""Self-check: questions derived from prompts, the model's scoring of its answers, and best-of-k generation."""
from __future__ import annotations

import pytest
import torch

from harmon.errors import InputError
from harmon.hub import load_pretrained
from harmon.pipelines import ImageToTextPipeline, TextToImagePipeline
from harmon.pipelines.self_check import CheckQuestion, SelfChecker, candidate_seeds, prompt_questions
from harmon.processing import IMAGE_TOKEN, chat_prompt
from harmon.rng import ReferenceRNG
from harmon.settings import GenerationSettings
from harmon.shapes import world
from harmon.tokenizer import build_byte_tokenizer

FAST = GenerationSettings(num_iter=2, num_steps=3, height=32)


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", [("How many circles are there?", "one"), ("What color is the circle?", "red")]),
    ("three blue squares", [("How many squares are there?", "three")]),
    ("a red circle and a blue circle", [("How many circles are there?", "two")]),
    ("A photo of two dogs, a box and a red car.", [("How many dogs are there?", "two"),
                                                   ("How many boxes are there?", "one"),
                                                   ("How many cars are there?", "one"),
                                                   ("What color is the car?", "red")]),
    ("a yellow triangle to the left of a green circle",
     [("How many triangles are there?", "one"), ("How many circles are there?", "one"),
      ("What color is the triangle?", "yellow"), ("What color is the circle?", "green"),
      ("Is the yellow triangle to the left of the green circle?", "yes")]),
    ("a cat on a sofa at  sunset.", [("Does the image show a cat on a sofa at sunset?", "yes")]),
    ("sunset", [("Does the image show sunset?", "yes")]),
])
def test_questions_follow_the_prompt(prompt, expected):
    assert prompt_questions(prompt) == [CheckQuestion(q, a) for q, a in expected]


def test_candidate_seeds_start_with_the_seed_and_are_reproducible():
    seeds = candidate_seeds(7, 8)
    assert seeds[0] == 7 and seeds == candidate_seeds(7, 8) and seeds[:3] == candidate_seeds(7, 3)
    assert len(set(seeds)) == 8 and all(0 <= s < 2**62 for s in seeds)
    assert candidate_seeds(8, 2)[1] != seeds[1] and candidate_seeds(-3, 2)[0] == -3


def test_score_is_the_answer_probability_of_a_whole_pass(reference_model):
    """The cached-prefix scoring equals log P(answer) read from one pass over the whole conversation."""
    pipe = ImageToTextPipeline(reference_model, build_byte_tokenizer(), image_size=32)
    image = world.render(world.Scene((world.Obj("circle", "red", 16, 16, 12),), 32))
    question = CheckQuestion("How many circles are there?", "one")
    embeds = pipe.image_embeds(image)
    conversation = chat_prompt(f"{IMAGE_TOKEN}\n{question.question}")
    expected = []
    for answer in ("one", "One"):
        whole = pipe.prompt_embeds(conversation + answer, embeds)  # (1, T, H)
        answer_len = len(pipe.tokenizer.encode(answer, add_special_tokens=False))
        with torch.no_grad():
            logits = reference_model.llm(inputs_embeds=whole).logits[0].float().log_softmax(-1)  # (T, V)
        ids = pipe.tokenizer.encode(answer, add_special_tokens=False)
        expected.append(sum(float(logits[-answer_len - 1 + j, t]) for j, t in enumerate(ids)))
    got = SelfChecker(pipe).score(image, [question])
    assert got == pytest.approx(float(torch.logsumexp(torch.tensor(expected, dtype=torch.float64), 0)), abs=1e-4)


def test_self_check_keeps_the_best_scored_candidate(reference_model):
    t2i = TextToImagePipeline(reference_model, build_byte_tokenizer())
    out = t2i(["a red circle", "two blue squares"], FAST.replace(self_check=3), seeds=[11, 12], output_type="pt",
              progress=False)
    assert out.images.shape == (2, 3, 32, 32) and out.seeds == [11, 12]
    for seed, check, image in zip([11, 12], out.self_check, out.images):
        assert check.seeds == candidate_seeds(seed, 3) and len(check.scores) == 3
        assert check.scores[check.chosen] == max(check.scores) and all(s < 0 for s in check.scores)
        assert check.metadata()["candidate_seed"] == check.seeds[check.chosen]
        alone = t2i(out.prompts[out.seeds.index(seed)], FAST, seeds=[check.seeds[check.chosen]], output_type="pt",
                    progress=False).images[0]
        torch.testing.assert_close(image, alone, atol=2e-3, rtol=0)  # the kept candidate, drawn by its seed
    plain = t2i("a red circle", FAST, seeds=[11], output_type="pt", progress=False)
    assert plain.self_check is None


@pytest.mark.parametrize("value", [0, 33, True, 2.0, "4"])
def test_self_check_counts_are_checked(value):
    with pytest.raises(InputError, match="self_check"):
        GenerationSettings(self_check=value)


def test_self_check_cannot_replay_the_original_stream(reference_model):
    t2i = TextToImagePipeline(reference_model, build_byte_tokenizer())
    with pytest.raises(InputError, match="ReferenceRNG"):
        t2i("a red circle", FAST.replace(self_check=2), generator=ReferenceRNG(0, 0), progress=False)


def test_the_shipped_model_prefers_the_drawing_that_matches():
    """The shipped shapes model, judging rendered scenes, ranks the faithful one first for each prompt."""
    model, tokenizer = load_pretrained(None)
    checker = SelfChecker(ImageToTextPipeline(model, tokenizer))
    red_circle = world.Scene((world.Obj("circle", "red", 32, 32, 20),))
    blue_square = world.Scene((world.Obj("square", "blue", 32, 32, 20),))
    two_circles = world.Scene((world.Obj("circle", "red", 18, 32, 14), world.Obj("circle", "red", 46, 32, 14)))
    empty = world.Scene(())
    images = [world.render(s) for s in (red_circle, blue_square, two_circles, empty)]
    for prompt, best in (("a red circle", 0), ("a blue square", 1), ("two red circles", 2)):
        scores = checker.scores(images, prompt)
        assert max(range(4), key=scores.__getitem__) == best, (prompt, scores)
