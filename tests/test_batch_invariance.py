"""An image drawn in a batch is bit-identical to the same image drawn alone (harmon.batch_invariance): products
of few rows padded, one LLM pass per prompt width, the VAE decoding image by image."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harmon.batch_invariance import MIN_ROWS, StableRows, pad_rows
from harmon.pipelines import TextToImagePipeline
from harmon.settings import GenerationSettings
from harmon.tokenizer import build_byte_tokenizer

PROMPTS = ["a red circle", "two green triangles on the left of a big blue square", "a purple circle above a square"]


def test_stable_rows_computes_each_row_as_in_many_rows():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(64, 40, generator=gen)
    many = F.linear(x, w, b)  # (64, 96)
    with StableRows():
        for rows in range(1, 2 * MIN_ROWS):
            assert torch.equal(F.linear(x[:rows].clone(), w, b), many[:rows]), rows
        three_d = F.linear(x[:6].view(2, 3, 40), w)  # leading dimensions kept
        assert three_d.shape == (2, 3, 96) and torch.equal(three_d, F.linear(x, w)[:6].view(2, 3, 96))
        assert torch.equal(torch.relu(x), x.clamp(min=0))  # other operations unchanged
    assert pad_rows(x[:3], MIN_ROWS).shape == (MIN_ROWS, 40) and pad_rows(x, 8) is x


def _each_alone_equals_the_batch(pipe: TextToImagePipeline, settings: GenerationSettings) -> None:
    seeds = [11 + i for i in range(len(PROMPTS))]
    widths = {len(pipe.tokenizer.encode(p)) for p in PROMPTS}
    assert len(widths) == len(PROMPTS)  # right-padded to different widths in the batch
    batch = pipe(PROMPTS, settings, seeds=seeds, output_type="pt", progress=False).images
    for i, (prompt, seed) in enumerate(zip(PROMPTS, seeds)):
        alone = pipe(prompt, settings, seeds=[seed], output_type="pt", progress=False).images
        assert torch.equal(batch[i:i + 1], alone), (prompt, float((batch[i:i + 1] - alone).abs().max()))
    two = pipe(PROMPTS[0], settings, num_images_per_prompt=2, seeds=seeds[:2], output_type="pt", progress=False)
    assert torch.equal(two.images[:1], batch[:1]) and not torch.equal(two.images[0], two.images[1])


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_tiny_model_batch_equals_alone(reference_model, guidance):
    pipe = TextToImagePipeline(reference_model, build_byte_tokenizer())
    _each_alone_equals_the_batch(pipe, GenerationSettings(num_iter=4, num_steps=4, height=64, guidance_scale=guidance))


def test_shipped_model_batch_equals_alone():
    _each_alone_equals_the_batch(TextToImagePipeline.from_pretrained(), GenerationSettings(num_iter=4, num_steps=10))
