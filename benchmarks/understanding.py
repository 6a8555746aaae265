"""Image-to-text speed: a 256-px image's encoding, the LLM's prompt pass (prefill) and greedy decoding
through ``harmon.pipelines.image_to_text.decode_tokens``."""
from __future__ import annotations

import math
import time

from harness import linear_weights
from timers import Timers, llm_flops

IMAGE_PX = 256


def image_to_text(model, timers: Timers, spec: dict, peak: float) -> dict:
    """Prefill for a 256-px image ((256/16)^2 + buffer visual tokens + ~20 text tokens) and greedy decoding of
    ``spec["decode_tokens"]`` tokens (no stop ids, so exactly that many come out); the fastest of
    ``spec["repeats"]`` runs of each part."""
    import torch

    from harmon.pipelines.image_to_text import decode_tokens
    from harmon.settings import DecodingSettings

    config = model.config
    n_vis = (IMAGE_PX // config.mar.vae_stride) ** 2 + config.mar.buffer_size
    vocab = config.llm["vocab_size"]
    image_id = vocab - 1
    g = torch.Generator().manual_seed(2)
    pixels = (torch.rand(1, 3, IMAGE_PX, IMAGE_PX, generator=g) * 2 - 1).to(model.dtype)
    text = torch.randint(0, min(vocab - 1, 1000), (1, 20), generator=g)
    ids = torch.cat([text[:, :8], torch.full((1, n_vis), image_id), text[:, 8:]], dim=1)
    settings = DecodingSettings(max_new_tokens=spec["decode_tokens"])
    timers.reset()
    with torch.no_grad():
        model.encode(pixels[:, :, :64, :64])  # small warm-up of the VAE encoder kernels
        t_vae = t_visual = t_prefill = t_decode = math.inf
        for _ in range(spec.get("repeats", 2)):  # shared machine: the fastest of each part
            t0 = time.perf_counter()
            latents = model.encode(pixels)
            t_vae = min(t_vae, time.perf_counter() - t0)
            t0 = time.perf_counter()
            embeds = model.multimodal_embeds(ids, model.extract_visual_feature(latents)[1], image_id)
            t_visual = min(t_visual, time.perf_counter() - t0)
            gen = decode_tokens(model, embeds, set(), settings)
            t0 = time.perf_counter()
            next(gen)  # the prompt pass and the first token
            t_prefill = min(t_prefill, time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = sum(1 for _ in gen)  # one LLM step per further token
            t_decode = min(t_decode, time.perf_counter() - t0)
    h = config.llm["hidden_size"]
    prompt = ids.shape[1]
    pf_flops = llm_flops(config.llm, 1, prompt, prompt) + 2 * h * vocab
    dec_flops = sum(llm_flops(config.llm, 1, 1, prompt + i + 1) + 2 * h * vocab for i in range(n))
    return {
        "image_px": IMAGE_PX, "visual_tokens": n_vis, "prompt_tokens": prompt,
        "vae_encoder_s": t_vae, "mar_encoder_proj_s": t_visual, "llm_prefill_s": t_prefill,
        "time_to_first_token_s": t_vae + t_visual + t_prefill,
        "prefill_tokens_per_s": prompt / t_prefill,
        "prefill_gflops": pf_flops / t_prefill / 1e9, "prefill_pct_of_peak": 100 * pf_flops / t_prefill / 1e9 / peak,
        "decode_tokens": n + 1, "decode_steps_timed": n, "decode_s": t_decode, "decode_tokens_per_s": n / t_decode,
        "decode_gflops": dec_flops / t_decode / 1e9,
        "decode_weight_gbytes_per_s": n * (linear_weights(model.llm.model) + h * vocab) * model.dtype.itemsize
        / t_decode / 1e9,
    }
