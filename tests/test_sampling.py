"""The generation loop: seeds, batch independence, no global RNG, dtypes, and the schedules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harmon.checkpoint import load_model
from harmon.errors import InputError
from harmon.models.harmon import crop_cache, reserve_room
from harmon.rng import ReferenceRNG, SeededRNG
from harmon.sampling import cfg_at_step, generate_latents, next_mask_len
from harmon.settings import GenerationSettings

EOS = 992  # the tiny fixture's <|im_end|> stand-in, used as right padding


def prompts(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists with EOS: (ids, attention mask)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), EOS, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


COND_A = [991, 5, 17, 300, 42, 992, 10, 991, 7, 10]
COND_B = [991, 5, 17, 88, 99, 123, 456, 77, 992, 10, 991, 7, 10]
UNCOND = [991, 5, 17, 8, 992, 10, 991, 7, 10]


# a 4 x 4 latent grid of the tiny model (VAE stride 16)
SMALL = GenerationSettings(height=64, width=64, num_iter=4, guidance_scale=3.0, temperature=1.0)


def generate(model, conds, seeds, callback=None, **changes):
    """Guided latents of ``conds`` (each followed by its unconditional prompt) with SMALL + ``changes``."""
    ids, mask = prompts(conds + [UNCOND] * len(conds))
    return generate_latents(model, ids, mask, SeededRNG.from_seeds(seeds), SMALL.replace(**changes),
                            callback=callback)


def assert_close_rel(a, b, rel=1e-4):
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3e} vs scale {scale:.3e}"


def test_same_seed_same_image_alone_or_in_batch(reference_model):
    batch = generate(reference_model, [COND_A, COND_B], [11, 22])
    alone_b = generate(reference_model, [COND_B], [22])
    alone_a = generate(reference_model, [COND_A], [11])
    assert_close_rel(batch[1], alone_b[0])
    assert_close_rel(batch[0], alone_a[0])
    # different seeds give different images
    other = generate(reference_model, [COND_B], [23])
    assert (other - alone_b).abs().max() > 1e-3 * alone_b.abs().max()


def test_seeded_generation_is_repeatable_and_leaves_global_rng_alone(reference_model):
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    first = generate(reference_model, [COND_A], [5], cfg_schedule="linear", temperature=0.8)
    second = generate(reference_model, [COND_A], [5], cfg_schedule="linear", temperature=0.8)
    assert torch.equal(first, second)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()


def test_reference_rng_is_repeatable_and_local(reference_model):
    ids, mask = prompts([COND_A, UNCOND])
    torch_state = torch.random.get_rng_state()
    runs = [generate_latents(reference_model, ids, mask, ReferenceRNG(3, 4), GenerationSettings(height=64, num_iter=3))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_without_guidance_and_non_square(reference_model):
    ids, mask = prompts([COND_A, COND_B])
    settings = GenerationSettings(height=48, width=80, num_iter=5, guidance_scale=1.0, num_steps=4)
    out = generate_latents(reference_model, ids, mask, SeededRNG.from_seeds([1, 2]), settings)
    assert out.shape == (2, 3, 5, 16)
    assert torch.isfinite(out).all()
    images = reference_model.decode(out)
    assert images.shape == (2, 3, 48, 80)


def test_callback_reports_each_token_once(reference_model):
    steps = []
    generate(reference_model, [COND_A], [0], num_iter=6, callback=steps.append)
    assert [s.step for s in steps] == list(range(6))
    counts = torch.stack([s.mask_to_pred[0] for s in steps]).sum(0)
    assert counts.tolist() == [1] * 16  # every token predicted exactly once


def test_bfloat16_generation_and_understanding(tiny_fixture_dir, reference_model):
    model = load_model(tiny_fixture_dir, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out = generate(model, [COND_A], [7], num_iter=2)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats16 = model.extract_visual_feature(model.encode(image.bfloat16()))[1].float()
    feats32 = reference_model.extract_visual_feature(reference_model.encode(image))[1]
    assert_close_rel(feats16, feats32, rel=5e-2)


def test_batch_of_wrong_parity_and_bad_settings_raise(reference_model):
    ids, mask = prompts([COND_A, COND_B, UNCOND])
    settings = GenerationSettings(height=64, guidance_scale=3.0)
    with pytest.raises(InputError, match="even"):
        generate_latents(reference_model, ids, mask, SeededRNG.from_seeds([1]), settings)
    ids, mask = prompts([COND_A, UNCOND])
    with pytest.raises(InputError, match="one per image"):
        generate_latents(reference_model, ids, mask, SeededRNG.from_seeds([1, 2]), settings)
    with pytest.raises(InputError, match="cfg_schedule"):
        cfg_at_step(3.0, "cosine", 16, 4)


def test_compiled_sampling_runs_the_compiled_parts_and_gives_the_same_tokens(tiny_fixture_dir, reference_model):
    model = load_model(tiny_fixture_dir, dtype=torch.float32)
    keys = list(model.state_dict())
    traced = []

    def backend(graph, example_inputs):  # records what was compiled, then runs it as traced (no inductor: quick)
        traced.append({node.target for node in graph.graph.nodes})
        return graph.forward

    model.compile_for_sampling(backend=backend)
    compiled = generate(model, [COND_A], [9], num_iter=3)
    assert_close_rel(compiled, generate(reference_model, [COND_A], [9], num_iter=3), rel=1e-5)
    assert list(model.state_dict()) == keys  # compiled in place: checkpoints still load and save
    targets = set().union(*traced)
    # the diffusion head's network (reached through forward_with_cfg) and the MAR blocks were traced
    assert torch.nn.functional.silu in targets and torch.nn.functional.scaled_dot_product_attention in targets


def test_mar_selects_visible_tokens_without_reading_the_mask(reference_model):
    # On the meta device nothing can be read back: a data-dependent step (boolean indexing, .item())
    # raises there, and would wait for the device on an accelerator. Given the count, none is needed.
    with torch.device("meta"):
        mar = type(reference_model.mar)(reference_model.mar.cfg)
    b, (h, w) = 2, (reference_model.mar.seq_h, reference_model.mar.seq_w)
    tokens = torch.empty(b, h * w, reference_model.token_dim, device="meta")
    mask = torch.empty(b, h * w, device="meta")
    x_enc = mar.forward_mae_encoder(tokens, mask, mar.fake_latent.expand(b, -1), (h, w), num_masked=5)
    assert x_enc.shape == (b, mar.buffer_size + h * w - 5, mar.cfg.encoder_embed_dim)
    assert mar.forward_mae_decoder(x_enc, mask, (h, w)).shape == (b, h * w, mar.cfg.decoder_embed_dim)
    # without the count the encoder reads it from the mask, and refuses rows that hide different numbers
    tokens = torch.randn(b, h * w, reference_model.token_dim)
    mask = torch.zeros(b, h * w)
    mask[0, :3], mask[1, :4] = 1.0, 1.0
    with pytest.raises(ValueError, match="same number of tokens"):
        reference_model.extract_visual_feature(tokens.view(b, h, w, -1), mask)


def test_mask_schedule_formula():
    # 256 tokens in 64 steps: recorded by the reference (case g, run 1), first and last steps
    lens, masked = [], 256
    for step in range(64):
        n = next_mask_len(256, step, 64, masked)
        lens.append(n)
        masked = n
    assert lens[:5] == [255, 254, 253, 252, 251] and lens[-4:] == [18, 12, 6, 1]
    assert next_mask_len(16, 0, 1, 16) == 1  # one step: clamped to >= 1, the loop predicts all remaining
    assert cfg_at_step(3.0, "linear", 16, 14) == 1.25 and cfg_at_step(3.0, "constant", 16, 14) == 3.0


def test_respacing_strings_of_the_original():
    from harmon.diffusion import GaussianDiffusion, ddim_count, respaced_timesteps

    assert respaced_timesteps(1000, "100")[-1] == 999 and len(respaced_timesteps(1000, "100")) == 100
    assert respaced_timesteps(1000, "ddim100") == list(range(0, 1000, 10))
    assert respaced_timesteps(1000, "ddim5") == [0, 200, 400, 600, 800]
    with pytest.raises(ValueError, match="integer stride"):
        respaced_timesteps(1000, "ddim37")
    assert ddim_count(1000, 37) == 39 and ddim_count(1000, 44) == 44  # ddim38 (stride 27) would end at 999
    assert all(respaced_timesteps(1000, f"ddim{ddim_count(1000, n)}")[-1] < 999 for n in range(2, 200))
    # the first step of "100" amplifies an error of the predicted noise ~300x, that of "ddim100" ~1.5x
    for spec, lo, hi in (("100", 250, 400), ("ddim100", 0.5, 3)):
        tables = GaussianDiffusion.respaced(spec).tables
        gain = tables["sqrt_recipm1_alphas_cumprod"][-1] * tables["posterior_mean_coef1"][-1]
        assert lo < gain < hi, (spec, gain)


def test_step_counts_keep_the_models_respacing_style():
    from harmon.models.diffusion_head import DiffLoss

    released, ddim = DiffLoss(4, 8, 16, 1, "100"), DiffLoss(4, 8, 16, 1, "ddim100")
    assert released.sampling_spec(None) == "100" and released.sampling_spec(37) == "37"
    assert ddim.sampling_spec(None) == "ddim100" and ddim.sampling_spec(37) == "ddim39"
    assert ddim.sampling_spec("10,5") == "10,5" and ddim.sampling_spec("ddim25") == "ddim25"
    assert ddim.sampling_process(37).timestep_map[-1] == 26 * 38


def test_roomy_cache_appends_and_crops_in_one_buffer(reference_model):
    ids, _ = prompts([COND_A, UNCOND])
    dynamic = reference_model.prefill(ids)
    roomy = reserve_room(reference_model.prefill(ids), room=5)
    prompt_len = ids.shape[1]
    buffer = roomy.layers[0]._keys.data_ptr()
    rows, heads, _, dim = roomy.layers[0].keys.shape
    for n in (3, 5, 2):  # one loop iteration each: append n image positions, attend, crop back to the prompt
        new_k, new_v = torch.randn(2, rows, heads, n, dim).unbind(0)
        keys, values = roomy.layers[0].update(new_k, new_v)
        expected_k, expected_v = dynamic.layers[0].update(new_k, new_v)
        assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
        assert keys.data_ptr() == buffer and roomy.get_seq_length() == prompt_len + n
        crop_cache(roomy, prompt_len)
        crop_cache(dynamic, prompt_len)
        assert roomy.layers[0].keys.data_ptr() == buffer and roomy.get_seq_length() == prompt_len
    with pytest.raises(ValueError, match="room for"):
        roomy.layers[0].update(*torch.randn(2, rows, heads, 6, dim).unbind(0))
