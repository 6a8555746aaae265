"""Per-component timing of a model: forward pre/post hooks and instance-level method wrappers, with the
FLOPs of each call counted from its shapes (multiply-add = 2 FLOPs)."""
from __future__ import annotations

import time

from harness import linear_weights


class Timers:
    """Accumulates seconds, calls and FLOPs per component name. ``sync`` (e.g. ``torch.cuda.synchronize``) is
    called before every clock reading, so that a device's queued work is counted where it was issued."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.data: dict[str, dict[str, float]] = {}
        self.enabled = True
        self._hooks = []

    def add(self, name: str, seconds: float, flops: float) -> None:
        """Count one call of ``name``."""
        d = self.data.setdefault(name, {"seconds": 0.0, "calls": 0, "flops": 0.0})
        d["seconds"] += seconds
        d["calls"] += 1
        d["flops"] += flops

    def reset(self) -> None:
        """Forget every count."""
        self.data = {}

    def keep(self, handle) -> None:
        """Hold a hook handle for as long as the timers live."""
        self._hooks.append(handle)

    def hook(self, module, name_fn, flops_fn) -> None:
        """Time ``module``'s forward; name_fn(args, kwargs) / flops_fn(args, kwargs, output)."""
        stack = []

        def pre(mod, args, kwargs):
            self.sync()
            stack.append(time.perf_counter())

        def post(mod, args, kwargs, output):
            self.sync()
            dt = time.perf_counter() - stack.pop()
            if self.enabled:
                self.add(name_fn(args, kwargs), dt, flops_fn(args, kwargs, output))

        self.keep(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.keep(module.register_forward_hook(post, with_kwargs=True))

    def wrap(self, obj, attr: str, name: str, flops_fn) -> None:
        """Replace the bound method ``obj.attr`` by a timed one (on this instance only)."""
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            self.sync()
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
    _time_mar(model, timers)
    _time_llm(model, timers)
    net = model.mar.diffloss.net
    head_w = linear_weights(net)
    # forward_with_cfg calls self.forward directly (no hooks fire), so the method itself is wrapped
    timers.wrap(net, "forward", "diffusion_head", lambda a, k, out: 2 * head_w * out.shape[0])
    timers.wrap(model.mar.diffloss, "sample", "_diffusion_sample_total", lambda a, k, out: 0.0)
    _time_vae(model, timers)


def _time_mar(model, timers: Timers) -> None:
    """MAR encoder and decoder (wrapped methods) and the projections between MAR and the LLM (hooks)."""
    mar = model.config.mar
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


def _time_llm(model, timers: Timers) -> None:
    """The Qwen2 trunk: prefill (input_ids) vs image-token passes (inputs_embeds) in text-to-image."""
    llm_cfg = model.config.llm

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

    timers.keep(model.llm.model.register_forward_pre_hook(trunk_pre, with_kwargs=True))

    def trunk_flops(args, kwargs, out):
        b, q, past = shapes.pop()
        return llm_flops(llm_cfg, b, q, past + q)

    timers.hook(model.llm.model, lambda a, k: "llm_prefill" if k.get("input_ids") is not None else "llm",
                trunk_flops)


def _time_vae(model, timers: Timers) -> None:
    """VAE: conv FLOPs 2*Cout*(Cin/groups)*kh*kw*Hout*Wout per image, counted while the VAE runs."""
    from torch import nn

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
            timers.keep(m.register_forward_hook(count_conv))

    def vae_pre(mod, args):
        conv_flops[0] = 0.0

    for part, name in ((model.vae.decoder, "vae_decoder"), (model.vae.encoder, "vae_encoder")):
        timers.keep(part.register_forward_pre_hook(vae_pre))
        timers.hook(part, lambda a, k, n=name: n, lambda a, k, out: conv_flops[0])


def summarize(timers: Timers, total: float, peak: float) -> dict:
    """Each component's seconds, calls, GFLOP, GFLOP/s, share of ``peak`` GFLOP/s and of ``total`` seconds."""
    comps = {}
    for name, d in sorted(timers.data.items()):
        gflop = d["flops"] / 1e9
        gflops = gflop / d["seconds"] if d["seconds"] > 0 and gflop > 0 else None
        comps[name] = {"seconds": d["seconds"], "calls": int(d["calls"]), "gflop": gflop, "gflops": gflops,
                       "pct_of_peak": 100 * gflops / peak if gflops else None,
                       "pct_of_total": 100 * d["seconds"] / total if total else None}
    return comps
