"""The cases of a reference folder, one function each: recompute every output tensor of the case file from
its inputs, seeds and settings, and name the tolerance (and, where it differs, the reference tensor) of each."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..models.diffusion_head import timestep_embedding
from ..models.harmon import Harmon, context_mask_and_positions, crop_cache
from ..pipelines.image_to_text import decode_tokens
from ..rng import ReferenceRNG
from ..sampling import StepInfo, generate_latents
from ..settings import DecodingSettings, GenerationSettings
from ..train.losses import image_to_text_loss, text_to_image_loss
from .fixtures import COND_HALF, EXACT, MODULE, SAMPLE, SCHEDULE, SINUSOID, Fixture, Tolerance

Computed = dict[str, tuple[torch.Tensor, Tolerance] | tuple[torch.Tensor, Tolerance, str]]


def _case_vae_encode(model: Harmon, fx: Fixture) -> Computed:
    out: Computed = {}
    for suffix in ("", "_nonsquare"):
        if f"images{suffix}" not in fx.tensors:
            continue
        images = fx[f"images{suffix}"]
        post = model.vae.encode(images)
        out[f"moments{suffix}"] = (post.moments, MODULE)
        out[f"posterior_mean{suffix}"] = (post.mean, MODULE)
        out[f"posterior_logvar{suffix}"] = (post.logvar, MODULE)
        out[f"posterior_std{suffix}"] = (post.std, MODULE)
        out[f"harmon_encode{suffix}"] = (model.encode(images), MODULE)
    return out


def _case_vae_decode(model: Harmon, fx: Fixture) -> Computed:
    out: Computed = {"vae_decode": (model.vae.decode(fx["vae_decode_input"]), MODULE)}
    for suffix in ("", "_nonsquare"):
        if f"latents{suffix}" in fx.tensors:
            out[f"harmon_decode{suffix}"] = (model.decode(fx[f"latents{suffix}"]), MODULE)
    return out


def _case_mae_encoder(model: Harmon, fx: Fixture) -> Computed:
    h, w = fx.meta["native_image_shape"]
    tokens, mask = fx["tokens"], fx["mask"]
    b = tokens.shape[0]
    out: Computed = {}
    out["mae_encoder_out"] = (model.mar.forward_mae_encoder(tokens, mask, model.mar.fake_latent.expand(b, -1),
                                                            image_shape=(h, w)), MODULE)
    x_enc, z_enc = model.extract_visual_feature(tokens.view(b, h, w, -1), mask)
    out["evf_x_enc"], out["evf_z_enc"] = (x_enc, MODULE), (z_enc, MODULE)
    x_enc, z_enc = model.extract_visual_feature(tokens.view(b, h, w, -1), None)
    out["evf_x_enc_nomask"], out["evf_z_enc_nomask"] = (x_enc, MODULE), (z_enc, MODULE)
    if "tokens_nonsquare" in fx.tensors:
        h2, w2 = fx.meta["nonsquare_image_shape"]
        t2 = fx["tokens_nonsquare"]
        x_enc, z_enc = model.extract_visual_feature(t2.view(t2.shape[0], h2, w2, -1), fx["mask_nonsquare"])
        out["evf_x_enc_nonsquare"], out["evf_z_enc_nonsquare"] = (x_enc, MODULE), (z_enc, MODULE)
        out["encoder_pos_embed_nonsquare"] = (model.mar.get_encoder_pos_embed(h2, w2), MODULE)
        out["decoder_pos_embed_nonsquare"] = (model.mar.get_decoder_pos_embed(h2, w2), MODULE)
        out["diffusion_pos_embed_nonsquare"] = (model.mar.get_diffusion_pos_embed(h2, w2), MODULE)
    return out


def _case_llm_context(model: Harmon, fx: Fixture) -> Computed:
    ids, text_mask, tokens, mask = fx["input_ids"], fx["attention_mask"], fx["tokens"], fx["mask"]
    out: Computed = {}
    cache = model.prefill(ids)
    # the prefix pass again, for its hidden states (prefill keeps only the cache)
    prefix = model.llm.model(input_ids=ids, use_cache=False).last_hidden_state
    out["prefix_last_hidden_state"] = (prefix, MODULE)
    for i, layer in enumerate(cache.layers):
        out[f"prefix_cache_key_layer{i}"] = (layer.keys, MODULE)
        out[f"prefix_cache_value_layer{i}"] = (layer.values, MODULE)
    prefix_len = ids.shape[1]
    first = model.forward_mae_encoder(tokens, mask, text_mask, cache=cache)
    crop_cache(cache, prefix_len)
    second = model.forward_mae_encoder(tokens, mask, text_mask, cache=cache)
    crop_cache(cache, prefix_len)
    out["x_enc_cache"], out["x_enc_cache_second_call"] = (first, MODULE), (second, MODULE)
    out["x_enc_nocache"] = (model.forward_mae_encoder(tokens, mask, text_mask, input_ids=ids), MODULE)
    embeds = model.llm.get_input_embeddings()(ids)
    out["x_enc_nocache_inputs_embeds"] = (model.forward_mae_encoder(tokens, mask, text_mask, inputs_embeds=embeds),
                                          MODULE)
    _, z_enc = model.extract_visual_feature(tokens, mask)
    full_mask, positions = context_mask_and_positions(text_mask, z_enc.shape[1])
    out["nocache_position_ids"] = (positions, EXACT)
    out["nocache_attention_mask"] = (full_mask, EXACT)
    out["nocache_inputs_embeds"] = (torch.cat([embeds, z_enc], dim=1), MODULE)
    out["cache_position_ids"] = (positions[:, -z_enc.shape[1]:], EXACT)
    return out


def _case_mae_decoder(model: Harmon, fx: Fixture) -> Computed:
    out: Computed = {"z": (model.mar.forward_mae_decoder(fx["x_enc"], fx["mask"], tuple(fx.meta["image_shape"])),
                           MODULE)}
    if "tokens_nonsquare" in fx.tensors:
        shape = tuple(fx.meta["nonsquare_image_shape"])
        t2, m2 = fx["tokens_nonsquare"], fx["mask_nonsquare"]
        x_enc = model.mar.forward_mae_encoder(t2, m2, model.mar.fake_latent.expand(t2.shape[0], -1), shape)
        out["x_enc_nonsquare"] = (x_enc, MODULE)
        out["z_nonsquare"] = (model.mar.forward_mae_decoder(x_enc, m2, shape), MODULE)
    return out


_SCHEDULE_TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "timestep_map")


def _case_diffloss(model: Harmon, fx: Fixture) -> Computed:
    dl = model.mar.diffloss
    net = dl.net
    x, t, c = fx["x"], fx["t"], fx["c"]
    # settings of this case's calls (see its "calls"); a fixture may override them in meta
    cfg = fx.meta.get("cfg", 3.0)
    out: Computed = {
        "timestep_embedding": (timestep_embedding(t, net.time_embed.frequency_embedding_size), SINUSOID),
        "net_out": (net(x, t, c), MODULE),
        "net_cfg_out": (net.forward_with_cfg(x, t, c, cfg), MODULE),
    }
    for prefix in sorted({n.split(".")[0] for n in fx.tensors if "." in n}):
        kind, _, steps = prefix.partition("_")
        if kind not in ("train", "gen"):
            continue
        process = dl.train_diffusion if kind == "train" else dl.sampling_process(steps)
        for table in _SCHEDULE_TABLES:
            if f"{prefix}.{table}" in fx.tensors:
                out[f"{prefix}.{table}"] = (torch.from_numpy(np.asarray(process.tables[table])), SCHEDULE)

    gen = dl.gen_diffusion
    def plain(xx, tt):
        return net(xx, tt, c)
    def guided(xx, tt):
        return net.forward_with_cfg(xx, tt, c, cfg)
    for prefix, fn in (("pmv", plain), ("pmv_cfg", guided)):
        res = gen.p_mean_variance(fn, fx["pmv_x_t"], fx["pmv_t"])
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            out[f"{prefix}.{key}"] = (res[key], MODULE)

    out.update(_diffloss_draws(dl, fx, plain, guided))
    return out


def _diffloss_draws(dl, fx: Fixture, plain, guided) -> Computed:
    """The diffloss case's random parts: single denoising steps, training losses, whole sampling loops, each
    from its own seed of the fixture's meta; ``plain`` / ``guided`` are the denoiser without and with
    guidance."""
    gen, x, c = dl.gen_diffusion, fx["x"], fx["c"]
    cfg = fx.meta.get("cfg", 3.0)
    ps_temperature = fx.meta.get("ps_temperature", 0.7)
    cfg_temperature = fx.meta.get("sample_cfg_temperature", 0.95)
    out: Computed = {}
    rng = ReferenceRNG(0, fx.meta["ps_seed"])
    noise = rng.normal(*fx["ps_x_t"].shape)
    res = gen.p_sample(plain, fx["ps_x_t"], fx["ps_t"], noise, temperature=ps_temperature)
    out["ps.noise"], out["ps.sample"], out["ps.pred_xstart"] = \
        (noise, MODULE), (res["sample"], MODULE), (res["pred_xstart"], MODULE)

    terms = dl.train_diffusion.training_losses(plain, fx["tl_x_start"], fx["tl_t"], fx["tl_noise"])
    for key in ("mse", "vb", "loss", "x_t"):
        out[f"tl.{key}"] = (terms[key], MODULE)

    rng = ReferenceRNG(0, fx.meta["fw_seed"])
    target = fx["tl_x_start"]
    fw_t = rng.timesteps(target.shape[0], dl.train_diffusion.num_timesteps)
    fw_noise = rng.normal(*target.shape)
    terms = dl.train_diffusion.training_losses(plain, target, fw_t, fw_noise)
    out["fw_t_drawn"], out["fw_noise_drawn"] = (fw_t, EXACT), (fw_noise, MODULE)
    out["fw_loss_terms"] = (terms["loss"], MODULE)
    out["fw_loss"] = (dl.loss(target, c, fx["fw_mask"], fw_t, fw_noise), MODULE)

    rng = ReferenceRNG(0, fx.meta["psl_seed"])
    trajectory, xt = [], fx["psl_noise"]
    for i in reversed(range(gen.num_timesteps)):
        step_t = torch.full((xt.shape[0],), i, dtype=torch.long)
        xt = gen.p_sample(plain, xt, step_t, rng.normal(*xt.shape), temperature=1.0)["sample"]
        trajectory.append(xt)
    out["psl_trajectory"], out["psl_out"] = (torch.stack(trajectory), SAMPLE), (xt, SAMPLE)

    # DiffLoss.sample with guidance: the original runs both halves from shared noise; the
    # package's sampler computes only the conditional half, checked against the same rows.
    n = c.shape[0] // 2
    rng = ReferenceRNG(0, fx.meta["sample_cfg_seed"])
    half = rng.normal(n, x.shape[1])
    both = gen.p_sample_loop(guided, torch.cat([half, half]), lambda: rng.normal(2 * n, x.shape[1]),
                             cfg_temperature)
    rng = ReferenceRNG(0, fx.meta["sample_cfg_seed"])
    fast = dl.sample(c, rng.start_noise(1, n, x.shape[1], True), lambda: rng.step_noise(1, n, x.shape[1], True),
                     temperature=cfg_temperature, cfg=cfg)
    out["sample_cfg_out"] = (both, SAMPLE)
    out["sample_cfg_out[:N/2] (DiffLoss.sample)"] = (fast, SAMPLE, "sample_cfg_out" + COND_HALF)

    rng = ReferenceRNG(0, fx.meta["sample_nocfg_seed"])
    first_noise = rng.start_noise(1, c.shape[0], x.shape[1], False)
    out["sample_nocfg_initial_noise"] = (first_noise, MODULE)
    out["sample_nocfg_out"] = (dl.sample(c, first_noise, lambda: rng.step_noise(1, c.shape[0], x.shape[1], False),
                                         temperature=1.0, cfg=1.0), SAMPLE)
    return out


class _Recorder:
    """Collects :class:`StepInfo` of a generation run."""

    def __init__(self):
        self.steps: list[StepInfo] = []

    def __call__(self, info: StepInfo) -> None:
        self.steps.append(StepInfo(info.step, info.num_iter, info.mask_to_pred.clone(), info.mask_len, info.cfg,
                                   info.z.clone(), info.sampled.clone(), info.tokens.clone()))


def _run_sample(model: Harmon, ids, mask, run: dict, *, cfg: float, schedule: str, temperature: float):
    rec = _Recorder()
    shape = tuple(run["image_shape"])
    stride = model.config.mar.vae_stride
    settings = GenerationSettings(guidance_scale=cfg, cfg_schedule=schedule, temperature=temperature,
                                  num_iter=run["num_iter"], height=shape[0] * stride, width=shape[1] * stride)
    rng = ReferenceRNG(run["np_seed"], run["torch_seed"])
    tokens = generate_latents(model, ids, mask, rng, settings, callback=rec)
    guided = cfg != 1.0
    b = tokens.shape[0]
    rows = 2 * b if guided else b
    drawn = ReferenceRNG(run["np_seed"], 0).orders(rows, shape[0] * shape[1], guided=False)
    orders = drawn[:b].repeat(2, 1) if guided else drawn
    pair = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    pred_step = torch.full((b, shape[0] * shape[1]), -1, dtype=torch.long)
    for s in rec.steps:
        pred_step[s.mask_to_pred] = s.step
    return {
        "tokens": pair(tokens), "orders": orders, "orders_drawn": drawn, "pred_step": pair(pred_step),
        "mask_to_pred": torch.stack([pair(s.mask_to_pred) for s in rec.steps]),
        "mask_len": torch.tensor([float(s.mask_len) for s in rec.steps]),
        "cfg": torch.tensor([s.cfg for s in rec.steps], dtype=torch.float32),
        "steps": rec.steps, "images": model.decode(tokens),
    }


def _case_mask_schedule(model: Harmon, fx: Fixture) -> Computed:
    out: Computed = {}
    for run in fx.meta["runs"]:
        seq, k = run["seq_len"], run["num_iter"]
        res = _run_sample(model, fx["input_ids"], fx["attention_mask"], run, cfg=run.get("cfg", 3.0),
                          schedule=run.get("cfg_schedule", "linear"), temperature=run.get("temperature", 1.0))
        sfx = f"_{seq}_{k}"
        out[f"orders{sfx}"], out[f"orders_drawn{sfx}"] = (res["orders"], EXACT), (res["orders_drawn"], EXACT)
        out[f"pred_step{sfx}"], out[f"mask_to_pred{sfx}"] = (res["pred_step"], EXACT), (res["mask_to_pred"], EXACT)
        out[f"mask_len{sfx}"], out[f"cfg{sfx}"] = (res["mask_len"], EXACT), (res["cfg"], MODULE)
        h, w = run["image_shape"]
        out[f"final_tokens{sfx}"] = (res["tokens"].view(-1, h, w, res["tokens"].shape[-1]), SAMPLE)
    return out


def _case_sample(model: Harmon, fx: Fixture) -> Computed:
    out: Computed = {}
    for name, run in fx.meta["runs"].items():
        guided = run["cfg"] != 1.0
        ids = fx["input_ids_cfg"] if guided else fx["input_ids_nocfg"]
        mask = fx["attention_mask_cfg"] if guided else fx["attention_mask_nocfg"]
        res = _run_sample(model, ids, mask, run, cfg=run["cfg"], schedule=run["cfg_schedule"],
                          temperature=run["temperature"])
        out[f"{name}.images"] = (res["images"], SAMPLE)
        out[f"{name}.final_tokens"] = (res["tokens"], SAMPLE)
        out[f"{name}.orders"], out[f"{name}.orders_drawn"] = (res["orders"], EXACT), (res["orders_drawn"], EXACT)
        out[f"{name}.mask_to_pred"], out[f"{name}.mask_len"] = (res["mask_to_pred"], EXACT), (res["mask_len"], EXACT)
        for s in res["steps"]:
            out[f"{name}.step{s.step}.z"] = (s.z, SAMPLE)
            key = f"{name}.step{s.step}.sampled"
            if guided:  # the unconditional twins' samples are discarded by the original, not computed here
                out[f"{key}[cond rows]"] = (s.sampled, SAMPLE, key + COND_HALF)
            else:
                out[key] = (s.sampled, SAMPLE)
    return out


def _case_image2text(model: Harmon, fx: Fixture) -> Computed:
    special = fx.folder_config["special_token_ids"]
    image_id = fx.meta["image_placeholder_id"]
    _, z_enc = model.extract_visual_feature(model.encode(fx["image"]))
    embeds = model.multimodal_embeds(fx["input_ids"], z_enc, image_id)
    logits = model.llm(inputs_embeds=embeds).logits
    gen = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(fx["input_ids"]),
                             do_sample=False, max_new_tokens=fx.meta["num_generated"],
                             eos_token_id=special["im_end_eos"], pad_token_id=special["pad_endoftext"],
                             return_dict_in_generate=True, output_scores=True)
    settings = DecodingSettings(max_new_tokens=fx.meta["num_generated"])
    ours = list(decode_tokens(model, embeds, {special["im_end_eos"]}, settings))
    if fx.meta.get("eos_hit"):
        ours.append(special["im_end_eos"])  # transformers keeps the stop token, our loop does not yield it
    return {"z_enc": (z_enc, MODULE), "inputs_embeds": (embeds, MODULE), "logits": (logits, MODULE),
            "generated_ids (transformers generate)": (gen.sequences, EXACT, "generated_ids"),
            "generated_ids (harmon decode loop)": (torch.tensor([ours]), EXACT, "generated_ids"),
            "generated_step_logits": (torch.stack(gen.scores, dim=1), MODULE)}


def _grads(model: Harmon, prefix: str, fx: Fixture, norms: dict[str, float | None]) -> Computed:
    params = dict(model.named_parameters())
    out: Computed = {}
    for name in fx.outputs:
        if name.startswith(prefix + "."):
            out[name] = (params[name[len(prefix) + 1:]].grad, MODULE)
    for name, norm in norms.items():
        grad = params[name].grad
        if norm is None:
            ok = grad is None or bool((grad == 0).all())
            out[f"{prefix} norm {name}"] = (torch.tensor(0.0 if ok else math.inf), EXACT, "")
        else:
            got = torch.tensor(float("nan") if grad is None else grad.norm().item(), dtype=torch.float64)
            out[f"{prefix} norm {name}"] = (got, MODULE, "")
    return out


def _case_training_losses(model: Harmon, fx: Fixture) -> Computed:
    out: Computed = {}
    model.requires_grad_(True)
    model.vae.requires_grad_(False)
    with torch.enable_grad():
        model.zero_grad(set_to_none=True)
        loss = image_to_text_loss(model, fx["i2t_input_ids"], fx["i2t_attention_mask"], fx["i2t_labels"],
                                  fx["i2t_pixel_values"])
        loss.backward()
        out["i2t_loss"] = (loss, MODULE)
        out.update(_grads(model, "i2t_grad", fx, fx.meta["i2t_grad_norms"]))
        model.zero_grad(set_to_none=True)
        out["i2t_noimg_loss"] = (image_to_text_loss(model, fx["i2t_noimg_input_ids"], fx["i2t_attention_mask"],
                                                    fx["i2t_labels"], None), MODULE)
        model.zero_grad(set_to_none=True)
        rng = ReferenceRNG(fx.meta["t2i_np_seed"], fx.meta["t2i_torch_seed"])
        res = text_to_image_loss(model, fx["t2i_pixel_values"], fx["t2i_input_ids"], fx["t2i_attention_mask"], rng)
        res.loss.backward()
    out["t2i_loss"] = (res.loss, MODULE)
    out["t2i_orders"], out["t2i_mask"] = (res.orders, EXACT), (res.mask, EXACT)
    out["t2i_gt_latents"], out["t2i_z"] = (res.latents, MODULE), (res.z, MODULE)
    out["t2i_t"], out["t2i_noise"] = (res.timesteps, EXACT), (res.noise, MODULE)
    for key in ("mse", "vb", "loss"):
        out[f"t2i_terms.{key}"] = (res.terms[key], MODULE)
    out.update(_grads(model, "t2i_grad", fx, fx.meta["t2i_grad_norms"]))
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return out


CASES: dict[str, Callable[[Harmon, Fixture], Computed]] = {
    "a_vae_encode": _case_vae_encode,
    "b_vae_decode": _case_vae_decode,
    "c_mae_encoder": _case_mae_encoder,
    "d_llm_context_encoder": _case_llm_context,
    "e_mae_decoder": _case_mae_decoder,
    "f_diffloss": _case_diffloss,
    "g_mask_schedule": _case_mask_schedule,
    "h_sample": _case_sample,
    "i_image2text": _case_image2text,
    "j_training_losses": _case_training_losses,
}
