"""Harmon CPU benchmarks: text-to-image, image-to-text, achieved GFLOP/s against the measured
matmul peak, peak memory, and the loading-memory check. One command:

    .venv/bin/python benchmarks/run.py [--quick] [--out benchmarks/results.json]

Every model has random weights drawn from a seeded ``torch.Generator`` (never the global RNG)
and loaded with ``harmon.checkpoint.load_state_dict``. Each (model, dtype) runs in its own
subprocess, so its peak resident memory (``ru_maxrss``) is its own and every ratio
(component / total, achieved / peak GFLOP/s) is measured inside one process within seconds.
See benchmarks/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL_ITERS, FULL_STEPS = 64, 100  # the original's text-to-image schedule (MAR iterations, diffusion steps)
CFG = 3.0
VAE_CHECK_SIZE, VAE_CHECK_TILE = 1024, 32  # one large image, decoded whole and in 512-px tiles


# ============================================================================================
# helpers usable in every process
# ============================================================================================
def rss_now() -> int:
    """Current resident set size in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_peak() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_matmul_peak(reps: int = 10) -> dict[str, float]:
    """Best-of-``reps`` GFLOP/s of a 2048x2048 @ 2048x2048 matmul, float32 and bfloat16."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = 2048
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        for _ in range(3):
            a @ b
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 / best / 1e9
    return out


def init_tensor(name: str, shape: tuple[int, ...], g, dtype):
    """One random tensor: norms' weights 1, biases 0, VAE convs ~N(0, (0.5/sqrt(fan_in))^2), rest ~N(0, 0.02^2).

    Drawn directly in ``dtype`` so a bfloat16 model never exists in float32 as well.
    """
    import torch

    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if len(shape) == 1 and leaf == "weight" and ("norm" in parent or "ln" in parent):
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    std = 0.02
    if name.startswith("vae.") and len(shape) == 4:
        std = 0.5 / math.sqrt(shape[1] * shape[2] * shape[3])
    t = torch.randn(shape, generator=g, dtype=dtype)
    return t.mul_(std)


def random_state(config, dtype, seed: int = 0) -> dict:
    """A random state dict for ``config`` (tied lm_head left out), tensor by tensor from one generator."""
    import torch
    from harmon.checkpoint import TIED_KEY, expected_keys

    g = torch.Generator().manual_seed(seed)
    tied = bool(config.llm.get("tie_word_embeddings", False))
    return {k: init_tensor(k, shape, g, dtype) for k, shape in expected_keys(config).items()
            if not (tied and k == TIED_KEY)}


def build_model(config, dtype, seed: int = 0):
    from harmon.checkpoint import load_state_dict

    return load_state_dict(config, random_state(config, dtype, seed), device="cpu", dtype=dtype)


def weights_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers (the tied embedding counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def linear_weights(module) -> int:
    """Entries of all nn.Linear weights under ``module`` (= multiply-adds per token of its matmuls)."""
    from torch import nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


# ============================================================================================
# timers: forward pre/post hooks and instance-level method wrappers, with FLOPs from shapes
# ============================================================================================
class Timers:
    """Accumulates seconds, calls and FLOPs per component name."""

    def __init__(self):
        self.data: dict[str, dict[str, float]] = {}
        self.enabled = True
        self._hooks = []

    def add(self, name: str, seconds: float, flops: float) -> None:
        d = self.data.setdefault(name, {"seconds": 0.0, "calls": 0, "flops": 0.0})
        d["seconds"] += seconds
        d["calls"] += 1
        d["flops"] += flops

    def reset(self) -> None:
        self.data = {}

    def hook(self, module, name_fn, flops_fn) -> None:
        """Time ``module``'s forward; name_fn(args, kwargs) / flops_fn(args, kwargs, output)."""
        stack = []

        def pre(mod, args, kwargs):
            stack.append(time.perf_counter())

        def post(mod, args, kwargs, output):
            dt = time.perf_counter() - stack.pop()
            if self.enabled:
                self.add(name_fn(args, kwargs), dt, flops_fn(args, kwargs, output))

        self._hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._hooks.append(module.register_forward_hook(post, with_kwargs=True))

    def wrap(self, obj, attr: str, name: str, flops_fn) -> None:
        """Replace the bound method ``obj.attr`` by a timed one (on this instance only)."""
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if self.enabled:
                self.add(name, time.perf_counter() - t0, flops_fn(args, kwargs, out))
            return out

        setattr(obj, attr, timed)


