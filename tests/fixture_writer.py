"""Test helper: write a complete reference-format fixture folder for ANY configuration.

:func:`write_fixture` produces a folder laid out exactly like ``../shared/reference/tiny``
(``config.json`` in the original-kwargs format, ``weights.safetensors`` with the
original key layout -- both ``llm.lm_head.weight`` and ``llm.model.embed_tokens.weight``
stored -- and ``cases/<case>.safetensors`` + ``cases/<case>.json`` for the ten cases
a..j with the same ``tensors`` {name: {role, shape, dtype, desc}} and ``meta``
structure), but for another configuration: other widths and depths, buffer size,
number of diffusion steps, latent width, non-square and non-native grids.

It is a SELF-CONSISTENCY fixture: the expected outputs are computed with this
package's own model code (``harmon.models``, ``harmon.sampling``, ``harmon.train``,
``harmon.diffusion``), called directly as the fixture README's "calls" describe --
not through ``harmon.parity``. Running ``harmon.parity.run_parity`` on the folder
therefore checks that the parity runner reads every size, seed, run and name from
the files and assumes nothing of the tiny set.

Randomness: weights and inputs come only from explicit ``torch.Generator`` /
``numpy.random.RandomState`` objects seeded from ``seed``; the global RNGs are
never touched (the model is built on the meta device, so no default init runs).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import DynamicCache

from harmon.checkpoint import EMBED_KEY, TIED_KEY, config_from_reference, load_model
from harmon.models.harmon import Harmon, context_mask_and_positions, crop_cache
from harmon.models.diffusion_head import timestep_embedding
from harmon.rng import ReferenceRNG
from harmon.sampling import StepInfo, generate_latents
from harmon.settings import GenerationSettings
from harmon.train.losses import IMAGE_TOKEN_INDEX, image_to_text_loss, text_to_image_loss

SCHEDULE_TABLES = ("timestep_map", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                   "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                   "posterior_mean_coef1", "posterior_mean_coef2")
GRAD_NORM_PARAMS = ("llm.model.embed_tokens.weight", "mar.fake_latent", "mar.mask_token", "mar.z_proj.weight",
                    "mar.diffloss.net.final_layer.linear.weight", "proj_in.0.weight", "proj_in.0.bias",
                    "proj_in.2.weight", "proj_in.2.bias", "proj_out.0.weight", "proj_out.0.bias",
                    "proj_out.2.weight", "proj_out.2.bias")
F_CFG, PS_TEMPERATURE, SAMPLE_CFG_TEMPERATURE = 3.0, 0.7, 0.95  # constants of case f's calls (as in tiny)
G_CFG = 3.0                                                      # case g: cfg 3.0, linear schedule, temperature 1


def other_config() -> dict[str, Any]:
    """A configuration unlike the tiny set's in every size (the ``config_json`` argument of :func:`write_fixture`).

    LLM hidden 32 x 3 layers, 4 heads / 2 kv heads (head_dim 8), vocab 500 with the
    special ids 490..493; MAR encoder 48 x 3 blocks x 4 heads, decoder 32 x 1 block x
    2 heads, mlp_ratio 2, buffer 3, 8 latent channels; DiffLoss width 48 x 3 blocks,
    7 sampling steps, diffusion_batch_mul 3; VAE ch 32 with one ResNet block per
    level and decoder attention; native image 64 px (4 x 4 grid).
    """
    return {
        "name": "generality",
        "llm_config": {
            "vocab_size": 500, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "use_sliding_window": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "bos_token_id": 490, "eos_token_id": 492, "use_cache": True,
            "torch_dtype": "float32",
        },
        "mar_kwargs": {
            "img_size": 64, "vae_stride": 16, "patch_size": 1,
            "encoder_embed_dim": 48, "encoder_depth": 3, "encoder_num_heads": 4,
            "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
            "mlp_ratio": 2.0, "norm_layer_eps": 1e-06, "vae_embed_dim": 8, "mask_ratio_min": 0.6,
            "label_drop_prob": 0.1, "class_num": 10, "attn_dropout": 0.1, "proj_dropout": 0.1,
            "buffer_size": 3, "diffloss_d": 3, "diffloss_w": 48, "num_sampling_steps": "7",
            "diffusion_batch_mul": 3, "grad_checkpointing": False,
        },
        "vae": {
            "embed_dim": 8, "ch_mult": [1, 1, 2, 2, 4], "ch": 32, "double_z": True, "num_res_blocks": 1,
            "encoder_attn_resolutions": [16], "decoder_attn_resolutions": [16], "resolution": 256,
            "dropout": 0.0, "in_channels": 3, "out_ch": 3, "z_channels": 8,
        },
        "vae_scale": 0.3,
        "special_token_ids": {"pad_endoftext": 490, "im_start": 491, "im_end_eos": 492,
                              "image_placeholder": 493, "newline": 10},
    }


# -- small helpers ------------------------------------------------------------------------------
def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


class _Case:
    """Collects one case's tensors (with role and description) and meta, then writes the pair of files."""

    def __init__(self, name: str, title: str, calls: list[str], notes: list[str] | None = None):
        self.name, self.title, self.calls, self.notes = name, title, calls, notes or []
        self.tensors: dict[str, torch.Tensor] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] = {}

    def _add(self, role: str, name: str, t: torch.Tensor, desc: str) -> torch.Tensor:
        if name in self.tensors:
            raise KeyError(f"{self.name}: tensor {name!r} written twice")
        t = t.detach().cpu().contiguous().clone()
        self.tensors[name] = t
        self.info[name] = {"role": role, "shape": list(t.shape), "dtype": _dtype_name(t), "desc": desc}
        return t

    def input(self, name: str, t: torch.Tensor, desc: str = "") -> torch.Tensor:
        return self._add("input", name, t, desc)

    def output(self, name: str, t: torch.Tensor, desc: str = "") -> torch.Tensor:
        return self._add("output", name, t, desc)

    def save(self, folder: Path) -> None:
        cases = folder / "cases"
        save_file(self.tensors, str(cases / f"{self.name}.safetensors"), metadata={"format": "pt"})
        doc = {"case": self.name, "title": self.title, "calls": self.calls, "tensors": self.info,
               "notes": self.notes, "meta": self.meta}
        (cases / f"{self.name}.json").write_text(json.dumps(doc, indent=1) + "\n")


