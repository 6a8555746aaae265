"""The shapes recipe: tokenizer and VAE training, the head's precision under autocast, the whole recipe at
toy scale (resumable), and the shipped default model."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.config import VAEConfig, shapes
from harmon.errors import InputError
from harmon.models.diffusion_head import SimpleMLPAdaLN
from harmon.models.vae import AutoencoderKL
from harmon.settings import DecodingSettings, GenerationSettings
from harmon.shapes import world
from harmon.shapes.datasets import scene_for_index
from harmon.shapes.recipe import RecipeConfig, run_recipe
from harmon.tokenizer import train_small_tokenizer
from harmon.train.vae import VAETrainConfig, latent_scale, train_vae, vae_loss

TEXTS = ["<|im_start|>user\nGenerate an image: a red circle<|im_end|>\n<|im_start|>assistant\n",
         "<|im_start|>user\n<image>\nWhat color is the square?<|im_end|>\n<|im_start|>assistant\nblue<|im_end|>"] * 20


def test_small_tokenizer_learns_words_and_round_trips_anything():
    tok = train_small_tokenizer(TEXTS, 400)
    again = train_small_tokenizer(TEXTS, 400)
    assert tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()  # same texts, same tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")] \
        == [0, 1, 2, 3]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    assert len(tok) <= 400
    assert tok.tokenize(" circle") == ["Ġcircle"]  # a word of the texts is one token
    for text in TEXTS[:2] + ["Ünïcode 😀 and words never seen"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="at least 260"):
        train_small_tokenizer(TEXTS, 100)


def _scenes(n: int, seed: int = 0) -> torch.Tensor:
    arrays = [np.asarray(world.render(scene_for_index(seed, i)[0])) for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_vae_training_reduces_the_reconstruction_error_reproducibly():
    torch.manual_seed(0)
    cfg = VAEConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=64,
                    encoder_attn_resolutions=())
    images = _scenes(8)
    initial = AutoencoderKL(cfg)
    runs = [copy.deepcopy(initial), copy.deepcopy(initial)]
    settings = VAETrainConfig(steps=40, batch_size=4, lr=2e-3, warmup_steps=5, log_every=10, bfloat16=False)
    histories = [train_vae(v, images, settings, torch.Generator().manual_seed(3), progress=False) for v in runs]
    # same batches and posterior draws; equal up to the rounding of multi-threaded convolution gradients
    assert [h["loss"] for h in histories[0]] == pytest.approx([h["loss"] for h in histories[1]], rel=1e-3)
    with torch.no_grad():
        start = vae_loss(initial, images.float() / 127.5 - 1, 1e-6)["mse"]
        end = vae_loss(runs[0], images.float() / 127.5 - 1, 1e-6)["mse"]
    assert end < start / 3, (float(start), float(end))
    assert not any(p.requires_grad for p in runs[0].parameters()) and not runs[0].training
    scale = latent_scale(runs[0], images)
    with torch.no_grad():
        means = runs[0].encode(images.float() / 127.5 - 1).mode()
    assert float((means * scale).std()) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        train_vae(runs[0], images.float(), settings, torch.Generator())


def test_decoder_only_training_keeps_the_latents():
    """decoder_only trains the decoder (and post_quant_conv) and leaves the encoder, so every latent, as it was;
    here it learns the empty canvas that the decoder stage of the recipe adds."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=64,
                                  encoder_attn_resolutions=()))
    images = torch.cat([_scenes(4), torch.tensor(world.BACKGROUND, dtype=torch.uint8).view(1, 3, 1, 1)
                        .expand(4, 3, 64, 64)])
    before = copy.deepcopy(vae.state_dict())
    settings = VAETrainConfig(steps=30, batch_size=4, lr=2e-3, warmup_steps=5, log_every=10, bfloat16=False,
                              decoder_only=True)
    history = train_vae(vae, images, settings, torch.Generator().manual_seed(3), progress=False)
    after = vae.state_dict()
    trained = [k for k in after if k.startswith(("decoder.", "post_quant_conv."))]
    assert trained and all(not torch.equal(after[k], before[k]) for k in trained if k.endswith("weight"))
    assert all(torch.equal(after[k], before[k]) for k in after if k not in trained)
    assert history[-1]["loss"] < history[0]["loss"]
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_recipe_decoder_stage_trains_the_decoder_alone(tmp_path):
    from harmon.shapes.recipe import refine_decoder

    with pytest.raises(ValueError, match="decoder_only must be true"):
        refine_decoder(tmp_path, tmp_path, tmp_path / "out", RecipeConfig(decoder=VAETrainConfig(steps=1)))


