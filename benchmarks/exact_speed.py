"""Harmon-0.5B at the settings of the side-by-side measurement against the original (issue 27), split by part.

    python benchmarks/exact_speed.py [--dtype float32|bfloat16] [--device cpu|cuda] [--compile] [--out FILE.json]

Random weights with the real architecture (speed does not depend on the values). Text-to-image: one 256-px
image, 4 MAR iterations x 100 diffusion steps, guidance 3.0; image-to-text: one 512-px image, 20 greedy
tokens. For each part: seconds, GFLOP (multiply-add = 2), GFLOP/s and its share of this CPU's measured
2048 x 2048 matmul peak. The **floor** is the whole job's GFLOP at that peak: no implementation of the same
arithmetic finishes faster on this CPU, so ``original seconds / floor`` bounds the speed-up that an exact
(same-arithmetic) mode can reach against the original. The original is not a dependency, so its seconds
are the side-by-side figures of docs/performance.md (another machine): compare ratios, not seconds.

Also measured: the VAE in channels-last memory format (what ``AutoencoderKL`` runs now) against
channels-first (what it ran before, and the original), in the same process, alternating, with the largest
difference of their outputs. On a GPU (``--device cuda``) every clock reading waits for the device's queued
work, ``--compile`` compiles the diffusion head and MAR blocks first (``Harmon.compile_for_sampling``), and
the side-by-side lines (a CPU's) do not apply.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from harness import best_time, build_model, machine_info, measure_matmul_peak
from timers import Timers, install_timers, llm_flops

T2I = {"image_px": 256, "num_iter": 4, "num_steps": 100, "cfg": 3.0}
I2T = {"image_px": 512, "tokens": 20}
# The side-by-side machine (issue 27): an AMD EPYC (Zen 4) with 2 cores and avx512_bf16; one quiet run in float32
# of the original and of ours at the time; its matmul peak as shared/design/ENVIRONMENT.md gives it (GFLOP/s)
BASELINE = {"t2i": {"original_s": 45.4, "ours_then_s": 38.8}, "i2t": {"original_s": 20.5, "ours_then_s": 14.4},
            "peak_gflops": {"float32": 180.0, "bfloat16": 410.0}}


def text_to_image(model, timers: Timers) -> dict:
    """The per-part split of one guided image at :data:`T2I` (after a warm-up at the same settings, which also
    compiles what ``--compile`` asked for)."""
    import torch

    from generation import prompt_batch
    from harmon.rng import SeededRNG
    from harmon.sampling import generate_latents
    from harmon.settings import GenerationSettings

    ids, mask = (t.to(model.device) for t in prompt_batch(model.config.llm["vocab_size"]))
    settings = GenerationSettings(guidance_scale=T2I["cfg"], num_iter=T2I["num_iter"], num_steps=T2I["num_steps"],
                                  height=T2I["image_px"])
    with torch.no_grad():
        timers.enabled = False
        warm_up = settings if model.device.type != "cpu" else settings.replace(num_iter=1, num_steps="2")
        generate_latents(model, ids, mask, SeededRNG.from_seeds([0]), warm_up)
        timers.enabled = True
        timers.reset()
        timers.sync()
        t0 = time.perf_counter()
        model.decode(generate_latents(model, ids, mask, SeededRNG.from_seeds([0]), settings))
        timers.sync()
        total = time.perf_counter() - t0
    parts = {k: v for k, v in timers.data.items() if not k.startswith("_")}
    return {"total_s": total, "parts": parts}


def image_to_text(model, timers: Timers) -> dict:
    """The per-part split of one :data:`I2T` answer: VAE encoder, MAR encoder and projection, the prompt pass
    with the first token, and the other tokens (no stop ids, so exactly that many)."""
    import torch

    from harmon.pipelines.image_to_text import decode_tokens
    from harmon.settings import DecodingSettings

    config, px = model.config, I2T["image_px"]
    n_visual = (px // config.mar.vae_stride) ** 2 + config.mar.buffer_size
    vocab = config.llm["vocab_size"]
    g = torch.Generator().manual_seed(2)
    pixels = (torch.rand(1, 3, px, px, generator=g) * 2 - 1).to(model.device, model.dtype)
    text = torch.randint(0, 1000, (1, 20), generator=g)
    ids = torch.cat([text[:, :8], torch.full((1, n_visual), vocab - 1), text[:, 8:]], dim=1).to(model.device)
    clock = lambda: (timers.sync(), time.perf_counter())[1]  # noqa: E731
    with torch.no_grad():
        timers.enabled = False
        model.encode(pixels[:, :, :64, :64])
        timers.enabled = True
        timers.reset()
        t0 = clock()
        latents = model.encode(pixels)
        embeds = model.multimodal_embeds(ids, model.extract_visual_feature(latents)[1], vocab - 1)
        tokens = decode_tokens(model, embeds, set(), DecodingSettings(max_new_tokens=I2T["tokens"]))
        t1 = clock()
        next(tokens)
        t2 = clock()
        further = sum(1 for _ in tokens)
        t3 = clock()
    parts = {k: v for k, v in timers.data.items() if k in ("vae_encoder", "mar_encoder", "projections")}
    h, prompt = config.llm["hidden_size"], ids.shape[1]
    parts["llm_prefill"] = {"seconds": t2 - t1, "calls": 1,
                            "flops": llm_flops(config.llm, 1, prompt, prompt) + 2 * h * vocab}
    parts["llm_decoding"] = {"seconds": t3 - t2, "calls": further, "flops": sum(
        llm_flops(config.llm, 1, 1, prompt + i + 1) + 2 * h * vocab for i in range(further))}
    return {"total_s": t3 - t0, "parts": parts}


def vae_layouts(model, sync) -> dict:
    """Channels-first against channels-last: best of 2 alternating runs of the 512-px encoder and 256-px decoder."""
    import torch

    vae = model.vae
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(1, 3, 512, 512, generator=g) * 2 - 1).to(model.device, model.dtype)
    latents = torch.randn(1, vae.post_quant_conv.in_channels, 16, 16, generator=g).to(model.device, model.dtype)
    jobs = {
        "encoder_512px": (lambda: (vae.quant_conv(vae.encoder(pixels)), sync())[0],
                          lambda: (vae.encode(pixels).moments, sync())[0]),
        "decoder_256px": (lambda: (vae.decoder(vae.post_quant_conv(latents)), sync())[0],
                          lambda: (vae.decode(latents), sync())[0]),
    }
    out = {}
    with torch.no_grad():
        for name, (first, last) in jobs.items():
            a, b = first(), last()
            times = {"channels_first_s": math.inf, "channels_last_s": math.inf}
            for _ in range(2):
                times["channels_first_s"] = min(times["channels_first_s"], best_time(first, 1))
                times["channels_last_s"] = min(times["channels_last_s"], best_time(last, 1))
            out[name] = {**times, "speedup": times["channels_first_s"] / times["channels_last_s"],
                         "max_abs_difference": (a.float() - b.float()).abs().max().item(),
                         "max_abs_value": a.float().abs().max().item()}
    return out


def report(result: dict) -> None:
    peak = result["matmul_peak_gflops"]
    machine = result["machine"]
    device = machine.get("gpu", result["device"])
    print(f"{machine['cpu']} ({', '.join(machine['isa'])}), {machine['torch_threads']} threads; {device}, "
          f"{result['dtype']}{', compiled' if result['compile'] else ''}; matmul peak {peak:.0f} GFLOP/s")
    for job, title in (("t2i", "text-to-image, 256 px, 4 iterations x 100 steps, cfg 3"),
                       ("i2t", "image-to-text, 512 px, 20 tokens")):
        r = result[job]
        print(f"\n{title}: {r['total_s']:.1f} s")
        print(f"  {'part':<16}{'seconds':>9}{'share':>8}{'GFLOP':>9}{'GFLOP/s':>9}{'of peak':>9}")
        for name, p in sorted(r["parts"].items(), key=lambda kv: -kv[1]["seconds"]):
            gf = p["flops"] / 1e9
            print(f"  {name:<16}{p['seconds']:9.2f}{100 * p['seconds'] / r['total_s']:7.0f}%{gf:9.0f}"
                  f"{gf / p['seconds']:9.0f}{100 * gf / p['seconds'] / peak:8.0f}%")
        b, there = BASELINE[job], BASELINE["peak_gflops"][result["dtype"]]
        print(f"  all parts: {r['gflop']:.0f} GFLOP; at this device's matmul peak {r['floor_s']:.1f} s "
              f"({100 * r['floor_s'] / r['total_s']:.0f}% of the measured time)")
        if result["device"] == "cpu":
                print(f"  side-by-side machine: original {b['original_s']} s, ours then {b['ours_then_s']} s (float32); "
                  f"the same GFLOP at its {there:.0f} GFLOP/s peak take {r['gflop'] / there:.1f} s, so no exact "
                  f"mode beats the original by more than {b['original_s'] * there / r['gflop']:.2f}x there")
    print("\nVAE, channels-first -> channels-last (same process, best of 2 alternating):")
    for name, v in result["vae_layouts"].items():
        print(f"  {name}: {v['channels_first_s']:.2f} s -> {v['channels_last_s']:.2f} s ({v['speedup']:.2f}x); "
              f"largest difference {v['max_abs_difference']:.1e} (values up to {v['max_abs_value']:.2f})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the diffusion head and MAR blocks first")
    p.add_argument("--out", metavar="FILE.json", help="also write the results here")
    args = p.parse_args(argv)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        p.error(f"--out: no folder {Path(args.out).resolve().parent} to write {args.out} in")
    import torch

    from harmon.config import harmon_0_5b

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    peak = measure_matmul_peak(device=args.device)[args.dtype]
    model = build_model(harmon_0_5b(), dtype, device=args.device).eval()
    if args.compile:
        model.compile_for_sampling()
    timers = Timers(sync)
    install_timers(model, timers)
    result = {"machine": machine_info(), "device": args.device, "dtype": args.dtype, "compile": args.compile,
              "matmul_peak_gflops": peak, "t2i": text_to_image(model, timers), "i2t": image_to_text(model, timers)}
    if args.device == "cuda":
        result["machine"]["gpu"] = torch.cuda.get_device_name()
    timers.enabled = False
    result["vae_layouts"] = vae_layouts(model, timers.sync)
    for job in ("t2i", "i2t"):
        r = result[job]
        r["gflop"] = sum(p["flops"] for p in r["parts"].values()) / 1e9
        r["floor_s"] = r["gflop"] / peak
    report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