class _Data:
    """Input data from one explicit generator."""

    def __init__(self, seed: int, special: dict[str, int], vocab: int):
        self.g = torch.Generator().manual_seed(seed)
        self.special = special
        self.low, self.high = 11, min(v for k, v in special.items() if k != "newline")  # ordinary token ids
        assert self.high <= vocab and self.high - self.low > 10, "special ids must sit inside the vocab"

    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * scale

    def uniform(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g) * 2 - 1

    def ids(self, n: int) -> list[int]:
        return torch.randint(self.low, self.high, (n,), generator=self.g).tolist()

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=self.g)

    def mask(self, rows: int, length: int, masked: int) -> torch.Tensor:
        """(rows, length) float, exactly ``masked`` ones per row at random positions."""
        m = torch.zeros(rows, length)
        for r in range(rows):
            m[r, torch.randperm(length, generator=self.g)[:masked]] = 1.0
        return m

    def prompt(self, body: int) -> list[int]:
        """A chat-shaped prompt: <im_start> body <im_end> \\n <im_start> x."""
        s = self.special
        return [s["im_start"], *self.ids(body), s["im_end_eos"], s["newline"], s["im_start"], *self.ids(1)]

    def pad(self, rows: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad with the eos id (as prepare_text_conditions does): (ids int64, attention mask bool)."""
        length = length or max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.special["im_end_eos"], dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask


# -- config and weights --------------------------------------------------------------------------
def _complete_config(config_json: dict[str, Any], seed: int) -> dict[str, Any]:
    data = copy.deepcopy(config_json)
    llm, mar, vae = data["llm_config"], data["mar_kwargs"], data["vae"]
    seq_h = mar["img_size"] // mar["vae_stride"]
    token_dim = mar["vae_embed_dim"] * mar["patch_size"] ** 2
    hidden, enc = llm["hidden_size"], mar["encoder_embed_dim"]
    out = {
        "name": data.get("name", "generated"),
        "reference": "self-consistency fixture written by tests/fixture_writer.py with the harmon package",
        "llm_class": "transformers.Qwen2ForCausalLM",
        "llm_config": llm,
        "llm_attn_implementation": data.get("llm_attn_implementation", "eager"),
        "mar_class": "MAR (src/models/mar/mar.py) called directly with these kwargs; "
                     "norm_layer = partial(nn.LayerNorm, eps=norm_layer_eps)",
        "mar_kwargs": mar,
        "mar_derived": {
            "seq_h": seq_h, "seq_w": seq_h, "seq_len": seq_h * seq_h, "token_embed_dim": token_dim,
            "buffer_size": mar["buffer_size"], "encoder_embed_dim": enc,
            "decoder_embed_dim": mar["decoder_embed_dim"], "diffloss_in_channels": token_dim,
            "diffloss_out_channels": 2 * token_dim, "diffloss_z_channels": mar["decoder_embed_dim"],
            "timestep_frequency_embedding_size": 256,
            "train_diffusion": "create_diffusion(timestep_respacing=\"\", noise_schedule=\"cosine\") -> 1000 steps",
            "gen_diffusion": f"create_diffusion(timestep_respacing=\"{mar['num_sampling_steps']}\", "
                             "noise_schedule=\"cosine\")",
        },
        "vae": vae,
        "vae_scale": data["vae_scale"],
        "proj_in": f"Sequential(Linear({enc},{hidden}), SiLU, Linear({hidden},{hidden}))",
        "proj_out": f"Sequential(Linear({hidden},{hidden}), SiLU, Linear({hidden},{enc}))",
        "prompt_template": data.get("prompt_template", {
            "SYSTEM": "<|im_start|>system\n{system}<|im_end|>\n",
            "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
            "SUFFIX": "<|im_end|>", "SUFFIX_AS_EOS": True, "SEP": "\n",
            "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"]}),
        "special_token_ids": data["special_token_ids"],
        "special_token_notes": "No tokenizer; ids are arbitrary stand-ins (see the tiny set's README).",
        "seeds": {"weights": seed, "data": seed + 1},
    }
    return out


def _random_weights(config, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the original key layout, drawn from one ``torch.Generator`` (no global RNG)."""
    with torch.device("meta"):
        model = Harmon(config)
    g = torch.Generator().manual_seed(seed)
    norm_weights, norm_biases = set(), set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or type(mod).__name__.endswith("RMSNorm"):
            for p_name, _ in mod.named_parameters(recurse=False):
                (norm_weights if p_name == "weight" else norm_biases).add(f"{mod_name}.{p_name}")
    weights: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        noise = torch.randn(shape, generator=g)
        if name in norm_weights:
            t = 1.0 + 0.1 * noise
        elif name in norm_biases or len(shape) == 1:
            t = 0.05 * noise
        elif "pos_embed" in name:
            t = 0.3 * noise
        else:
            t = noise / math.sqrt(math.prod(shape[1:]))
        weights[name] = t.float().contiguous()
    for key in model.state_dict():
        if key not in weights:
            if key != TIED_KEY:
                raise KeyError(f"no initialiser for state-dict entry {key}")
            weights[key] = weights[EMBED_KEY].clone()  # tied: both keys stored, identical copies
    if TIED_KEY not in weights:
        weights[TIED_KEY] = weights[EMBED_KEY].clone()
    return weights


# -- the cases -----------------------------------------------------------------------------------
def _grid(model: Harmon) -> tuple[int, int]:
    return model.mar.seq_h, model.mar.seq_w


def _case_a(model: Harmon, d: _Data, stride: int) -> _Case:
    case = _Case("a_vae_encode", "KL-16 VAE encoder posterior and Harmon.encode",
                 ["post = model.vae.encode(images); moments=post.parameters; posterior_mean=post.mean; "
                  "posterior_logvar=post.logvar; posterior_std=post.std",
                  "harmon_encode = model.encode(images)", "same for images_nonsquare"])
    h, w = _grid(model)
    for sfx, shape in (("", (3, 3, h * stride, w * stride)), ("_nonsquare", (1, 3, 5 * stride, 3 * stride))):
        images = case.input(f"images{sfx}", d.uniform(*shape), "images in [-1,1], NCHW")
        post = model.vae.encode(images)
        if not sfx:
            case.output("moments", post.moments, "quant_conv output (B, 2*embed_dim, H/16, W/16)")
        case.output(f"posterior_mean{sfx}", post.mean, "posterior mean")
        case.output(f"posterior_logvar{sfx}", post.logvar, "logvar clamped to [-30, 20]")
        if not sfx:
            case.output("posterior_std", post.std, "exp(0.5*logvar)")
        case.output(f"harmon_encode{sfx}", model.encode(images), "posterior.mode()*vae_scale, b c m n -> b m n c")
    return case


def _case_b(model: Harmon, d: _Data, channels: int) -> _Case:
    case = _Case("b_vae_decode", "KL-16 VAE decoder and Harmon.decode",
                 ["harmon_decode = model.decode(latents.clone())", "vae_decode = model.vae.decode(vae_decode_input)"])
    h, w = _grid(model)
    latents = case.input("latents", d.randn(2, h, w, channels, scale=0.5), "scaled latents (B,m,n,C)")
    case.output("harmon_decode", model.decode(latents.clone()), "Harmon.decode(latents)")
    vae_in = case.input("vae_decode_input", (latents / model.config.vae_scale).permute(0, 3, 1, 2),
                        "latents/vae_scale as NCHW")
    case.output("vae_decode", model.vae.decode(vae_in), "model.vae.decode(vae_decode_input)")
    lat2 = case.input("latents_nonsquare", d.randn(1, 2, 6, channels, scale=0.5), "a (2, 6) latent grid")
    case.output("harmon_decode_nonsquare", model.decode(lat2.clone()))
    return case


def _case_c(model: Harmon, d: _Data, channels: int) -> _Case:
    case = _Case("c_mae_encoder", "MAR encoder with fake_latent buffer, Harmon.extract_visual_feature",
                 ["mae_encoder_out = model.mar.forward_mae_encoder(tokens, mask, model.mar.fake_latent.expand(B,-1), "
                  "image_shape=native)",
                  "evf_x_enc, evf_z_enc = model.extract_visual_feature(tokens.view(B,m,n,C), mask=mask)",
                  "evf_x_enc_nomask, evf_z_enc_nomask = model.extract_visual_feature(tokens.view(B,m,n,C), mask=None)",
                  "evf_*_nonsquare = model.extract_visual_feature(tokens_nonsquare.view(B,h2,w2,C), "
                  "mask=mask_nonsquare)"])
    h, w = _grid(model)
    h2, w2 = 2, 5
    case.meta = {"native_image_shape": [h, w], "nonsquare_image_shape": [h2, w2]}
    b, seq = 3, h * w
    tokens = case.input("tokens", d.randn(b, seq, channels), "token latents (B, m*n, C)")
    mask = case.input("mask", d.mask(b, seq, seq - 5), "float mask, 1 = masked (dropped)")
    mar = model.mar
    case.output("mae_encoder_out", mar.forward_mae_encoder(tokens, mask, mar.fake_latent.expand(b, -1), (h, w)))
    x_enc, z_enc = model.extract_visual_feature(tokens.view(b, h, w, channels), mask)
    case.output("evf_x_enc", x_enc)
    case.output("evf_z_enc", z_enc, "buffer tokens moved to the END")
    x_enc, z_enc = model.extract_visual_feature(tokens.view(b, h, w, channels), None)
    case.output("evf_x_enc_nomask", x_enc)
    case.output("evf_z_enc_nomask", z_enc)
    t2 = case.input("tokens_nonsquare", d.randn(b, h2 * w2, channels), f"tokens for image_shape ({h2}, {w2})")
    m2 = case.input("mask_nonsquare", d.mask(b, h2 * w2, 4))
    x_enc, z_enc = model.extract_visual_feature(t2.view(b, h2, w2, channels), m2)
    case.output("evf_x_enc_nonsquare", x_enc)
    case.output("evf_z_enc_nonsquare", z_enc)
    case.output("encoder_pos_embed_nonsquare", mar.get_encoder_pos_embed(h2, w2), "bilinear, align_corners=False")
    case.output("decoder_pos_embed_nonsquare", mar.get_decoder_pos_embed(h2, w2))
    case.output("diffusion_pos_embed_nonsquare", mar.get_diffusion_pos_embed(h2, w2))
    return case


def _case_d(model: Harmon, d: _Data, channels: int) -> tuple[_Case, torch.Tensor, torch.Tensor]:
    case = _Case("d_llm_context_encoder",
                 "Harmon.forward_mae_encoder with a text prefix (KV-cache path as in sample(), and no-cache path)",
                 ["prefix pass over input_ids without a mask into a fresh cache",
                  "x_enc_cache = model.forward_mae_encoder(tokens, mask, past_key_values=pkv, "
                  "attention_mask=attention_mask); model.curtail_cache(pkv, L)",
                  "x_enc_cache_second_call: the same again", "x_enc_nocache / x_enc_nocache_inputs_embeds: one pass",
                  "nocache_* = model.prepare_forward_input(x=z_enc, input_ids=..., attention_mask=...)"])
    h, w = _grid(model)
    ids, text_mask = d.pad([d.prompt(6), d.prompt(2)])
    ids = case.input("input_ids", ids, "right-padded with the eos id")
    text_mask = case.input("attention_mask", text_mask, "bool, True = real token")
    tokens = case.input("tokens", d.randn(2, h, w, channels), "(B, m, n, C)")
    mask = case.input("mask", d.mask(2, h * w, 6), "float, 1 = masked")
    llm = model.llm
    embeds = llm.get_input_embeddings()(ids)
    cache = DynamicCache(config=llm.config)
    out = llm.model(inputs_embeds=embeds, cache=cache, use_cache=True)
    case.output("prefix_last_hidden_state", out.last_hidden_state, "padding NOT masked in this pass")
    for i, layer in enumerate(cache.layers):
        case.output(f"prefix_cache_key_layer{i}", layer.keys, "(B, kv_heads, L, head_dim) after RoPE")
        case.output(f"prefix_cache_value_layer{i}", layer.values)
    prefix_len = ids.shape[1]
    first = model.forward_mae_encoder(tokens, mask, text_mask, cache=cache)
    len_after_image = cache.get_seq_length()
    crop_cache(cache, prefix_len)
    len_after_crop = cache.get_seq_length()
    second = model.forward_mae_encoder(tokens, mask, text_mask, cache=cache)
    crop_cache(cache, prefix_len)
    x_enc_cache = case.output("x_enc_cache", first, "(B, buffer + unmasked, Denc)")
    case.output("x_enc_cache_second_call", second)
    nocache = case.output("x_enc_nocache", model.forward_mae_encoder(tokens, mask, text_mask, input_ids=ids))
    nocache_e = case.output("x_enc_nocache_inputs_embeds",
                            model.forward_mae_encoder(tokens, mask, text_mask, inputs_embeds=embeds))
    _, z_enc = model.extract_visual_feature(tokens, mask)
    full_mask, positions = context_mask_and_positions(text_mask, z_enc.shape[1])
    case.output("nocache_position_ids", positions, "cumsum(mask)-1 clamped at 0")
    case.output("nocache_attention_mask", full_mask)
    case.output("nocache_inputs_embeds", torch.cat([embeds, z_enc], dim=1))
    case.output("cache_position_ids", positions[:, -z_enc.shape[1]:])
    case.meta = {"cache_len_after_image_pass": int(len_after_image), "cache_len_after_curtail": int(len_after_crop),
                 "maxabs_cache_vs_nocache": float((x_enc_cache - nocache).abs().max()),
                 "bitwise_nocache_input_ids_vs_inputs_embeds": bool(torch.equal(nocache, nocache_e)),
                 "bitwise_cache_first_vs_second_call": bool(torch.equal(first, second))}
    return case, x_enc_cache, mask


def _case_e(model: Harmon, d: _Data, channels: int, x_enc: torch.Tensor, mask: torch.Tensor) -> _Case:
    case = _Case("e_mae_decoder", "MAR decoder",
                 ["z = model.mar.forward_mae_decoder(x_enc, mask, image_shape=(m, n))",
                  "z_nonsquare = model.mar.forward_mae_decoder(model.mar.forward_mae_encoder(tokens_nonsquare, "
                  "mask_nonsquare, fake_latent.expand(B,-1), image_shape=s), mask_nonsquare, image_shape=s)"])
    h, w = _grid(model)
    shape2 = (5, 3)
    case.meta = {"image_shape": [h, w], "nonsquare_image_shape": list(shape2)}
    x_enc = case.input("x_enc", x_enc, "x_enc_cache from case d")
    mask = case.input("mask", mask, "same mask as case d")
    case.output("z", model.mar.forward_mae_decoder(x_enc, mask, (h, w)), "(B, m*n, Ddec)")
    b, seq2 = 2, shape2[0] * shape2[1]
    t2 = case.input("tokens_nonsquare", d.randn(b, seq2, channels), f"image_shape {shape2}")
    m2 = case.input("mask_nonsquare", d.mask(b, seq2, 9))
    x2 = case.output("x_enc_nonsquare",
                     model.mar.forward_mae_encoder(t2, m2, model.mar.fake_latent.expand(b, -1), shape2))
    case.output("z_nonsquare", model.mar.forward_mae_decoder(x2, m2, shape2))
    return case


def _case_f(model: Harmon, d: _Data, seed: int, channels: int, extra_steps: str) -> _Case:
    dl = model.mar.diffloss
    net, gen, train = dl.net, dl.gen_diffusion, dl.train_diffusion
    steps = model.config.mar.num_sampling_steps
    case = _Case("f_diffloss", "DiffLoss MLP, diffusion schedules, p_mean_variance, training_losses, p_sample_loop",
                 [f"net_out = dl.net(x, t, c); net_cfg_out = dl.net.forward_with_cfg(x, t, c, {F_CFG})",
                  "<prefix>.<array> = np.asarray(diffusion.<array>) for train_diffusion (1000 steps), gen_diffusion "
                  "and create_diffusion(timestep_respacing=extra_steps, noise_schedule=\"cosine\")",
                  f"pmv.* / pmv_cfg.* (cfg_scale={F_CFG}) = dl.gen_diffusion.p_mean_variance(...)",
                  "tl.* = dl.train_diffusion.training_losses(dl.net, tl_x_start, tl_t, dict(c=c), noise=tl_noise)",
                  f"torch.manual_seed(ps_seed); ps = dl.gen_diffusion.p_sample(..., temperature={PS_TEMPERATURE})",
                  "torch.manual_seed(fw_seed); fw_loss = dl(target=tl_x_start, z=c, mask=fw_mask)",
                  "torch.manual_seed(psl_seed); psl_out = dl.gen_diffusion.p_sample_loop(..., temperature=1.0)",
                  f"torch.manual_seed(sample_cfg_seed); sample_cfg_out = dl.sample(c, {SAMPLE_CFG_TEMPERATURE}, "
                  f"{F_CFG})",
                  "torch.manual_seed(sample_nocfg_seed); sample_nocfg_out = dl.sample(c, 1.0, 1.0)"])
    n, dz = 10, model.config.mar.decoder_embed_dim
    x = case.input("x", d.randn(n, channels))
    t = case.input("t", torch.cat([torch.tensor([0, 999]), d.randint(0, 1000, n - 2)]), "ORIGINAL 0..999 timesteps")
    c = case.input("c", d.randn(n, dz), "condition (decoder output rows)")
    case.output("timestep_embedding", timestep_embedding(t, net.time_embed.frequency_embedding_size))
    case.output("net_out", net(x, t, c), "(N, 2C) = [eps, var_values]")
    case.output("net_cfg_out", net.forward_with_cfg(x, t, c, F_CFG))
    schedules = {}
    for prefix, process in ((f"train_{train.num_timesteps}", train), (f"gen_{steps}", gen),
                            (f"gen_{extra_steps}", dl.sampling_process(extra_steps))):
        for table in SCHEDULE_TABLES:
            case.output(f"{prefix}.{table}", torch.from_numpy(np.array(process.tables[table])),
                        "float64 as held by the reference" if table != "timestep_map" else "original timesteps")
        if prefix.startswith("gen_"):
            schedules[prefix] = {"timestep_map": [int(v) for v in process.timestep_map]}

    def plain(xx, tt):
        return net(xx, tt, c)

    def guided(xx, tt):
        return net.forward_with_cfg(xx, tt, c, F_CFG)

    pmv_x_t = case.input("pmv_x_t", d.randn(n, channels))
    pmv_t = case.input("pmv_t", d.randint(0, gen.num_timesteps, n), "indices into the RESPACED schedule")
    for prefix, fn in (("pmv", plain), ("pmv_cfg", guided)):
        res = gen.p_mean_variance(fn, pmv_x_t, pmv_t)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            case.output(f"{prefix}.{key}", res[key])

    ps_seed, fw_seed, psl_seed, cfg_seed, nocfg_seed = (seed + k for k in (41, 37, 38, 39, 40))
    ps_x_t = case.input("ps_x_t", d.randn(n, channels))
    ps_t = case.input("ps_t", torch.cat([torch.tensor([0]), d.randint(0, gen.num_timesteps, n - 1)]))
    g = torch.Generator().manual_seed(ps_seed)
    noise = torch.randn(n, channels, generator=g)
    res = gen.p_sample(plain, ps_x_t, ps_t, noise, temperature=PS_TEMPERATURE)
    case.output("ps.sample", res["sample"])
    case.output("ps.pred_xstart", res["pred_xstart"])
    case.output("ps.noise", noise, "== the randn_like draw inside p_sample")

    tl_x_start = case.input("tl_x_start", d.randn(n, channels, scale=0.5))
    tl_t = case.input("tl_t", torch.cat([torch.tensor([0]), d.randint(0, 1000, n - 1)]), "t==0: NLL branch")
    tl_noise = case.input("tl_noise", d.randn(n, channels))
    terms = train.training_losses(plain, tl_x_start, tl_t, tl_noise)
    for key in ("mse", "vb", "loss", "x_t"):
        case.output(f"tl.{key}", terms[key])

    fw_mask = case.input("fw_mask", (torch.arange(n) % 3 != 0).float())
    g = torch.Generator().manual_seed(fw_seed)
    fw_t = torch.randint(0, train.num_timesteps, (n,), generator=g)
    fw_noise = torch.randn(n, channels, generator=g)
    loss = train.training_losses(plain, tl_x_start, fw_t, fw_noise)["loss"]
    case.output("fw_t_drawn", fw_t, "torch.randint(0, 1000, (N,)) drawn first")
    case.output("fw_noise_drawn", fw_noise, "then torch.randn_like(target)")
    case.output("fw_loss_terms", loss, "per-row loss = mse + vb")
    case.output("fw_loss", (loss * fw_mask).sum() / fw_mask.sum(), "(loss*mask).sum()/mask.sum()")

    psl_noise = case.input("psl_noise", d.randn(n, channels), "initial x_T")
    g = torch.Generator().manual_seed(psl_seed)
    xt, trajectory = psl_noise, []
    for i in reversed(range(gen.num_timesteps)):
        tt = torch.full((n,), i, dtype=torch.long)
        xt = gen.p_sample(plain, xt, tt, torch.randn(n, channels, generator=g), temperature=1.0)["sample"]
        trajectory.append(xt)
    case.output("psl_out", xt)
    case.output("psl_trajectory", torch.stack(trajectory), "(T, N, C): sample after each reverse step")

    g = torch.Generator().manual_seed(cfg_seed)
    half = torch.randn(n // 2, channels, generator=g)
    out = gen.p_sample_loop(guided, torch.cat([half, half]), lambda: torch.randn(n, channels, generator=g),
                            SAMPLE_CFG_TEMPERATURE)
    case.output("sample_cfg_out", out, f"DiffLoss.sample(c, temperature={SAMPLE_CFG_TEMPERATURE}, cfg={F_CFG})")
    g = torch.Generator().manual_seed(nocfg_seed)
    first = torch.randn(n, channels, generator=g)
    out = gen.p_sample_loop(plain, first, lambda: torch.randn(n, channels, generator=g), 1.0)
    case.output("sample_nocfg_out", out, "DiffLoss.sample(c, temperature=1.0, cfg=1.0)")
    case.output("sample_nocfg_initial_noise", first, "the first draw DiffLoss.sample makes")

    T, shape = gen.num_timesteps, [n, channels]
    case.meta = {
        "schedules": schedules, "ps_seed": ps_seed, "fw_seed": fw_seed,
        "fw_rng_draws": [{"fn": "torch.randint", "shape": [n], "times": 1},
                         {"fn": "torch.randn_like", "shape": shape, "times": 1}],
        "psl_seed": psl_seed, "psl_rng_draws": [{"fn": "torch.randn_like", "shape": shape, "times": T}],
        "psl_traj_last_equals_out": True,
        "sample_cfg_seed": cfg_seed,
        "sample_cfg_rng_draws": [{"fn": "torch.randn", "shape": [n // 2, channels], "times": 1},
                                 {"fn": "torch.randn_like", "shape": shape, "times": T}],
        "sample_nocfg_seed": nocfg_seed,
        "sample_nocfg_rng_draws": [{"fn": "torch.randn", "shape": shape, "times": 1},
                                   {"fn": "torch.randn_like", "shape": shape, "times": T}],
    }
    return case


class _RecordingRNG(ReferenceRNG):
    """ReferenceRNG that also keeps every full draw (the package keeps only the conditional half)."""

    def __init__(self, numpy_seed: int, torch_seed: int):
        super().__init__(numpy_seed, torch_seed)
        self.starts: list[torch.Tensor] = []
        self.steps: list[list[torch.Tensor]] = []

    def start_noise(self, num_images, rows, channels, guided):
        x = torch.randn(num_images * rows, channels, generator=self.torch)
        self.starts.append(x)
        self.steps.append([])
        return x

    def step_noise(self, num_images, rows, channels, guided):
        total = num_images * rows
        full = torch.randn(2 * total if guided else total, channels, generator=self.torch)
        self.steps[-1].append(full)
        return full[:total]


def _expected_schedule(seq: int, num_iter: int, orders: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """mask_len per step and mask_to_pred (K, rows, seq), from the README's formula (independent of the package)."""
    mask = torch.ones(orders.shape[0], seq, dtype=torch.bool)
    lens, preds = [], []
    for s in range(num_iter):
        ml = int(np.floor(seq * np.cos(math.pi / 2.0 * (s + 1) / num_iter)))
        ml = max(1, min(int(mask[0].sum()) - 1, ml))
        nxt = torch.zeros_like(mask)
        for r in range(orders.shape[0]):
            nxt[r, orders[r, :ml]] = True
        preds.append(mask.clone() if s == num_iter - 1 else mask & ~nxt)
        lens.append(ml)
        mask = nxt
    return lens, torch.stack(preds)


def _sample_run(model: Harmon, ids, text_mask, run: dict) -> dict:
    """One generation run with every step recorded, all rows' diffusion samples included."""
    cfg, shape = run["cfg"], tuple(run["image_shape"])
    guided = cfg != 1.0
    rows = ids.shape[0]
    b = rows // 2 if guided else rows
    seq = shape[0] * shape[1]
    rng = _RecordingRNG(run["np_seed"], run["torch_seed"])
    steps: list[StepInfo] = []

    def record(info: StepInfo) -> None:
        steps.append(StepInfo(info.step, info.num_iter, info.mask_to_pred.clone(), info.mask_len, info.cfg,
                              info.z.clone(), info.sampled.clone(), info.tokens.clone()))

    stride = model.config.mar.vae_stride
    settings = GenerationSettings(guidance_scale=cfg, cfg_schedule=run["cfg_schedule"], temperature=run["temperature"],
                                  num_iter=run["num_iter"], height=shape[0] * stride, width=shape[1] * stride)
    tokens = generate_latents(model, ids, text_mask, rng, settings, callback=record)
    # orders as the original draws them: one numpy shuffle per row of the whole batch
    rs = np.random.RandomState(run["np_seed"])
    drawn = []
    for _ in range(rows):
        order = np.arange(seq)
        rs.shuffle(order)
        drawn.append(order)
    drawn = torch.from_numpy(np.stack(drawn)).long()
    orders = torch.cat([drawn[:b], drawn[:b]]) if guided else drawn
    pair = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    mask_to_pred = torch.stack([pair(s.mask_to_pred) for s in steps])
    lens, expected_pred = _expected_schedule(seq, run["num_iter"], orders)
    if lens != [s.mask_len for s in steps] or not torch.equal(expected_pred, mask_to_pred):
        raise AssertionError(f"the package's mask schedule differs from the README formula for run {run}")
    # the diffusion samples of ALL rows (the original computes the unconditional twins too and discards them)
    gen = model.mar.diffloss.gen_diffusion
    sampled_all = []
    for s, start, noises in zip(steps, rng.starts, rng.steps):
        z = s.z
        if guided:
            def fn(x, t, z=z, cfg_iter=s.cfg):
                return model.mar.diffloss.net.forward_with_cfg(x, t, z, cfg_iter)
            x_T = torch.cat([start, start])
        else:
            def fn(x, t, z=z):
                return model.mar.diffloss.net(x, t, z)
            x_T = start
        it = iter(noises)
        full = gen.p_sample_loop(fn, x_T, lambda: next(it), run["temperature"])
        if not torch.allclose(full[: s.sampled.shape[0]], s.sampled, rtol=1e-6, atol=1e-6 * s.sampled.abs().max()):
            raise AssertionError("full-batch diffusion replay differs from the package's conditional rows")
        sampled_all.append(full)
    pred_step = torch.full((orders.shape[0], seq), -1, dtype=torch.long)
    for s in steps:
        pred_step[pair(s.mask_to_pred)] = s.step
    rng_draws = [{"fn": "np.random.shuffle", "shape": [seq], "times": rows}]
    for s, start, noises in zip(steps, rng.starts, rng.steps):
        rng_draws.append({"fn": "torch.randn", "shape": list(start.shape), "times": 1})
        rng_draws.append({"fn": "torch.randn_like", "shape": list(noises[0].shape), "times": len(noises)})
    return {"tokens": tokens, "all_tokens": pair(tokens), "orders": orders, "drawn": drawn,
            "mask_to_pred": mask_to_pred, "pred_step": pred_step, "steps": steps, "sampled_all": sampled_all,
            "mask_len": torch.tensor([float(s.mask_len) for s in steps]),
            "cfg": torch.tensor([s.cfg for s in steps], dtype=torch.float32), "rng_draws": rng_draws, "bsz": rows}


def _case_g(model: Harmon, d: _Data, seed: int, runs: list[tuple[tuple[int, int], int]]) -> _Case:
    case = _Case("g_mask_schedule",
                 f"Mask schedule of Harmon.sample (recorded from real sample() runs, cfg {G_CFG} linear)",
                 ["np.random.seed(np_seed); torch.manual_seed(torch_seed); model.sample(input_ids=input_ids, "
                  f"attention_mask=attention_mask, num_iter=num_iter, cfg={G_CFG}, cfg_schedule=\"linear\", "
                  "temperature=1.0, image_shape=shape)"])
    s = d.special
    ids, mask = d.pad([d.prompt(4), [s["im_start"], *d.ids(1), s["im_end_eos"], s["newline"], s["im_start"]]])
    ids = case.input("input_ids", ids, "row 0 conditional, row 1 unconditional prompt, right-padded with eos")
    mask = case.input("attention_mask", mask)
    meta_runs = []
    for i, (shape, k) in enumerate(runs):
        seq = shape[0] * shape[1]
        run = {"image_shape": list(shape), "seq_len": seq, "num_iter": k, "np_seed": seed + 47 + i,
               "torch_seed": seed + 57 + i, "cfg": G_CFG, "cfg_schedule": "linear", "temperature": 1.0}
        res = _sample_run(model, ids, mask, run)
        sfx = f"_{seq}_{k}"
        case.output(f"orders{sfx}", res["orders"], f"orders used (row 1 overwritten with row 0), image_shape {shape}")
        case.output(f"orders_drawn{sfx}", res["drawn"], "orders as drawn by sample_orders before the CFG copy")
        case.output(f"pred_step{sfx}", res["pred_step"], "step at which each token position is predicted")
        case.output(f"mask_len{sfx}", res["mask_len"], "mask_len per step")
        case.output(f"cfg{sfx}", res["cfg"], "cfg_iter passed to DiffLoss.sample per step (linear schedule)")
        case.output(f"final_tokens{sfx}", res["all_tokens"], "latents handed to Harmon.decode")
        case.output(f"mask_to_pred{sfx}", res["mask_to_pred"], "(num_iter, B, seq) bool")
        meta_runs.append({"image_shape": list(shape), "seq_len": seq, "num_iter": k, "np_seed": run["np_seed"],
                          "torch_seed": run["torch_seed"], "mask_len": res["mask_len"].tolist(),
                          "tokens_predicted_per_step": [int(s.mask_to_pred[0].sum()) for s in res["steps"]],
                          "cfg_iter": res["cfg"].tolist(), "mask_len_formula_matches": True})
    case.meta = {"runs": meta_runs}
    return case


def _case_h(model: Harmon, d: _Data, seed: int, runs: dict[str, dict]) -> _Case:
    case = _Case("h_sample", "Full Harmon.sample runs",
                 ["np.random.seed(np_seed); torch.manual_seed(torch_seed); images = model.sample(input_ids=..., "
                  "attention_mask=..., num_iter=num_iter, cfg=cfg, cfg_schedule=..., temperature=..., "
                  "progress=False, image_shape=(m, n))"])
    s = d.special
    cond = [d.prompt(5), d.prompt(2), d.prompt(7)]
    uncond = [s["im_start"], *d.ids(1), s["im_end_eos"], s["newline"], s["im_start"], *d.ids(1)]
    length = max(len(r) for r in cond) + 1
    ids_cfg, mask_cfg = d.pad(cond + [uncond] * len(cond), length)
    ids_nocfg, mask_nocfg = d.pad(cond, length)
    case.input("input_ids_cfg", ids_cfg, "conditional prompts, then as many unconditional ones; right-padded")
    case.input("attention_mask_cfg", mask_cfg)
    case.input("input_ids_nocfg", ids_nocfg, "the conditional prompts only")
    case.input("attention_mask_nocfg", mask_nocfg)
    meta_runs = {}
    for i, (name, spec) in enumerate(runs.items()):
        run = dict(spec, np_seed=seed + 67 + 2 * i, torch_seed=seed + 68 + 2 * i)
        guided = run["cfg"] != 1.0
        ids, mask = (ids_cfg, mask_cfg) if guided else (ids_nocfg, mask_nocfg)
        res = _sample_run(model, ids, mask, run)
        again = _sample_run(model, ids, mask, run)
        images = model.decode(res["tokens"])
        case.output(f"{name}.images", images, "returned images (conditional half only when cfg != 1)")
        case.output(f"{name}.final_tokens", res["all_tokens"], "(bsz, m, n, C) latents passed to decode (all rows)")
        case.output(f"{name}.orders", res["orders"], "orders used")
        case.output(f"{name}.orders_drawn", res["drawn"], "orders as drawn (np.random.shuffle per row)")
        case.output(f"{name}.mask_to_pred", res["mask_to_pred"], "(num_iter, bsz, seq) bool")
        case.output(f"{name}.mask_len", res["mask_len"])
        for step, sampled in zip(res["steps"], res["sampled_all"]):
            case.output(f"{name}.step{step.step}.z", step.z, "decoder features of the tokens predicted at this step")
            case.output(f"{name}.step{step.step}.sampled", sampled, "DiffLoss.sample output for those rows")
        meta_runs[name] = {
            **{k: run[k] for k in ("cfg", "cfg_schedule", "temperature", "num_iter")},
            "image_shape": list(run["image_shape"]), "np_seed": run["np_seed"], "torch_seed": run["torch_seed"],
            "bsz": res["bsz"], "mask_len": res["mask_len"].tolist(), "cfg_iter": res["cfg"].tolist(),
            "tokens_per_step_all_rows": [int(x.shape[0]) for x in res["sampled_all"]],
            "rng_draws": res["rng_draws"],
            "repeat_bitwise_identical": bool(torch.equal(res["tokens"], again["tokens"])),
        }
    case.meta = {"runs": meta_runs}
    return case


def _case_i(model: Harmon, d: _Data, stride: int, num_generated: int) -> _Case:
    special = d.special
    image_id = special["image_placeholder"]
    case = _Case("i_image2text", "scripts/image2text.py flow (without tokenizer): prompt logits and greedy generate",
                 ["_, z_enc = model.extract_visual_feature(model.encode(image))",
                  "inputs_embeds[input_ids == IMG] = z_enc.flatten(0,1); "
                  "inputs_embeds[input_ids != IMG] = embed(input_ids[input_ids != IMG])",
                  "logits = model.llm(inputs_embeds=inputs_embeds).logits",
                  f"generated_ids = model.llm.generate(inputs_embeds=inputs_embeds, use_cache=True, do_sample=False, "
                  f"max_new_tokens={num_generated}, eos_token_id={special['im_end_eos']}, "
                  f"pad_token_id={special['pad_endoftext']})"])
    gh, gw = 4, 3  # a non-square, non-native grid: interpolated position embeddings
    image = case.input("image", d.uniform(1, 3, gh * stride, gw * stride), "one image in [-1,1]")
    n_img = gh * gw + model.buffer_size
    s = special
    row = [s["im_start"], *d.ids(3), *([image_id] * n_img), s["newline"], *d.ids(4), s["im_end_eos"], s["newline"],
           s["im_start"], *d.ids(1), s["newline"]]
    ids = case.input("input_ids", torch.tensor([row]), f"image placeholder id {image_id} repeated m*n + buffer times")
    _, z_enc = model.extract_visual_feature(model.encode(image))
    case.output("z_enc", z_enc, "(1, m*n + buffer, H): image tokens then buffer tokens")
    embeds = model.llm.get_input_embeddings()(ids).clone()
    embeds[ids == image_id] = z_enc.flatten(0, 1)
    case.output("inputs_embeds", embeds)
    case.output("logits", model.llm(inputs_embeds=embeds).logits, "full prompt, no attention mask")
    kwargs = dict(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False,
                  max_new_tokens=num_generated, eos_token_id=s["im_end_eos"], pad_token_id=s["pad_endoftext"])
    out = model.llm.generate(**kwargs, return_dict_in_generate=True, output_scores=True)
    plain_ids = model.llm.generate(**kwargs)
    case.output("generated_ids", out.sequences, "only the NEW tokens (inputs_embeds-only call)")
    case.output("generated_step_logits", torch.stack(out.scores, dim=1), "(1, new_tokens, V) scores per step")
    case.meta = {"same_ids_with_scores": bool(torch.equal(plain_ids, out.sequences)), "num_generated": num_generated,
                 "eos_hit": bool((out.sequences == s["im_end_eos"]).any()), "image_placeholder_id": image_id}
    return case


def _grad_norms(model: Harmon) -> dict[str, float | None]:
    params = dict(model.named_parameters())
    out = {}
    for name in GRAD_NORM_PARAMS:
        g = params[name].grad
        out[name] = None if g is None or bool((g == 0).all()) else float(g.norm().item())
    return out


def _case_j(model: Harmon, d: _Data, seed: int, stride: int) -> _Case:
    case = _Case("j_training_losses", "HarmonDev image2text_loss and text2image_loss (eval mode: dropout off)",
                 ["i2t_loss = dev.image2text_loss(dict(input_ids=i2t_input_ids, attention_mask=i2t_attention_mask, "
                  "labels=i2t_labels, pixel_values=i2t_pixel_values)); i2t_loss.backward()",
                  "i2t_noimg_loss = dev.image2text_loss(dict(input_ids=i2t_noimg_input_ids, attention_mask=..., "
                  "labels=i2t_labels, pixel_values=None))",
                  "np.random.seed(t2i_np_seed); torch.manual_seed(t2i_torch_seed); t2i_loss = dev.text2image_loss("
                  "dict(pixel_values=t2i_pixel_values, input_ids=t2i_input_ids, attention_mask=t2i_attention_mask)); "
                  "t2i_loss.backward()"])
    s = d.special
    h, w = _grid(model)
    n_img = h * w + model.buffer_size
    px = case.input("i2t_pixel_values", d.uniform(2, 3, h * stride, w * stride))
    rows, labels = [], []
    for pre, answer in ((3, 4), (5, 7)):
        prompt = [s["im_start"], *d.ids(pre), *([IMAGE_TOKEN_INDEX] * n_img), s["newline"], *d.ids(2),
                  s["im_end_eos"], s["newline"], s["im_start"], *d.ids(1), s["newline"]]
        ans = [*d.ids(answer), s["im_end_eos"]]
        rows.append(prompt + ans)
        labels.append([-100] * len(prompt) + ans)
    ids, mask = d.pad(rows)
    lab = torch.full_like(ids, -100)
    for i, r in enumerate(labels):
        lab[i, : len(r)] = torch.tensor(r)
    ids = case.input("i2t_input_ids", ids, f"IMAGE_TOKEN_INDEX {IMAGE_TOKEN_INDEX} marks {n_img} slots per row")
    mask = case.input("i2t_attention_mask", mask)
    lab = case.input("i2t_labels", lab, "-100 = ignored")
    noimg = case.input("i2t_noimg_input_ids", torch.where(ids == IMAGE_TOKEN_INDEX, torch.tensor(250), ids),
                       "image slots replaced by id 250")
    t2i_px = case.input("t2i_pixel_values", d.uniform(2, 3, 3 * stride, 5 * stride), "a (3, 5) latent grid")
    t_ids, t_mask = d.pad([d.prompt(5), d.prompt(2)])
    t_ids = case.input("t2i_input_ids", t_ids)
    t_mask = case.input("t2i_attention_mask", t_mask)
    np_seed, torch_seed = seed + 77, seed + 78

    model.requires_grad_(True)
    model.vae.requires_grad_(False)
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            loss = image_to_text_loss(model, ids, mask, lab, px)
            loss.backward()
            case.output("i2t_loss", loss)
            params = dict(model.named_parameters())
            for name in ("proj_in.0.weight", "proj_in.0.bias", "proj_in.2.weight", "proj_in.2.bias"):
                case.output(f"i2t_grad.{name}", params[name].grad, "gradient after loss.backward()")
            i2t_norms = _grad_norms(model)
            model.zero_grad(set_to_none=True)
            case.output("i2t_noimg_loss", image_to_text_loss(model, noimg, mask, lab, None),
                        "pixel_values=None (adds 0*mean of a dummy 16x16 visual feature)")
            model.zero_grad(set_to_none=True)
            res = text_to_image_loss(model, t2i_px, t_ids, t_mask, ReferenceRNG(np_seed, torch_seed))
            res.loss.backward()
            t2i_norms = _grad_norms(model)
            grads = {n: params[n].grad.clone() for n in ("proj_in.0.weight", "proj_in.0.bias", "proj_in.2.weight",
                                                         "proj_in.2.bias", "proj_out.0.weight", "proj_out.0.bias",
                                                         "proj_out.2.weight", "proj_out.2.bias")}
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    case.output("t2i_loss", res.loss)
    case.output("t2i_orders", res.orders, "np.random.shuffle per row")
    case.output("t2i_mask", res.mask, "first ceil(seq*rate) entries of each order masked")
    case.output("t2i_gt_latents", res.latents, "(B, m*n, C) Harmon.encode(pixel_values) flattened")
    case.output("t2i_z", res.z, "(B, m*n, Ddec) decoder output")
    case.output("t2i_t", res.timesteps, "(mul*B*m*n,) torch.randint(0,1000)")
    case.output("t2i_noise", res.noise, "(mul*B*m*n, C) torch.randn_like")
    for key in ("mse", "vb", "loss"):
        case.output(f"t2i_terms.{key}", res.terms[key], "rows = diffusion_batch_mul TILED copies of the tokens")
    for name, g in grads.items():
        case.output(f"t2i_grad.{name}", g)

    # RNG-free replay of text2image_loss from the recorded mask / t / noise
    with torch.no_grad():
        b, seq, c = res.latents.shape
        gh, gw = t2i_px.shape[2] // stride, t2i_px.shape[3] // stride
        mul = model.config.mar.diffusion_batch_mul
        x_enc = model.forward_mae_encoder(res.latents.view(b, gh, gw, c), res.mask, t_mask, input_ids=t_ids)
        z = model.mar.forward_mae_decoder(x_enc, res.mask, (gh, gw))
        dl = model.mar.diffloss
        z_rows = z.reshape(b * seq, -1).repeat(mul, 1)
        terms = dl.train_diffusion.training_losses(lambda xx, tt: dl.net(xx, tt, z_rows),
                                                   res.latents.reshape(b * seq, c).repeat(mul, 1), res.timesteps,
                                                   res.noise)
        m_rows = res.mask.reshape(-1).repeat(mul)
        replay = (terms["loss"] * m_rows).sum() / m_rows.sum()
    n = res.timesteps.shape[0]
    case.meta = {
        "i2t_grad_norms": i2t_norms, "t2i_grad_norms": t2i_norms, "t2i_np_seed": np_seed,
        "t2i_torch_seed": torch_seed,
        "t2i_rng_draws": [{"fn": "np.random.shuffle", "shape": [seq], "times": b},
                          {"fn": "torch.randint", "shape": [n], "times": 1},
                          {"fn": "torch.randn_like", "shape": [n, c], "times": 1}],
        "t2i_num_masked_per_row": [int(v) for v in res.mask.sum(dim=1)],
        "t2i_replay_bitwise_equal": bool(torch.equal(replay, res.loss.detach())),
        "t2i_replay_maxabs": float((replay - res.loss.detach()).abs()),
    }
    return case


# -- entry point -------------------------------------------------------------------------------------
DEFAULT_G_RUNS = (((4, 4), 3), ((3, 7), 5), ((6, 5), 8))
DEFAULT_H_RUNS = {
    "cfg3_const": {"cfg": 3.0, "cfg_schedule": "constant", "temperature": 1.0, "num_iter": 3, "image_shape": [3, 6]},
    "cfg1": {"cfg": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "num_iter": 5, "image_shape": [5, 4]},
    "cfg2.5_linear_temp0.7": {"cfg": 2.5, "cfg_schedule": "linear", "temperature": 0.7, "num_iter": 4,
                              "image_shape": [4, 4]},
}


def write_fixture(folder: Path, config_json: dict, seed: int, *,
                  g_runs=DEFAULT_G_RUNS, h_runs: dict[str, dict] | None = None, extra_steps: str = "25",
                  num_generated: int = 7) -> None:
    """Write config.json, weights.safetensors and the ten case pairs a..j for ``config_json`` into ``folder``.

    ``config_json`` needs ``llm_config``, ``mar_kwargs``, ``vae``, ``vae_scale`` and
    ``special_token_ids`` (see :func:`other_config`); the derived sections of the
    tiny set's config.json are filled in. ``g_runs``: ((h, w), num_iter) per mask
    schedule run (their (h*w, num_iter) pairs must differ: they name the tensors);
    ``h_runs``: run name -> cfg / cfg_schedule / temperature / num_iter / image_shape.
    """
    folder = Path(folder)
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    data = _complete_config(config_json, seed)
    config = config_from_reference(data)
    weights = _random_weights(config, seed)
    data["weights"] = {"file": "weights.safetensors", "dtype": "float32", "num_tensors": len(weights),
                       "numel": sum(t.numel() for t in weights.values()),
                       "tied": "llm.lm_head.weight is tied to llm.model.embed_tokens.weight; both keys are stored "
                               "(identical copies).",
                       "init": f"torch.Generator seed {seed}: norm weights 1+0.1*N(0,1), biases and other 1-D "
                               "0.05*N(0,1), position embeddings 0.3*N(0,1), the rest N(0,1)/sqrt(fan_in)"}
    (folder / "config.json").write_text(json.dumps(data, indent=1) + "\n")
    save_file(weights, str(folder / "weights.safetensors"), metadata={"format": "pt"})

    model = load_model(folder, dtype=torch.float32)  # the same loader run_parity uses
    model.requires_grad_(False)
    d = _Data(seed + 1, data["special_token_ids"], data["llm_config"]["vocab_size"])
    stride, channels = config.mar.vae_stride, config.mar.token_embed_dim
    h_runs = DEFAULT_H_RUNS if h_runs is None else h_runs
    if len({(h * w, k) for (h, w), k in g_runs}) != len(g_runs):
        raise ValueError("g runs are named by (seq_len, num_iter): make those pairs distinct")
    with torch.no_grad():
        cases = [_case_a(model, d, stride), _case_b(model, d, channels), _case_c(model, d, channels)]
        case_d, x_enc, mask = _case_d(model, d, channels)
        cases += [case_d, _case_e(model, d, channels, x_enc, mask), _case_f(model, d, seed, channels, extra_steps),
                  _case_g(model, d, seed, list(g_runs)), _case_h(model, d, seed, h_runs),
                  _case_i(model, d, stride, num_generated)]
    cases.append(_case_j(model, d, seed, stride))
    for case in cases:
        case.save(folder)
