"""Text-to-image and image-to-text pipelines on the tiny reference model with the byte-level tokenizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.errors import InputError
from harmon.pipelines import ChatSession, ImageToTextPipeline, TextToImagePipeline
from harmon.processing import chat_prompt, load_image, pad_to_square, understanding_input
from harmon.settings import DecodingSettings, GenerationSettings
from harmon.tokenizer import build_byte_tokenizer

FAST = GenerationSettings(num_iter=3, num_steps=3, height=64)
SETTING_NAMES = set(GenerationSettings.__dataclass_fields__)


def tokens(n: int) -> DecodingSettings:
    """Greedy decoding of at most ``n`` tokens."""
    return DecodingSettings(max_new_tokens=n)


@pytest.fixture(scope="module")
def t2i(reference_model):
    return TextToImagePipeline(reference_model, build_byte_tokenizer())


@pytest.fixture(scope="module")
def i2t(reference_model):
    return ImageToTextPipeline(reference_model, build_byte_tokenizer(), image_size=64)


@pytest.fixture()
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (40, 72, 3), dtype=np.uint8)).save(path)
    return path


def test_text_to_image_shapes_and_types(t2i):
    out = t2i(["a red circle", "a blue square"], FAST, num_images_per_prompt=2, seeds=[1, 2, 3, 4], progress=False)
    assert len(out.images) == 4 and all(im.size == (64, 64) and im.mode == "RGB" for im in out.images)
    assert out.seeds == [1, 2, 3, 4] and out.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    wide = t2i("a red circle", FAST.replace(width=96), seeds=[5], output_type="pt", progress=False)
    assert wide.images.shape == (1, 3, 64, 96)
    # the settings used, resolved: nothing left to the model's defaults
    assert wide.settings == GenerationSettings(num_iter=3, num_steps="3", height=64, width=96)
    assert wide.settings.guidance_scale == 3.0 and wide.settings.num_steps == "3"


def test_same_seed_same_image_alone_or_in_batch(t2i):
    batch = t2i(["a red circle", "two green triangles in a row"], FAST, seeds=[7, 8], output_type="pt",
                progress=False).images
    alone = t2i("two green triangles in a row", FAST, seeds=[8], output_type="pt", progress=False).images
    torch.testing.assert_close(batch[1:], alone, atol=2e-3, rtol=0)
    again = t2i("two green triangles in a row", FAST, generator=[torch.Generator().manual_seed(8)],
                output_type="pt", progress=False).images
    assert torch.equal(again, alone)


def test_one_generator_draws_reproducible_seeds(t2i):
    first = t2i("a circle", FAST, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
                progress=False)
    second = t2i("a circle", FAST, num_images_per_prompt=2, generator=torch.Generator().manual_seed(3),
                 progress=False)
    assert first.seeds == second.seeds and first.seeds[0] != first.seeds[1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first.images, second.images))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "empty"),
    (dict(prompt="   "), "empty"),
    (dict(prompt=[]), "no prompt"),
    (dict(prompt="x", height=50), "multiple of 16"),
    (dict(prompt="x", height=0), "height must be a positive"),
    (dict(prompt="x", guidance_scale=0.5), "guidance_scale"),
    (dict(prompt="x", temperature=0.0), "temperature"),
    (dict(prompt="x", num_iter=0), "num_iter"),
    (dict(prompt="x", num_steps="abc"), "num_steps"),
    (dict(prompt="x", num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompt="x", seeds=[1, 2]), "2 seeds for 1 images"),
    (dict(prompt="x", generator=[torch.Generator(), torch.Generator()]), "one per image"),
    (dict(prompt="x" * 3000), "exceeds"),
])
def test_text_to_image_rejects_bad_input(t2i, kwargs, message):
    changes = {k: v for k, v in kwargs.items() if k in SETTING_NAMES}
    call = {k: v for k, v in kwargs.items() if k not in SETTING_NAMES and k != "prompt"}
    with pytest.raises(InputError, match=message):  # a bad setting is refused as the settings are made
        t2i(kwargs["prompt"], FAST.replace(**changes), progress=False, **call)


def test_image_to_text_greedy_stream_and_batch(i2t, photo):
    answer = i2t(photo, "What is in the image?", tokens(6))
    pieces = list(i2t.stream(photo, "What is in the image?", tokens(6)))
    assert "".join(pieces) == answer and len(pieces) >= 1
    assert i2t([photo, Image.open(photo)], "What is in the image?", tokens(6)) == [answer, answer]


def test_image_to_text_sampling_uses_only_the_generator(i2t, photo):
    state = torch.random.get_rng_state()
    sampled = DecodingSettings(max_new_tokens=8, do_sample=True, temperature=1.5)
    runs = [i2t(photo, "Describe it.", sampled, generator=torch.Generator().manual_seed(4)) for _ in range(2)]
    assert runs[0] == runs[1]
    assert torch.equal(torch.random.get_rng_state(), state)


def test_understanding_matches_manual_path(i2t, reference_model, photo):
    """The pipeline's prompt = the reference flow: padded image, <image> expanded, chat template."""
    embeds = i2t.image_embeds(photo)
    assert embeds.shape == (1, 4 * 4 + reference_model.buffer_size, 64)
    pixels = understanding_input(load_image(photo), 64)
    manual = reference_model.extract_visual_feature(reference_model.encode(pixels))[1]
    torch.testing.assert_close(embeds, manual)
    padded = pad_to_square(Image.open(photo).convert("RGB"))
    assert padded.size == (72, 72) and padded.getpixel((0, 0)) == (127, 127, 127)


