"""Probe (issue 27, item 2): is an image drawn in a batch bit-identical to the same image drawn alone?

Measures, on this machine's CPU kernels (:mod:`harmon.batch_invariance` explains the causes):

1. matrix products: for which row counts a row of ``x @ W.T`` equals the same row in a product of 256 rows;
2. text to image: each image of a batch of prompts of different lengths (per-image seeds) against the same
   prompt and seed drawn alone, latents and decoded pixels, ``torch.equal``: as the code is, then with the
   row padding off (``MIN_ROWS = 0``), then with the VAE decoding the whole batch at once;
3. the LLM pass over a prompt padded to a longer width than its own (what a batch did before
   ``PromptCaches``): the largest difference;
4. answers: greedy decoding's logits for one prompt alone (1 row) against the same prompt in a batch of 3,
   and whether the greedy tokens still agree.

    .venv/bin/python scripts/probes/batch_exactness.py [MODEL] [--quick]

MODEL: a model folder (default: the shipped model). ``--quick``: 4 MAR iterations of 10 diffusion steps.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache

from harmon import batch_invariance
from harmon.hub import load_pretrained
from harmon.models import diffusion_head
from harmon.models.harmon import context_mask_and_positions
from harmon.pipelines import ImageToTextPipeline, TextToImagePipeline
from harmon.pipelines.text_to_image import generation_prompts
from harmon.processing import IMAGE_TOKEN, chat_prompt
from harmon.settings import GenerationSettings

PROMPTS = ["a red circle", "two green triangles on the left of a big blue square", "a yellow square",
           "a purple circle above an orange triangle"]


def gemm_rows() -> list[int]:
    """Row counts (1..40) for which a product's rows differ from the same rows in a 256-row product."""
    gen = torch.Generator().manual_seed(0)
    differ = set()
    for k, n in ((8, 128), (256, 256), (256, 768), (768, 256), (1536, 1536)):
        w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        x = torch.randn(256, k, generator=gen)
        full = F.linear(x, w, b)
        differ |= {m for m in range(1, 41) if not torch.equal(F.linear(x[:m].clone(), w, b), full[:m])}
    return sorted(differ)


def compare_images(pipe: TextToImagePipeline, settings: GenerationSettings, label: str) -> None:
    """Each prompt of PROMPTS in one batch against itself alone (seed 100 + i): latents and pixels."""
    seeds = [100 + i for i in range(len(PROMPTS))]
    batch = pipe(PROMPTS, settings, seeds=seeds, output_type="pt", progress=False).images
    alone = [pipe(p, settings, seeds=[s], output_type="pt", progress=False).images[0] for p, s in zip(PROMPTS, seeds)]
    equal = [torch.equal(batch[i], a) for i, a in enumerate(alone)]
    worst = max(float((batch[i] - a).abs().max()) for i, a in enumerate(alone))
    print(f"  {label}: images equal alone/batch {equal}, largest pixel difference {worst:.3g} (of [-1, 1])")


def padded_prompt_difference(pipe: TextToImagePipeline) -> float:
    """The LLM pass of one iteration over a prompt at its own width and padded 7 tokens longer."""
    model = pipe.model
    settings = GenerationSettings().resolve(model.config)
    ids, mask = generation_prompts(pipe.tokenizer, pipe.pad_id, PROMPTS[:1], settings, model.config)
    longer = torch.cat([ids, ids.new_full((ids.shape[0], 7), pipe.pad_id)], dim=1)
    longer_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 7)], dim=1)
    z = torch.randn(ids.shape[0], model.buffer_size + 5, model.config.llm_hidden_size,
                    generator=torch.Generator().manual_seed(1))
    outs = []
    for i, m in ((ids, mask), (longer, longer_mask)):
        embeds = model.llm.get_input_embeddings()(i)
        full_mask, positions = context_mask_and_positions(m, z.shape[1])
        out = model.llm.model(inputs_embeds=torch.cat([embeds, z], dim=1), attention_mask=full_mask,
                              position_ids=positions, use_cache=False).last_hidden_state[:, -z.shape[1]:]
        outs.append(out)
    return float((outs[0] - outs[1]).abs().max())


def answer_logits(model, tokenizer) -> None:
    """Greedy decoding of one question about a grey image alone (1 row) and in a batch of 3 equal prompts."""
    pipe = ImageToTextPipeline(model, tokenizer)
    embeds = pipe.prompt_embeds(chat_prompt(f"{IMAGE_TOKEN}\nWhat is in the image?"),
                                pipe.image_embeds(Image.new("RGB", (64, 64), (120, 130, 140))))  # (1, T, H)
    worst = 0.0
    rows = {1: embeds, 3: embeds.expand(3, -1, -1).contiguous()}
    tokens = {}
    for count, e in rows.items():
        cache = DynamicCache(config=model.llm.config)
        out = model.llm(inputs_embeds=e, cache=cache, use_cache=True, logits_to_keep=1)
        seq, logits = [], [out.logits[:, -1].float()]
        for _ in range(12):
            token = logits[-1][0].argmax()
            seq.append(int(token))
            out = model.llm(input_ids=token.view(1, 1).expand(count, 1), cache=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
        tokens[count] = (seq, logits)
    for a, b in zip(tokens[1][1], tokens[3][1]):
        worst = max(worst, float((a[0] - b[0]).abs().max()))
    agree = tokens[1][0] == tokens[3][0]
    print(f"4. answers: logits of 1 row vs the same row among 3: largest difference {worst:.3g} "
          f"(prefill {float((tokens[1][1][0][0] - tokens[3][1][0][0]).abs().max()):.3g}); "
          f"greedy tokens agree: {agree}")


@torch.no_grad()
def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--quick"]
    quick = "--quick" in sys.argv
    model, tokenizer = load_pretrained(args[0] if args else None)
    pipe = TextToImagePipeline(model, tokenizer)
    settings = GenerationSettings(num_iter=4, num_steps=10) if quick else GenerationSettings()
    print(f"model {model.config.name}, torch threads {torch.get_num_threads()}, {settings}")
    print(f"1. row counts whose product rows differ from a 256-row product's: {gemm_rows()}")
    lengths = [len(tokenizer.encode(p)) for p in PROMPTS]
    print(f"2. text to image, prompts of {lengths} tokens:")
    for label, guidance in (("guided", settings.guidance_scale), ("unguided", 1.0)):
        compare_images(pipe, settings.replace(guidance_scale=guidance), f"{label}, as the code is")
    batch_invariance.MIN_ROWS = diffusion_head.MIN_ROWS = 0  # the row padding off (StableRows and the head)
    compare_images(pipe, settings, "guided, row padding off")
    batch_invariance.MIN_ROWS = diffusion_head.MIN_ROWS = 16
    decode = model.decode
    model.decode = lambda tokens, tile=None: decode(torch.cat([tokens] * 3), tile)[:1]  # in a batch of 3
    batch = pipe(PROMPTS[:1], settings, seeds=[100], output_type="pt", progress=False).images
    model.decode = decode
    alone = pipe(PROMPTS[:1], settings, seeds=[100], output_type="pt", progress=False).images
    print(f"  guided, VAE decoding a batch of 3: equal {torch.equal(batch, alone)}, "
          f"largest pixel difference {float((batch - alone).abs().max()):.3g}")
    print(f"3. LLM pass over a prompt padded 7 tokens longer: largest difference {padded_prompt_difference(pipe):.3g}")
    answer_logits(model, tokenizer)


if __name__ == "__main__":
    main()