def test_posterior_sampling_and_kl():
    vae = AutoencoderKL(VAEConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                  resolution=32, encoder_attn_resolutions=()))
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    a = posterior.sample(torch.Generator().manual_seed(1))
    b = posterior.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, posterior.mode())
    expected = 0.5 * (posterior.mean ** 2 + posterior.logvar.exp() - 1 - posterior.logvar).flatten(1).sum(1)
    torch.testing.assert_close(posterior.kl(), expected)


def test_diffusion_head_keeps_full_precision_under_autocast():
    head = SimpleMLPAdaLN(8, 64, 16, 32, 2)
    for p in head.parameters():  # non-zero output layer, so the comparison means something
        torch.nn.init.normal_(p, std=0.1)
    x, t, c = torch.randn(5, 8), torch.tensor([999, 500, 10, 0, 999]), torch.randn(5, 32)
    reference = head(x, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = head(x, t, c)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, rtol=0, atol=0)


def test_recipe_at_toy_scale_runs_resumes_and_refuses_other_settings(tmp_path):
    from harmon.checkpoint import load_model
    from harmon.hub import load_tokenizer
    from harmon.pipelines import ImageToTextPipeline, TextToImagePipeline

    cfg = RecipeConfig(n_images=12, vae=VAETrainConfig(steps=2, batch_size=4, log_every=1), steps=2,
                       t2i_batch_size=4, i2t_batch_size=2, save_every=1, compile=False, progress=False,
                       local_decoder_after=1, latent_readout=1.0, restarts=2, restart_steps=1, restart_lr=5e-4,
                       decoder=VAETrainConfig(steps=2, batch_size=4, log_every=1, bfloat16=False, decoder_only=True))
    model_dir = run_recipe(tmp_path / "run", cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "harmon" / "log.jsonl").read_text().splitlines()]
    assert all(r["t2i_readout"] > 0 for r in log)
    record = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert set(record["seconds"]) == {"data", "tokenizer", "vae", "init", "local", "harmon", "restart1", "restart2",
                                        "decoder", "total"}
    vae_scale = json.loads((tmp_path / "run" / "vae" / "scale.json").read_text())["vae_scale"]
    model = load_model(model_dir)
    # made local after step 1 (positions cos/sin * 4 * LOCAL_TOKEN_SCALE), then one more step of AdamW at lr <= 1e-3
    first_cell = model.mar.decoder_pos_embed_learned[0, model.buffer_size, :4].detach()
    torch.testing.assert_close(first_cell, torch.tensor([16.0, 0.0, 16.0, 0.0]), atol=0.01, rtol=0)
    assert model.config.name == "shapes" and model.config.vae_scale == pytest.approx(vae_scale)
    assert model.config.image_size == 64 and model.config.mar.vae_stride == 8
    tokenizer = load_tokenizer(model_dir, 512)
    assert len(tokenizer) <= 512 and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    short = GenerationSettings(num_iter=2, num_steps=2)
    image = TextToImagePipeline(model, tokenizer)("a red circle", short, seeds=[0], progress=False).images[0]
    assert image.size == (64, 64)
    assert isinstance(ImageToTextPipeline(model, tokenizer)(image, "Describe the image.",
                                                            DecodingSettings(max_new_tokens=4)), str)

    # a second call finds every stage done: the same model, no stage re-run
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    refined = load_file(str(tmp_path / "run" / "decoder" / "model.safetensors"))  # float32, as trained
    exported = load_file(str(tmp_path / "run" / "restart2" / "final" / "model.safetensors"))
    first = load_file(str(tmp_path / "run" / "harmon" / "final" / "model.safetensors"))
    restarted = load_file(str(tmp_path / "run" / "restart1" / "final" / "model.safetensors"))
    assert weights.keys() == refined.keys() == exported.keys() == first.keys() == restarted.keys()
    # each restart went on from the run before it: one step of its own, which moved the Harmon's weights
    for name, started_from in (("restart1", "harmon"), ("restart2", "restart1")):
        restart_log = [json.loads(line) for line in (tmp_path / "run" / name / "log.jsonl").read_text().splitlines()]
        restart_cfg = json.loads((tmp_path / "run" / name / "train_config.json").read_text())
        assert [r["step"] for r in restart_log] == [1] and restart_cfg["optim"]["lr"] == 5e-4
        assert restart_cfg["model"] == str(tmp_path / "run" / started_from / "final")
    assert not torch.equal(first["mar.mask_token"], restarted["mar.mask_token"])
    assert not torch.equal(restarted["mar.mask_token"], exported["mar.mask_token"])
    assert all(weights[k].dtype == torch.float16 and torch.equal(weights[k], refined[k].half()) for k in weights)
    # the decoder stage trained the VAE's decoder and nothing else
    decoder = [k for k in weights if k.startswith(("vae.decoder.", "vae.post_quant_conv."))]
    assert decoder and any(not torch.equal(refined[k], exported[k]) for k in decoder)
    assert all(torch.equal(refined[k], exported[k]) for k in weights if k not in decoder)
    log = [json.loads(line) for line in (tmp_path / "run" / "decoder" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert run_recipe(tmp_path / "run", cfg) == model_dir
    again = load_file(str(model_dir / "model.safetensors"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert json.loads((tmp_path / "run" / "recipe.json").read_text())["seconds"]["vae"] == record["seconds"]["vae"]
    with pytest.raises(InputError, match=r"other settings \(n_images: 12 -> 13; steps: 2 -> 3\): continue it"):
        run_recipe(tmp_path / "run", dataclasses.replace(cfg, n_images=13, steps=3))
    with pytest.raises(ValueError, match="local_decoder_after must be a multiple of save_every"):
        RecipeConfig(local_decoder_after=100)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(InputError, match=f"restarts must be a whole number >= 0, got {bad!r}"):
            RecipeConfig(restarts=bad)
    for bad in (0, 2.0, None):
        with pytest.raises(InputError, match=f"restart_steps must be a whole number >= 1, got {bad!r}"):
            RecipeConfig(restart_steps=bad)
    for lr in (0.0, -1e-4, float("nan"), float("inf"), "1e-4", True):
        with pytest.raises(InputError, match="restart_lr must be a positive number"):
            RecipeConfig(restart_lr=lr)


def test_shapes_preset_is_consistent():
    config = shapes()
    assert config.mar.seq_len == 64 and config.vae.stride == 8 and config.mar.vae_embed_dim == 8
    assert config.image_size == config.mar.img_size == world.DEFAULT_SIZE
    assert config.mar.num_sampling_steps == "ddim100"


# -- the shipped default model ---------------------------------------------------------------------------
def test_the_default_model_ships_with_the_package_and_works(tmp_path, capsys):
    from harmon.checkpoint import load_model
    from harmon.cli import main
    from harmon.hub import default_model_folder, load_tokenizer
    from harmon.pipelines import TextToImagePipeline
    from harmon.shapes.detect import analyze

    folder = default_model_folder()
    model = load_model(folder)
    assert model.config.name == "shapes" and model.config.mar.num_sampling_steps == "ddim100"
    tokenizer = load_tokenizer(folder, int(model.config.llm["vocab_size"]))
    pipe = TextToImagePipeline(model, tokenizer)
    images = pipe("a red circle", num_images_per_prompt=2, seeds=[0, 1], progress=False).images
    assert [im.size for im in images] == [(64, 64)] * 2
    for im in images:  # a plain background (with or without objects), never a washed-out noisy frame
        distance = np.linalg.norm(np.asarray(im, dtype=np.float32) - np.array(world.BACKGROUND), axis=-1)
        assert float(((distance > 12) & (distance < 80)).mean()) < 0.25
    assert any(analyze(im) for im in images)  # seed 0 draws nothing (a plain canvas), seed 1 a red square
    alone = np.asarray(pipe("a red circle", seeds=[1], progress=False).images[0], dtype=np.int16)
    assert np.abs(alone - np.asarray(images[1], dtype=np.int16)).max() <= 2  # a seed's image, alone or batched

    # the command line uses it when --model is absent
    out = tmp_path / "circle.png"
    assert main(["generate", "a red circle to the left of a blue square", "--seed", "0", "--out", str(out),
                 "-q"]) == 0
    assert out.is_file() and Image.open(out).size == (64, 64)
    scene = world.Scene((world.Obj("square", "blue", 32, 32, 20),), 64, "single_object", "a blue square")
    world.render(scene).save(tmp_path / "square.png")
    capsys.readouterr()
    assert main(["describe", str(tmp_path / "square.png"), "Describe the image."]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and set(answer.split()) <= world.answer_words(), answer  # a caption in the world's language


def test_shipped_decoder_draws_the_empty_canvas_plain():
    """The shipped model's VAE decodes the latent of an empty canvas as a plain canvas; before the recipe's decoder
    stage it drew a washed-out noisy frame (a decoder that had never seen an empty canvas; docs/shapes.md)."""
    from harmon.checkpoint import load_model
    from harmon.hub import default_model_folder
    from harmon.processing import image_to_tensor

    model = load_model(default_model_folder(), dtype=torch.float32)
    canvas = Image.new("RGB", (64, 64), world.BACKGROUND)
    with torch.no_grad():
        decoded = model.decode(model.encode(image_to_tensor(canvas, 64)))  # (1, 3, 64, 64) in [-1, 1]
    pixels = (decoded.clamp(-1, 1) + 1) * 127.5
    distance = (pixels - torch.tensor(world.BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)).norm(dim=1)
    assert float((distance > 12).float().mean()) < 0.05, float((distance > 12).float().mean())


def test_recipe_precision_follows_the_cpu(monkeypatch):
    """"auto" trains in bfloat16 only where the CPU has bf16 matrix instructions (elsewhere bf16 autocast is
    many times slower than float32), VAE stage included; an explicit choice is kept; others are refused."""
    from harmon.shapes import recipe
    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: False)
    cfg = RecipeConfig()
    assert cfg.precision == "float32" and not cfg.vae.bfloat16 and cfg.to_dict()["precision"] == "float32"
    assert RecipeConfig(precision="bfloat16").vae.bfloat16
    monkeypatch.setattr(recipe, "cpu_has_bf16", lambda: True)
    assert RecipeConfig().precision == "bfloat16" and RecipeConfig().vae.bfloat16
    assert not RecipeConfig(precision="float32").vae.bfloat16
    with pytest.raises(InputError, match="precision must be"):
        RecipeConfig(precision="fp8")


def test_train_shapes_takes_the_precision_from_its_flag(monkeypatch, tmp_path, capsys):
    """`harmon train-shapes --precision P` hands P to the recipe (so that a run started in bfloat16 can be
    continued on a CPU whose "auto" says float32); a precision outside the three is a usage error."""
    from harmon.cli import main
    from harmon.cli import train as train_cli
    seen = []

    def fake_recipe(out, cfg):
        seen.append(cfg)
        (tmp_path / "recipe.json").write_text(json.dumps({"seconds": {}}))
        return tmp_path / "model"

    monkeypatch.setattr(train_cli, "run_recipe", fake_recipe)
    assert main(["train-shapes", "--out", str(tmp_path), "--precision", "bfloat16", "-q"]) == 0
    assert main(["train-shapes", "--out", str(tmp_path), "--precision", "float32"]) == 0
    assert [(c.precision, c.vae.bfloat16, c.progress) for c in seen] == [("bfloat16", True, False),
                                                                          ("float32", False, True)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["train-shapes", "--out", str(tmp_path), "--precision", "fp16"])
    assert stop.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