def test_chat_keeps_the_conversation(i2t, photo):
    session = ChatSession(i2t, photo)
    first = session.ask("What is it?", tokens(4))
    text = session.conversation("And its colour?")
    assert text.startswith(chat_prompt("<image>\nWhat is it?") + first + "<|im_end|>\n")
    assert text.endswith(chat_prompt("And its colour?")) and text.count("<image>") == 1
    streamed = []
    second = session.ask("And its colour?", tokens(4), on_text=streamed.append)
    assert "".join(streamed) == second and len(session.history) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(question=""), "empty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_image_to_text_rejects_bad_input(i2t, photo, kwargs, message):
    question = kwargs.pop("question", "What?")
    with pytest.raises(InputError, match=message):  # a bad setting is refused as the settings are made
        i2t(photo, question, DecodingSettings(**kwargs))


def test_unreadable_images_are_named(i2t, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        i2t(tmp_path / "missing.png", "What?")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        i2t(broken, "What?")


def test_fast_mode_and_step_schedules(t2i):
    fast = t2i("a red circle", GenerationSettings(fast=True, height=64), seeds=[1], progress=False)
    assert fast.settings.num_iter == 32 and fast.settings.fast is True
    steps = fast.settings.num_steps  # one respacing per MAR iteration, annealed
    assert len(steps) == 32 and steps[0] == "50" and steps[-1] == "5"
    listed = t2i("a red circle", GenerationSettings(num_iter=3, num_steps=[4, 3, 2], height=64), seeds=[1],
                 progress=False)
    assert listed.settings.num_steps == ("4", "3", "2")
    with pytest.raises(InputError, match="3 diffusion step counts for 2"):
        t2i("a red circle", GenerationSettings(num_iter=2, num_steps=[4, 3, 2], height=64), seeds=[1],
            progress=False)


def test_answers_drawn_together_are_those_drawn_alone():
    """answer_batch (left-padded prompts of different lengths, one LLM batch) on the shipped model, which
    answers shapes questions with words of its own: the same answer as each question asked alone."""
    from harmon.shapes.eval_understanding import understanding_scenes

    pipe = ImageToTextPipeline.from_pretrained(None, image_size=64)
    images, questions = [], []
    for _, image, scene_questions in understanding_scenes(4):
        for q in scene_questions:
            images.append(image)
            questions.append(q["question"])
    assert len({len(q) for q in questions}) > 3  # prompts of several lengths: the left padding is exercised
    alone = [pipe(image, question, tokens(24)) for image, question in zip(images, questions)]
    together = pipe.answer_batch(images, questions, tokens(24))
    assert together == alone and len(set(alone)) > 3
    short = pipe.answer_batch(images[:3], questions[:3], tokens(1))  # one token at most, each
    assert all(len(pipe.tokenizer.encode(a, add_special_tokens=False)) <= 1 for a in short)
    with pytest.raises(ValueError, match="one question per image"):
        pipe.answer_batch(images[:2], questions[:1])