def vit_flops(batch: int, tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    """ViT blocks: 2*(4D^2 + 2rD^2) per token per block (qkv, proj, fc1, fc2) + 4*n^2*D attention per block."""
    per_token = 4 * dim * dim + 2 * int(dim * mlp_ratio) * dim
    return depth * batch * (2 * per_token * tokens + 4 * tokens * tokens * dim)


def llm_flops(cfg: dict, batch: int, q: int, k: int) -> float:
    """Qwen2 layers: 2*P_layer per new token + 4*q*k*H attention per layer (SDPA computes the full q x k)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_token = 2 * h * h + 2 * h * kv + 3 * h * inter
    return layers * batch * (2 * per_token * q + 4 * q * k * h)


def install_timers(model, timers: Timers) -> None:
    """Per-component timing on one model (MAR encoder/decoder, LLM, projections, diffusion head, VAE)."""
    from torch import nn

    cfg = model.config
    mar, llm_cfg = cfg.mar, cfg.llm
    enc_d, dec_d, buf = mar.encoder_embed_dim, mar.decoder_embed_dim, mar.buffer_size

    def enc_flops(args, kwargs, out):
        b, n, _ = out.shape  # (B, buffer + visible, D_enc)
        tokens = args[0]
        return vit_flops(b, n, enc_d, mar.encoder_depth, mar.mlp_ratio) + 2 * tokens.shape[0] * tokens.shape[1] * \
            mar.token_embed_dim * enc_d

    def dec_flops(args, kwargs, out):
        x = args[0]
        b, n_in, _ = x.shape
        n = out.shape[1] + buf
        return vit_flops(b, n, dec_d, mar.decoder_depth, mar.mlp_ratio) + 2 * b * n_in * enc_d * dec_d

    timers.wrap(model.mar, "forward_mae_encoder", "mar_encoder", enc_flops)
    timers.wrap(model.mar, "forward_mae_decoder", "mar_decoder", dec_flops)

    proj_w = {"proj_in": linear_weights(model.proj_in), "proj_out": linear_weights(model.proj_out)}
    for name in ("proj_in", "proj_out"):
        timers.hook(getattr(model, name), lambda a, k: "projections",
                    lambda a, k, out, w=proj_w[name]: 2 * w * out.shape[0] * out.shape[1])

    # the Qwen2 trunk: prefill (input_ids) vs image-token passes (inputs_embeds) in text-to-image
    def llm_call_shape(args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        b, q = x.shape[0], x.shape[1]
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        return b, q, past

    shapes = []

    def trunk_pre(mod, args, kwargs):
        shapes.append(llm_call_shape(args, kwargs))

    timers._hooks.append(model.llm.model.register_forward_pre_hook(trunk_pre, with_kwargs=True))

    def trunk_flops(args, kwargs, out):
        b, q, past = shapes.pop()
        return llm_flops(llm_cfg, b, q, past + q)

    timers.hook(model.llm.model, lambda a, k: "llm_prefill" if k.get("input_ids") is not None else "llm",
                trunk_flops)

    net = model.mar.diffloss.net
    head_w = linear_weights(net)
    # forward_with_cfg calls self.forward directly (no hooks fire), so the method itself is wrapped
    timers.wrap(net, "forward", "diffusion_head", lambda a, k, out: 2 * head_w * out.shape[0])
    timers.wrap(model.mar.diffloss, "sample", "_diffusion_sample_total", lambda a, k, out: 0.0)

    # VAE: conv FLOPs 2*Cout*(Cin/groups)*kh*kw*Hout*Wout per image, counted while the VAE runs
    conv_flops = [0.0]

    def count_conv(mod, args, out):
        if isinstance(mod, nn.Conv2d):
            conv_flops[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * \
                mod.kernel_size[1]
        else:  # AttnBlock: q k^T and attn v over n = H*W positions of C channels
            b, c, hh, ww = args[0].shape
            conv_flops[0] += 4 * b * (hh * ww) ** 2 * c

    for m in model.vae.modules():
        if isinstance(m, nn.Conv2d) or type(m).__name__ == "AttnBlock":
            timers._hooks.append(m.register_forward_hook(count_conv))

    def vae_pre(mod, args):
        conv_flops[0] = 0.0

    for part, name in ((model.vae.decoder, "vae_decoder"), (model.vae.encoder, "vae_encoder")):
        timers._hooks.append(part.register_forward_pre_hook(vae_pre))
        timers.hook(part, lambda a, k, n=name: n, lambda a, k, out: conv_flops[0])


# ============================================================================================
# the worker: one (config, dtype) in its own process
# ============================================================================================
def prompt_batch(vocab: int, cond_len: int = 20, uncond_len: int = 12):
    """[cond; uncond] right-padded ids (2, T) and bool mask, like tokenize_prompts of two chat prompts."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(vocab, 1000), (2, cond_len), generator=g)
    mask = torch.ones(2, cond_len, dtype=torch.bool)
    mask[1, uncond_len:] = False
    ids[1, uncond_len:] = 0
    return ids, mask


def schedule(seq_len: int, num_iter: int) -> list[tuple[int, int]]:
    """(visible tokens before the step, tokens sampled at the step) for each MAR iteration."""
    from harmon.sampling import next_mask_len

    masked, out = seq_len, []
    for step in range(num_iter):
        mask_len = next_mask_len(seq_len, step, num_iter, masked)
        n = masked if step == num_iter - 1 else masked - mask_len
        out.append((seq_len - masked, n))
        masked = mask_len
    return out


def best_time(fn, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def summarize(timers: Timers, total: float, peak: float, exclude=("_",)) -> dict:
    comps = {}
    for name, d in sorted(timers.data.items()):
        gflop = d["flops"] / 1e9
        gflops = gflop / d["seconds"] if d["seconds"] > 0 and gflop > 0 else None
        comps[name] = {"seconds": d["seconds"], "calls": int(d["calls"]), "gflop": gflop, "gflops": gflops,
                       "pct_of_peak": 100 * gflops / peak if gflops else None,
                       "pct_of_total": 100 * d["seconds"] / total if total else None}
    return comps


def run_worker(spec: dict) -> dict:
    import torch

    from harmon.config import PRESETS
    from harmon.rng import SeededRNG
    from harmon.sampling import generate_latents
    from harmon.pipelines.image_to_text import decode_tokens

    torch.manual_seed(12345)  # nothing here uses the global RNG; set only so a stray use would be repeatable
    dtype = getattr(torch, spec["dtype"])
    res: dict = {"config": spec["config"], "dtype": spec["dtype"], "threads": torch.get_num_threads(),
                 "rss_after_import_bytes": rss_now(), "loadavg_start": os.getloadavg()}
    res["matmul_peak_gflops"] = measure_matmul_peak()
    peak = res["matmul_peak_gflops"][spec["dtype"]]

    config = PRESETS[spec["config"]]()
    t0 = time.perf_counter()
    model = build_model(config, dtype)
    res["build_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in model.parameters())
    res["weights_bytes"] = weights_bytes(model)
    res["rss_after_build_bytes"] = rss_now()
    parts = {"llm": model.llm, "mar_encoder": model.mar.encoder_blocks, "mar_decoder": model.mar.decoder_blocks,
             "diffusion_head": model.mar.diffloss.net, "vae": model.vae}
    res["params_by_part"] = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}

    timers = Timers()
    install_timers(model, timers)
    mar = config.mar
    px = spec["image_px"]
    h = w = px // mar.vae_stride
    ids, amask = prompt_batch(config.llm["vocab_size"])

    def t2i(num_iter, steps, seed=0):
        rng = SeededRNG.from_seeds([seed])
        tokens = generate_latents(model, ids, amask, rng, image_shape=(h, w), num_iter=num_iter, cfg=CFG,
                                  num_steps=steps)
        return model.decode(tokens)

    # ---- (a) text to image ------------------------------------------------------------------------
    timers.enabled = False
    t0 = time.perf_counter()
    generate_latents(model, ids, amask, SeededRNG.from_seeds([0]), image_shape=(h, w), num_iter=1, cfg=CFG,
                     num_steps="2")  # warm-up (num_steps="1" raises IndexError in diffusion.py)
    # of every kernel shape family except the VAE
    res["warmup_s"] = time.perf_counter() - t0
    timers.enabled = True
    best = None  # the machine is shared: repeat and keep the fastest whole run (its own breakdown)
    for _ in range(spec.get("repeats", 2)):
        timers.reset()
        t0 = time.perf_counter()
        image = t2i(spec["num_iter"], spec["num_steps"])
        total = time.perf_counter() - t0
        if best is None or total < best[0]:
            best = (total, {k: dict(v) for k, v in timers.data.items()})
    total, timers.data = best
    res["t2i_repeats"] = spec.get("repeats", 2)
    comps = summarize(timers, total, peak)
    sample_total = comps.pop("_diffusion_sample_total")["seconds"]
    head = comps["diffusion_head"]["seconds"]
    comps["diffusion_sampler_rest"] = {"seconds": sample_total - head, "calls": spec["num_iter"], "gflop": 0.0,
                                       "gflops": None, "pct_of_peak": None,
                                       "pct_of_total": 100 * (sample_total - head) / total}
    summed = sum(c["seconds"] for c in comps.values())
    comps["other (masking, noise, glue)"] = {"seconds": total - summed, "calls": 0, "gflop": 0.0, "gflops": None,
                                             "pct_of_peak": None, "pct_of_total": 100 * (total - summed) / total}
    tr = [comps[k] for k in ("mar_encoder", "llm_prefill", "llm", "projections", "mar_decoder", "diffusion_head")]
    tr_gflop, tr_s = sum(c["gflop"] for c in tr), sum(c["seconds"] for c in tr)
    res["t2i"] = {
        "image_px": px, "num_iter": spec["num_iter"], "num_steps": str(spec["num_steps"]), "cfg": CFG,
        "images": 1, "total_s": total, "sum_of_components_s": summed, "components": comps,
        "transformer_parts": {"gflop": tr_gflop, "seconds": tr_s, "gflops": tr_gflop / tr_s,
                              "pct_of_peak": 100 * tr_gflop / tr_s / peak},
        "image_finite": bool(torch.isfinite(image).all()),
    }

    # ---- extrapolation to the original's schedule (64 iterations x 100 steps) by probing each part ----
    if spec.get("extrapolate"):
        res["t2i"]["extrapolated"] = extrapolate(model, timers, comps, ids, amask, (h, w), spec, peak)

    # ---- (b) image to text --------------------------------------------------------------------------
    res["i2t"] = image_to_text(model, timers, config, spec, peak, decode_tokens)
    res["peak_rss_bytes"] = rss_peak()
    res["loadavg_end"] = os.getloadavg()
    res["matmul_peak_gflops_end"] = measure_matmul_peak()
    res["matmul_peak_gflops_best"] = {k: max(v, res["matmul_peak_gflops_end"][k])
                                      for k, v in res["matmul_peak_gflops"].items()}
    # "% peak" against the best peak this process saw (start or end): the hardware limit, not a busy moment
    ref = res["matmul_peak_gflops_best"][spec["dtype"]]
    for c in list(res["t2i"]["components"].values()) + [res["t2i"]["transformer_parts"]]:
        if c.get("gflops"):
            c["pct_of_peak"] = 100 * c["gflops"] / ref
    res["i2t"]["prefill_pct_of_peak"] = 100 * res["i2t"]["prefill_gflops"] / ref
    return res


def extrapolate(model, timers: Timers, comps: dict, ids, amask, grid, spec, peak) -> dict:
    """Seconds per image at 64 MAR iterations and 100 diffusion steps, from per-component probes.

    * MAR encoder (1 row) and LLM (2 rows, after the cached prompt) are timed at visible-token
      counts 0, L/2 and L-1 and interpolated linearly over the 64-iteration schedule;
    * the MAR decoder (fixed shape) takes its measured mean per call x 64;
    * the diffusion head net is timed at every distinct row count 2n of the schedule, x 100 steps;
      the sampler's own arithmetic takes its measured time per (row, step) of the reduced run;
    * the prompt prefill and the VAE decoder run once per image, as measured.
    Also measures the exact shortcuts' savings (one encoder pass, not two; cond-only diffusion state).
    """
    import torch

    from harmon.models.harmon import crop_cache

    h, w = grid
    seq_len = h * w
    c = model.token_dim
    dtype = model.dtype
    sched = schedule(seq_len, FULL_ITERS)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(1, h, w, c, generator=g).to(dtype)
    cache = model.prefill(ids)
    prefix = ids.shape[1]
    reps = spec.get("probe_reps", 3)
    timers.enabled = False

    probe_vis = sorted({0, seq_len // 2, seq_len - 1})
    net = model.mar.diffloss.net
    z_dim = model.config.mar.decoder_embed_dim
    probes = {}  # key -> zero-argument function; timed in rounds spread over time, best per key kept

    def add_visible_probes(v):
        mask = torch.ones(1, seq_len)
        mask[:, :v] = 0.0
        tok2, mask2 = tokens.expand(2, -1, -1, -1).contiguous(), mask.expand(2, -1).contiguous()
        x_enc, z_enc = model.extract_visual_feature(tok2, mask2)

        def llm_pass():
            model.llm_residual(x_enc, z_enc, amask, cache=cache)
            crop_cache(cache, prefix)

        probes[("enc1", v)] = lambda: model.extract_visual_feature(tokens, mask)
        probes[("enc2", v)] = lambda: model.extract_visual_feature(tok2, mask2)
        probes[("llm", v)] = llm_pass

    def add_head_probe(n):
        x = torch.randn(2 * n, c, generator=g)
        t = torch.full((2 * n,), 500, dtype=torch.long)
        z = torch.randn(2 * n, z_dim, generator=g).to(dtype)
        probes[("head", n)] = lambda: net(x, t, z)

    with torch.no_grad():
        for v in probe_vis:
            add_visible_probes(v)
        for n in sorted({n for _, n in sched}):
            add_head_probe(n)
        best = {k: math.inf for k in probes}
        for _ in range(reps):  # round-robin: a burst of load from other jobs hits one round, not every rep
            for k, fn in probes.items():
                best[k] = min(best[k], best_time(fn, 1 if k[0] != "head" else 3))
    enc1 = {v: best[("enc1", v)] for v in probe_vis}
    enc2 = {v: best[("enc2", v)] for v in probe_vis}
    llm = {v: best[("llm", v)] for v in probe_vis}
    head_n = {k[1]: t for k, t in best.items() if k[0] == "head"}

    def interp(table, v):
        xs = sorted(table)
        for a, b in zip(xs, xs[1:]):
            if a <= v <= b:
                return table[a] + (table[b] - table[a]) * (v - a) / (b - a)
        return table[xs[-1]]

    enc_full = sum(interp(enc1, v) for v, _ in sched)
    enc_pair = sum(interp(enc2, v) for v, _ in sched)
    llm_full = sum(interp(llm, v) for v, _ in sched)
    dec_call = comps["mar_decoder"]["seconds"] / comps["mar_decoder"]["calls"]
    dec_full = dec_call * FULL_ITERS

    head_full = sum(head_n[n] for _, n in sched) * FULL_STEPS
    reduced_steps = int(spec["num_steps"])
    rest_per_step_call = comps["diffusion_sampler_rest"]["seconds"] / (spec["num_iter"] * reduced_steps)
    sampler_full = rest_per_step_call * FULL_ITERS * FULL_STEPS  # elementwise arithmetic, ~ independent of rows here

    # the exact shortcut on the diffusion state: the original runs the reverse process on 2N rows
    # (cond + uncond twins); the net is called on 2N rows either way (forward_with_cfg feeds the
    # conditional half twice), so only the sampler's arithmetic and noise draws differ.
    diff = model.mar.diffloss
    proc = diff.sampling_process(str(FULL_STEPS))
    n_typ = max(1, round(sum(n for _, n in sched) / len(sched)))  # mean tokens per iteration (4 at L=256)
    zz = torch.randn(2 * n_typ, z_dim, generator=g).to(dtype)
    x_n = torch.randn(n_typ, c, generator=g)
    x_2n = torch.cat([x_n, x_n])
    xs = torch.randn(n_typ, c, generator=g)
    tt = torch.full((n_typ,), 500, dtype=torch.long)
    ours = orig = net_n = net_2n = math.inf
    with torch.no_grad():
        for _ in range(2):  # interleaved, best of 2 each
            ours = min(ours, best_time(lambda: diff.sample(zz, x_n, lambda: torch.randn(n_typ, c, generator=g),
                                                           cfg=CFG, num_steps=str(FULL_STEPS)), 1))
            orig = min(orig, best_time(lambda: proc.p_sample_loop(
                lambda x, tt_: net.forward_with_cfg(x, tt_, zz, CFG), x_2n,
                lambda: torch.randn(2 * n_typ, c, generator=g)), 1))
            net_n = min(net_n, best_time(lambda: net(xs, tt, zz[:n_typ]), 5))
            net_2n = min(net_2n, best_time(lambda: net(torch.cat([xs, xs]), torch.cat([tt, tt]), zz), 5))
    timers.enabled = True

    prefill = comps["llm_prefill"]["seconds"]
    vae = comps["vae_decoder"]["seconds"]
    parts = {"mar_encoder": enc_full, "llm": llm_full + prefill, "mar_decoder": dec_full, "diffusion_head": head_full,
             "diffusion_sampler_rest": sampler_full, "vae_decoder": vae}
    total = sum(parts.values())
    return {
        "num_iter": FULL_ITERS, "num_steps": str(FULL_STEPS), "image_px": h * model.config.mar.vae_stride,
        "seconds_per_image": total, "components_s": parts,
        "components_pct": {k: 100 * v / total for k, v in parts.items()},
        "probes": {"visible": probe_vis, "mar_encoder_1row_s": enc1, "mar_encoder_2rows_s": enc2,
                   "llm_2rows_s": llm, "mar_decoder_call_s": dec_call,
                   "head_net_s_by_tokens_per_iter": head_n},
        "exact_speedups": {
            "mar_encoder_once_s": enc_full, "mar_encoder_twice_s": enc_pair,
            "mar_encoder_saved_s": enc_pair - enc_full,
            "mar_encoder_saved_pct_of_image": 100 * (enc_pair - enc_full) / (total + enc_pair - enc_full),
            "head_tokens_per_iter": n_typ,
            "head_sample_cond_only_s_per_iter": ours, "head_sample_cond_uncond_s_per_iter": orig,
            "head_sample_saved_s_per_image": (orig - ours) * FULL_ITERS,
            "head_net_N_rows_s": net_n, "head_net_2N_rows_s": net_2n,
        },
    }


def image_to_text(model, timers: Timers, config, spec, peak, decode_tokens) -> dict:
    """Prefill for a 256-px image ((256/16)^2 + buffer visual tokens + ~20 text tokens) and greedy decoding."""
    import torch

    px = 256
    stride = config.mar.vae_stride
    n_vis = (px // stride) ** 2 + config.mar.buffer_size
    vocab = config.llm["vocab_size"]
    image_id = vocab - 1
    g = torch.Generator().manual_seed(2)
    pixels = (torch.rand(1, 3, px, px, generator=g) * 2 - 1).to(model.dtype)
    text = torch.randint(0, min(vocab - 1, 1000), (1, 20), generator=g)
    ids = torch.cat([text[:, :8], torch.full((1, n_vis), image_id), text[:, 8:]], dim=1)
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
            gen = decode_tokens(model, embeds, set(), max_new_tokens=spec["decode_tokens"])
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
        "image_px": px, "visual_tokens": n_vis, "prompt_tokens": prompt,
        "vae_encoder_s": t_vae, "mar_encoder_proj_s": t_visual, "llm_prefill_s": t_prefill,
        "time_to_first_token_s": t_vae + t_visual + t_prefill,
        "prefill_tokens_per_s": prompt / t_prefill,
        "prefill_gflops": pf_flops / t_prefill / 1e9, "prefill_pct_of_peak": 100 * pf_flops / t_prefill / 1e9 / peak,
        "decode_tokens": n + 1, "decode_steps_timed": n, "decode_s": t_decode, "decode_tokens_per_s": n / t_decode,
        "decode_gflops": dec_flops / t_decode / 1e9,
        "decode_weight_gbytes_per_s": n * (linear_weights(model.llm.model) + h * vocab) * model.dtype.itemsize
        / t_decode / 1e9,
    }


# ============================================================================================
# loading memory: stream a random bf16 checkpoint to disk, then load it in a fresh process
# ============================================================================================
SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float32": "F32"}


def write_checkpoint(config_name: str, folder: Path, dtype_name: str, layout: str = "ours", seed: int = 0) -> dict:
    """Write config.json + model.safetensors tensor by tensor (one tensor in memory at a time), in our layout
    (the tied head stored once) or the Hugging Face release's (its config.json, the head beside the embedding)."""
    import torch
    from harmon.checkpoint import EMBED_KEY, TIED_KEY, expected_keys
    from harmon.config import PRESETS
    from harmon.release import release_config

    config = PRESETS[config_name]()
    dtype = getattr(torch, dtype_name)
    shapes = {k: s for k, s in expected_keys(config).items()
              if layout == "release" or not (config.llm.get("tie_word_embeddings") and k == TIED_KEY)}
    header, offset = {"__metadata__": {"format": "pt", "model_type": "harmon"}}, 0
    for k, s in shapes.items():
        nbytes = math.prod(s) * dtype.itemsize
        header[k] = {"dtype": SAFETENSORS_DTYPES[dtype_name], "shape": list(s), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        embedding = None
        for k, s in shapes.items():
            t = embedding if k == TIED_KEY and embedding is not None else init_tensor(k, tuple(s), g, dtype).contiguous()
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            if k == EMBED_KEY and TIED_KEY in shapes:
                embedding = t  # the release stores the tied head: the same values again
            del t
    os.replace(tmp, folder / "model.safetensors")
    written = release_config(config, dtype_name) if layout == "release" else config.to_dict()
    (folder / "config.json").write_text(json.dumps(written, indent=1) + "\n")
    return {"write_s": time.perf_counter() - t0, "file_bytes": (folder / "model.safetensors").stat().st_size,
            "data_bytes": offset, "writer_peak_rss_bytes": rss_peak()}


def load_check(folder: str, dtype_name: str) -> dict:
    """In a fresh process: load_model(folder, dtype) and report peak RSS against the weights' size."""
    import torch

    import harmon.checkpoint as ckpt

    def rss_split() -> dict:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.split(":")[0] in ("RssAnon", "RssFile"):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
        return out

    base = rss_now()
    t0 = time.perf_counter()
    model = ckpt.load_model(folder, dtype=getattr(torch, dtype_name))
    dt = time.perf_counter() - t0
    wb = weights_bytes(model)
    peak_load, split_load = rss_peak(), rss_split()
    # load_model may leave the tensors memory-mapped from the file and not yet read: touch every
    # byte (as the first forward pass would) and measure again
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            float(t.sum())
    touch = time.perf_counter() - t0
    peak = rss_peak()
    return {"load_s": dt, "touch_all_weights_s": touch, "weights_bytes": wb, "rss_before_load_bytes": base,
            "peak_rss_after_load_bytes": peak_load, "rss_split_after_load_bytes": split_load,
            "peak_rss_bytes": peak, "rss_after_touch_bytes": rss_now(), "rss_split_after_touch_bytes": rss_split(),
            "peak_over_weights": peak / wb, "peak_minus_base_over_weights": (peak - base) / wb,
            "target_max_ratio": 1.2}


def vae_decode_check(size: int, tile: int, dtype_name: str) -> dict:
    """In a fresh process: decode one size x size image with the KL-16 VAE (random weights), whole (tile 0)
    or in tiles of ``tile`` latent cells, and report the time and the peak RSS it added."""
    import torch

    from harmon.config import harmon_0_5b
    from harmon.models.init import init_vae
    from harmon.models.vae import AutoencoderKL

    config = harmon_0_5b()
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        vae = AutoencoderKL(config.vae)
    init_vae(vae, g)
    vae = vae.to(dtype).eval()
    grid = size // config.mar.vae_stride
    latents = torch.randn(1, config.mar.vae_embed_dim, grid, grid, generator=g).to(dtype)
    base = rss_now()
    t0 = time.perf_counter()
    with torch.no_grad():
        image = vae.decode(latents) if tile == 0 else vae.decode_tiled(latents, tile)
    seconds = time.perf_counter() - t0
    return {"size": size, "tile": tile, "dtype": dtype_name, "seconds": seconds, "rss_before_bytes": base,
            "peak_rss_bytes": rss_peak(), "added_peak_bytes": rss_peak() - base,
            "image_bytes": image.numel() * image.element_size()}


# ============================================================================================
# the orchestrator
# ============================================================================================
def subprocess_json(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (other jobs on the machine?)", "wall_s": timeout}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "returncode": proc.returncode, "wall_s": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def machine_info() -> dict:
    import torch

    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0] if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if f" {f}" in flags]
    return {"cpu": model, "logical_cpus": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def jobs(quick: bool) -> list[dict]:
    red = {"image_px": 256, "num_iter": 2, "num_steps": "10", "decode_tokens": 16, "extrapolate": True}
    out = [{"config": "tiny", "dtype": "float32", "image_px": 64, "num_iter": 64, "num_steps": "10",
            "decode_tokens": 16, "extrapolate": False},
           {"config": "harmon-0.5b", "dtype": "bfloat16", **red},
           {"config": "harmon-0.5b", "dtype": "float32", **red, "extrapolate": False}]
    if not quick:
        out.append({"config": "harmon-1.5b", "dtype": "bfloat16", **red})
    return out


def fmt_s(x):
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def print_report(r: dict) -> None:
    gib = 2**30
    m = r["machine"]
    print(f"\nMachine: {m['cpu']}, {m['logical_cpus']} CPUs, ISA {' '.join(m['isa'])}, torch {m['torch']} "
          f"({m['torch_threads']} threads)")
    pk = r["matmul_peak_gflops"]
    print(f"2048x2048 matmul peak (orchestrator): {pk['float32']:.0f} GFLOP/s fp32, {pk['bfloat16']:.0f} bf16")
    for run in r["runs"]:
        if "error" in run:
            print(f"\n[{run['spec']['config']} {run['spec']['dtype']}] FAILED:\n{run['error']}")
            continue
        t = run["t2i"]
        pk = run["matmul_peak_gflops_best"][run["dtype"]]
        pk0, pk1 = run["matmul_peak_gflops"][run["dtype"]], run["matmul_peak_gflops_end"][run["dtype"]]
        print(f"\n== {run['config']} {run['dtype']}: {run['params'] / 1e6:.0f} M params, "
              f"{run['weights_bytes'] / gib:.2f} GiB weights, peak RSS {run['peak_rss_bytes'] / gib:.2f} GiB, "
              f"build {run['build_s']:.1f} s")
        print(f"{run['dtype']} matmul peak in this process: {pk0:.0f} GFLOP/s at start, {pk1:.0f} at end (% peak uses "
              f"{pk:.0f}); load average {run['loadavg_start'][0]:.1f} at start, {run['loadavg_end'][0]:.1f} at end")
        print(f"text-to-image, 1 image, {t['image_px']} px, {t['num_iter']} MAR iterations, {t['num_steps']} "
              f"diffusion steps, cfg {t['cfg']}: {t['total_s']:.2f} s (sum of components {t['sum_of_components_s']:.2f} s)")
        print(f"  {'component':30s} {'calls':>6s} {'seconds':>8s} {'% total':>8s} {'GFLOP':>9s} {'GFLOP/s':>8s} "
              f"{'% peak':>7s}")
        for name, c in t["components"].items():
            print(f"  {name:30s} {c['calls']:6d} {fmt_s(c['seconds']):>8s} {fmt(c['pct_of_total'], '.1f'):>8s} "
                  f"{fmt(c['gflop'] or None, '.1f'):>9s} {fmt(c['gflops']):>8s} {fmt(c['pct_of_peak'], '.1f'):>7s}")
        tp = t["transformer_parts"]
        print(f"  transformer parts together: {tp['gflop']:.1f} GFLOP in {tp['seconds']:.2f} s = "
              f"{tp['gflops']:.0f} GFLOP/s, {tp['pct_of_peak']:.1f}% of the {run['dtype']} matmul peak")
        if "extrapolated" in t:
            e = t["extrapolated"]
            print(f"  extrapolated to {e['num_iter']} iterations x {e['num_steps']} steps at {e['image_px']} px: "
                  f"{e['seconds_per_image']:.1f} s per image")
            print("    " + ", ".join(f"{k} {v:.1f} s ({e['components_pct'][k]:.0f}%)"
                                     for k, v in e["components_s"].items()))
            x = e["exact_speedups"]
            print(f"  exact shortcuts at the full schedule: MAR encoder once {x['mar_encoder_once_s']:.2f} s vs twice "
                  f"{x['mar_encoder_twice_s']:.2f} s (saves {x['mar_encoder_saved_s']:.2f} s, "
                  f"{x['mar_encoder_saved_pct_of_image']:.1f}% of an image); diffusion sampling per iteration "
                  f"({x['head_tokens_per_iter']} tokens, {e['num_steps']} steps) cond-only state "
                  f"{x['head_sample_cond_only_s_per_iter'] * 1e3:.0f} ms vs cond+uncond "
                  f"{x['head_sample_cond_uncond_s_per_iter'] * 1e3:.0f} ms; head net at N vs 2N rows "
                  f"{x['head_net_N_rows_s'] * 1e3:.2f} vs {x['head_net_2N_rows_s'] * 1e3:.2f} ms")
        i = run["i2t"]
        print(f"image-to-text, {i['image_px']} px image, {i['prompt_tokens']} prompt tokens ({i['visual_tokens']} "
              f"visual): VAE encoder {fmt_s(i['vae_encoder_s'])} s, MAR encoder+proj {fmt_s(i['mar_encoder_proj_s'])} s, "
              f"LLM prefill {fmt_s(i['llm_prefill_s'])} s ({i['prefill_tokens_per_s']:.0f} tok/s, "
              f"{i['prefill_gflops']:.0f} GFLOP/s = {i['prefill_pct_of_peak']:.1f}% peak); decode "
              f"{i['decode_tokens_per_s']:.1f} tok/s ({i['decode_steps_timed']} steps timed, greedy, "
              f"{i['decode_weight_gbytes_per_s']:.1f} GB/s of weights read)")
    lc = r.get("load_check")
    if lc:
        if "error" in lc:
            print(f"\nloading check FAILED:\n{lc['error']}")
        else:
            print(f"\nLoading {lc['config']} {lc['dtype']} with harmon.checkpoint.load_model in a fresh process: "
                  f"weights {lc['weights_bytes'] / gib:.2f} GiB, peak RSS {lc['peak_rss_bytes'] / gib:.2f} GiB = "
                  f"{lc['peak_over_weights']:.2f}x the weights ({lc['peak_minus_base_over_weights']:.2f}x above the "
                  f"{lc['rss_before_load_bytes'] / gib:.2f} GiB after imports; target <= 1.2x: "
                  f"{'PASS' if lc['peak_over_weights'] <= 1.2 else 'FAIL'}), measured after reading every weight once; "
                  f"load_model returned in {lc['load_s']:.1f} s with peak RSS {lc['peak_rss_after_load_bytes'] / gib:.2f} "
                  f"GiB (memory-mapped, not yet read), reading all weights took {lc['touch_all_weights_s']:.1f} s; "
                  f"after: {lc['rss_split_after_touch_bytes'].get('RssFile', 0) / gib:.2f} GiB file-backed, "
                  f"{lc['rss_split_after_touch_bytes'].get('RssAnon', 0) / gib:.2f} GiB anonymous")
    for v in r.get("vae_decode", []):
        if "error" in v:
            print(f"\nVAE decoding check FAILED:\n{v['error']}")
            continue
        how = "whole" if v["tile"] == 0 else f"in tiles of {v['tile']} latent cells ({v['tile'] * 16} px)"
        print(f"VAE (KL-16, random weights, {v['dtype']}) decoding one {v['size']} px image {how}: "
              f"{v['seconds']:.1f} s, peak RSS +{v['added_peak_bytes'] / gib:.2f} GiB")
    print(f"\nbenchmark wall time {r['wall_s']:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny + Harmon-0.5B only (load check on 0.5B)")
    p.add_argument("--out", default=str(HERE / "results.json"), help="JSON results file")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "harmon-bench"),
                   help="where the random-weight checkpoint for the loading check is written (reused if present)")
    p.add_argument("--no-load-check", action="store_true")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per model subprocess")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", nargs="+", help=argparse.SUPPRESS)  # NAME DIR DTYPE [LAYOUT]
    p.add_argument("--load-check", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--vae-check", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if args.write_checkpoint:
        name, folder, *rest = args.write_checkpoint
        print(json.dumps(write_checkpoint(name, Path(folder), *rest)))
        return 0
    if args.load_check:
        print(json.dumps(load_check(*args.load_check)))
        return 0
    if args.vae_check:
        size, tile, dtype_name = args.vae_check
        print(json.dumps(vae_decode_check(int(size), int(tile), dtype_name)))
        return 0

    t_start = time.perf_counter()
    r = {"machine": machine_info(), "command": " ".join([Path(sys.executable).name] + sys.argv),
         "matmul_peak_gflops": measure_matmul_peak(), "runs": []}
    for spec in jobs(args.quick):
        print(f"running {spec['config']} {spec['dtype']} ...", file=sys.stderr, flush=True)
        out = subprocess_json(["--worker", json.dumps(spec)], timeout=args.timeout)
        out["spec"] = spec
        r["runs"].append(out)
    if not args.no_load_check:
        name = "harmon-0.5b" if args.quick else "harmon-1.5b"
        folder = Path(args.cache_dir) / f"{name}-random-bfloat16"
        print(f"loading check {name} bfloat16 ({folder}) ...", file=sys.stderr, flush=True)
        lc = {"config": name, "dtype": "bfloat16", "folder": str(folder)}
        if not (folder / "model.safetensors").is_file():
            lc["writer"] = subprocess_json(["--write-checkpoint", name, str(folder), "bfloat16"], timeout=600)
        lc.update(subprocess_json(["--load-check", str(folder), "bfloat16"], timeout=600))
        r["load_check"] = lc
    r["vae_decode"] = []
    for tile in (0, VAE_CHECK_TILE):
        print(f"VAE decoding {VAE_CHECK_SIZE} px, {'whole' if tile == 0 else f'tiles of {tile} cells'} ...",
              file=sys.stderr, flush=True)
        r["vae_decode"].append(subprocess_json(["--vae-check", str(VAE_CHECK_SIZE), str(tile), "float32"],
                                               timeout=600))
    r["matmul_peak_gflops_end"] = measure_matmul_peak()
    r["wall_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1, default=str) + "\n")
    print_report(r)
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
