"""Inpainting, outpainting and variations: known tokens are kept exactly, only the others are generated."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.errors import InputError
from harmon.outputs import edit_details
from harmon.pipelines import EditPipeline, inpaint_region, outpaint_region, variation_region
from harmon.processing import image_to_tensor
from harmon.rng import SeededRNG
from harmon.sampling import generate_latents
from harmon.settings import GenerationSettings
from harmon.tokenizer import build_byte_tokenizer

FAST = GenerationSettings(num_iter=3, num_steps=3)


@pytest.fixture()
def photo():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(reference_model):
    return EditPipeline(reference_model, build_byte_tokenizer())


def _run(model, region, seed=0):
    """The latents an edit produces, and which tokens each step sampled."""
    tok = build_byte_tokenizer()
    from harmon.processing import GENERATION_PREFIX, UNCONDITIONAL_PROMPT, chat_prompt, tokenize_prompts

    ids, mask = tokenize_prompts(tok, [chat_prompt(GENERATION_PREFIX + "a red circle"),
                                       chat_prompt(UNCONDITIONAL_PROMPT)], tok.eos_token_id)
    known_tokens = model.encode(image_to_tensor(region.canvas, (region.canvas.height, region.canvas.width)))
    steps = []
    settings = FAST.replace(height=region.canvas.height, width=region.canvas.width)
    out = generate_latents(model, ids, mask, SeededRNG.from_seeds([seed]), settings,
                           known=(known_tokens, region.known.reshape(1, -1)),
                           callback=lambda s: steps.append(s.mask_to_pred.clone()))
    return out, known_tokens, steps


def test_inpainting_keeps_known_tokens_and_generates_only_the_rest(reference_model, photo):
    region = inpaint_region(photo, (16, 16, 48, 40))  # a box over tokens rows 1-2, cols 1-2
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True
    assert torch.equal(~region.known, expected)
    out, known_tokens, steps = _run(reference_model, region)
    known = region.known
    assert torch.equal(out[0][known], known_tokens[0][known])  # bit for bit
    predicted = torch.stack(steps).any(dim=0)[0].view(4, 4)
    assert torch.equal(predicted, ~known)
    assert int(torch.stack(steps).sum()) == int((~known).sum())  # each unknown token exactly once
    assert not torch.equal(out[0][~known], known_tokens[0][~known])


def test_mask_image_and_outpainting(reference_model, photo, tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 48:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    region = inpaint_region(photo, str(tmp_path / "mask.png"))
    assert int((~region.known).sum()) == 4 and bool((~region.known)[:, 3].all())

    wide = outpaint_region(photo, left=32, right=16)
    assert wide.canvas.size == (112, 64) and wide.known.shape == (4, 7)
    assert bool(wide.known[:, 2:6].all()) and not bool(wide.known[:, :2].any()) and not bool(wide.known[:, 6].any())
    out, known_tokens, _ = _run(reference_model, wide)
    assert out.shape == (1, 4, 7, 16) and torch.equal(out[0][wide.known], known_tokens[0][wide.known])


def test_variations_regenerate_the_requested_fraction(reference_model, photo):
    region = variation_region(photo, 0.25, torch.Generator().manual_seed(3))
    assert int((~region.known).sum()) == 4
    again = variation_region(photo, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(region.known, again.known)
    out, known_tokens, _ = _run(reference_model, region)
    assert torch.equal(out[0][region.known], known_tokens[0][region.known])


def test_edit_pipeline_is_seeded(pipe, photo):
    region = inpaint_region(photo, (0, 0, 32, 32))
    a = pipe(region, "a red circle", FAST, seed=5, output_type="pt")
    b = pipe(region, "a red circle", FAST, seed=5, output_type="pt")
    c = pipe(region, "a red circle", FAST, seed=6, output_type="pt")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.seeds == [5] and a.settings == FAST.replace(num_steps="3", height=64, width=64)  # at the canvas's size
    details = edit_details("inpaint", region)
    assert details["generated_tokens"] == 4 and details["known_tokens"] == 12
    assert pipe(region, "a red circle", FAST).images[0].size == (64, 64)


@pytest.mark.parametrize("make, message", [
    (lambda p: inpaint_region(p, (0, 0, 80, 10)), "not inside"),
    (lambda p: inpaint_region(p, Image.new("L", (64, 64), 0)), "selects nothing"),
    (lambda p: outpaint_region(p, left=10), "multiple of 16"),
    (lambda p: outpaint_region(p), "at least one margin"),
    (lambda p: variation_region(p, 0.0, torch.Generator()), "strength"),
])
def test_bad_edits_are_refused(photo, make, message):
    with pytest.raises(InputError, match=message):
        make(photo)


def test_known_masks_must_agree_across_the_batch(reference_model):
    ids = torch.full((2, 4), 5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    known = torch.zeros(2, 16, dtype=torch.bool)
    known[0, :3] = True
    with pytest.raises(InputError, match="same, non-zero number"):
        generate_latents(reference_model, ids, mask, SeededRNG.from_seeds([0, 1]),
                         GenerationSettings(height=64, guidance_scale=1.0), known=(torch.zeros(2, 4, 4, 16), known))


def test_edits_can_self_check(pipe, photo):
    """With self_check=k an edit keeps the best of k candidates, each over the same known tokens; the kept one is
    the edit drawn with its candidate seed."""
    region = inpaint_region(photo, (0, 0, 32, 32))
    out = pipe(region, "a red circle", FAST.replace(self_check=3), seed=5, output_type="pt")
    check = out.self_check[0]
    assert len(check.scores) == 3 and check.scores[check.chosen] == max(check.scores) and check.seeds[0] == 5
    alone = pipe(region, "a red circle", FAST, seed=check.seeds[check.chosen], output_type="pt")
    torch.testing.assert_close(out.images, alone.images, atol=2e-3, rtol=0)
