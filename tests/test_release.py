"""The official Hugging Face release layout (``wusize/Harmon-*``): reading it, matching the ``.pth`` path,
writing it back (``harmon export``), and the errors that name what is wrong.

The full-size models are checked on the meta device against ``../shared/reference/manifests``; end to end,
the smallest model the layout allows (MAR-Base and the fixed KL-16 VAE around a tiny LLM, 237 M parameters,
written in bfloat16) is built once per module.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_helpers import assert_user_error
from harmon import checkpoint as ckpt
from harmon import saving
from harmon.checkpoint import CheckpointError
from harmon.cli import main
from harmon.config import PRESETS, HarmonConfig, MARConfig
from harmon.hub import load_pretrained
from harmon.models.harmon import Harmon, qwen2_config
from harmon.models.init import init_weights
from harmon.pipelines import EditPipeline, ImageToTextPipeline, TextToImagePipeline
from harmon.release import MAR_TYPES, RELEASE_VAE, RELEASE_VAE_SCALE, config_from_release, release_config
from harmon.settings import DecodingSettings, GenerationSettings
from harmon.tokenizer import build_byte_tokenizer, save_tokenizer

# transformers 4.45's bookkeeping in a saved Qwen2 config: what the release's llm dict carries beside the sizes
QWEN2_BOOKKEEPING = {
    "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "torch_dtype": "bfloat16", "transformers_version": "4.45.2", "return_dict": True, "output_hidden_states": False,
    "output_attentions": False, "torchscript": False, "use_bfloat16": False, "tf_legacy_loss": False,
    "pruned_heads": {}, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "finetuning_task": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "tokenizer_class": None, "prefix": None, "pad_token_id": None,
    "sep_token_id": None, "decoder_start_token_id": None, "task_specific_params": None, "problem_type": None,
    "use_cache": True, "rope_scaling": None, "_attn_implementation_autoset": True}
MAR_SIZE_KEYS = {"encoder_embed_dim", "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth",
                 "decoder_num_heads", "mlp_ratio", "norm_layer_eps"}


def release_config_json(llm: dict, mar_type: str, mar_kwargs: dict) -> dict:
    """A config.json as the release writes it: bookkeeping, a whole saved Qwen2 config, MAR kwargs + type."""
    return {"_name_or_path": "wusize/Harmon", "architectures": ["HarmonModel"],
            "auto_map": {"AutoConfig": "configuration_harmon.HarmonConfig",
                         "AutoModel": "modeling_harmon.HarmonModel"},
            "llm": {**QWEN2_BOOKKEEPING, **llm},
            "mar": {"type": mar_type, **{k: v for k, v in mar_kwargs.items() if k not in MAR_SIZE_KEYS}},
            "model_type": "harmon", "torch_dtype": "bfloat16", "transformers_version": "4.45.2"}


def _shapes(config: HarmonConfig) -> dict[str, tuple[int, ...]]:
    return ckpt.expected_keys(config)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), f"only left {sorted(set(a) - set(b))[:5]}, only right {sorted(set(b) - set(a))[:5]}"
    differing = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing[:10]} ({len(differing)} in all)"


# -- 1. full size, on the meta device -------------------------------------------------------------------
@pytest.mark.parametrize("name, mar_type, preset", [("harmon_0.5b", "mar_base", "harmon-0.5b"),
                                                    ("harmon_1.5b", "mar_huge", "harmon-1.5b")])
def test_full_size_release_config_matches_manifest_and_pth_path(name, mar_type, preset, manifests_dir):
    manifest = json.loads((manifests_dir / f"{name}.json").read_text())
    config = config_from_release(release_config_json(manifest["llm_config"], mar_type, manifest["mar_kwargs"]))
    assert config.name == preset
    ours = _shapes(config)
    assert ours == {e["key"]: tuple(e["shape"]) for e in manifest["keys"]}  # every key, VAE included
    pth_path = PRESETS[preset]()  # what `harmon convert` / load_original infer for harmon_*.pth
    assert ours == _shapes(pth_path)
    # the release keeps the original's training switch grad_checkpointing=True; it does not change a number
    assert dataclasses.replace(config.mar, grad_checkpointing=False) == pth_path.mar and config.vae == pth_path.vae and config.vae_scale == pth_path.vae_scale
    a, b = qwen2_config(config.llm), qwen2_config(pth_path.llm)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
                  "use_sliding_window", "bos_token_id", "eos_token_id"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.rope_parameters == b.rope_parameters


@pytest.mark.parametrize("mar_type", sorted(MAR_TYPES))
def test_every_mar_type_round_trips_through_the_release_config(mar_type):
    dim, depth, heads = MAR_TYPES[mar_type]
    preset = PRESETS["harmon-0.5b"]()
    config = dataclasses.replace(preset, mar=dataclasses.replace(
        preset.mar, encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=dim,
        decoder_depth=depth, decoder_num_heads=heads))
    written = release_config(config, "bfloat16")
    assert written["mar"]["type"] == mar_type and written["llm"]["model_type"] == "qwen2"
    assert config_from_release(json.loads(json.dumps(written))) == config


# -- 2. the smallest release folder, end to end ------------------------------------------------------------
SMALL_LLM = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 512,
             "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "use_sliding_window": False,
             "attention_dropout": 0.0}
SMALL_MAR = MARConfig(img_size=32, buffer_size=4, class_num=2, diffloss_d=1, diffloss_w=64, num_sampling_steps="5",
                      attn_dropout=0.0, proj_dropout=0.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The smallest model the release layout allows, written as the release (bfloat16, both tied keys, byte
    tokenizer, transformers' bookkeeping) and as harmon_*.pth + kl16.ckpt from the same bfloat16 tensors."""
    root = tmp_path_factory.mktemp("release")
    config = HarmonConfig(llm=SMALL_LLM, mar=SMALL_MAR, vae=RELEASE_VAE, vae_scale=RELEASE_VAE_SCALE,
                          name="harmon-release", image_size=32, num_iter=2)
    with torch.random.fork_rng(devices=[]):
        model = Harmon(config)
    init_weights(model, torch.Generator().manual_seed(0))
    model = model.to(torch.bfloat16)
    release, original = root / "release", root / "original"
    saving.save_release(model, release, dtype=torch.bfloat16)
    # the config.json as the release would write it (no 'harmon' section; transformers' bookkeeping)
    (release / "config.json").write_text(json.dumps(release_config_json(
        SMALL_LLM, "mar_base", dataclasses.asdict(SMALL_MAR))))
    save_tokenizer(build_byte_tokenizer(), release)
    original.mkdir()
    saving.save_original(model, original / "harmon_small.pth", original / "kl16.ckpt")
    return release, original


def _image_and_answer(model, tokenizer, tmp_path):
    settings = GenerationSettings(height=32, num_iter=2, num_steps=3)
    image = TextToImagePipeline(model, tokenizer)("a red circle", settings, seeds=[3], output_type="pt",
                                                  progress=False).images
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(photo)
    answer = ImageToTextPipeline(model, tokenizer, image_size=32)(str(photo), "What is it?", DecodingSettings(6))
    return image, answer


def test_release_folder_loads_as_the_pth_files_do(small, tmp_path):
    release, original = small
    model, tokenizer = load_pretrained(release, dtype=torch.float32)
    assert model.config.name == "harmon-release" and model.config.mar.encoder_embed_dim == 768
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    stored = _tensors(release / "model.safetensors")
    assert "vae.encoder.conv_in.weight" in stored and ckpt.TIED_KEY in stored and ckpt.EMBED_KEY in stored
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # cast while loading
    pth = ckpt.load_original(original / "harmon_small.pth", original / "kl16.ckpt", config=model.config)
    _assert_same_tensors(model.state_dict(), pth.state_dict())
    image_a, answer_a = _image_and_answer(model, tokenizer, tmp_path)
    image_b, answer_b = _image_and_answer(pth, build_byte_tokenizer(), tmp_path)
    assert torch.equal(image_a, image_b) and answer_a == answer_b
    assert image_a.shape == (1, 3, 32, 32) and torch.isfinite(image_a).all()


def test_every_pipeline_loads_the_release_folder(small):
    release, _ = small
    for cls in (TextToImagePipeline, ImageToTextPipeline, EditPipeline):
        pipe = cls.from_pretrained(str(release), device="cpu", dtype="bfloat16")
        assert pipe.model.config.name == "harmon-release" and pipe.model.dtype == torch.bfloat16


PLANTED = '''import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
'''


def test_remote_code_is_never_run(small, tmp_path, capsys):
    release, _ = small
    folder = tmp_path / "with-code"
    folder.mkdir()
    for item in release.iterdir():
        os.symlink(item, folder / item.name)
    marker = tmp_path / "marker"
    for name in ("configuration_harmon.py", "modeling_harmon.py", "tokenization_harmon.py"):
        (folder / name).write_text(PLANTED.format(marker=str(marker)))
    tokenizer_config = json.loads((release / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_harmon.Tok", "tokenization_harmon.Tok"]}
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    assert main(["info", str(folder)]) == 0
    assert "Hugging Face release" in capsys.readouterr().out
    load_pretrained(folder)
    code = main(["generate", "a red circle", "--model", str(folder), "--seed", "0", "--size", "32", "--num-iter", "2",
                 "--num-steps", "2", "-q", "--out", str(tmp_path / "x.png")])
    assert code == 0 and (tmp_path / "x.png").is_file()
    assert not marker.exists(), "a .py file of the model folder was executed"
    assert not any("harmon" in m and "transformers_modules" in m for m in sys.modules)


def test_hub_id_from_the_local_cache(small, tmp_path, monkeypatch):
    release, _ = small
    cache = tmp_path / "hub"
    repo = cache / "models--wusize--Harmon-0_5B"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in release.iterdir():
        os.link(item, snapshot / item.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, _ = load_pretrained("wusize/Harmon-0_5B", dtype="bfloat16")
    assert model.config.name == "harmon-release"
    with pytest.raises(CheckpointError, match="neither a local folder nor in the local Hugging Face cache"):
        load_pretrained("wusize/Harmon-1_5B")


# -- 3. writing it back --------------------------------------------------------------------------------------
def test_round_trip_ours_release_ours_is_bit_identical(small, tmp_path, capsys):
    release, _ = small
    old_mask = os.umask(0o027)
    try:
        ours, back_release, back_ours = tmp_path / "ours", tmp_path / "release", tmp_path / "ours2"
        assert main(["export", str(release), "--layout", "ours", "--out", str(ours)]) == 0
        assert main(["export", str(ours), "--out", str(back_release)]) == 0  # release is the default layout
        assert main(["export", str(back_release), "--layout", "ours", "--out", str(back_ours)]) == 0
    finally:
        os.umask(old_mask)
    out = capsys.readouterr().out
    assert "bfloat16, release layout" in out
    _assert_same_tensors(_tensors(ours / "model.safetensors"), _tensors(back_ours / "model.safetensors"))
    assert json.loads((ours / "config.json").read_text()) == json.loads((back_ours / "config.json").read_text())
    # the release file holds what the release's holds: the same tensors, the tied head beside the embedding
    _assert_same_tensors(_tensors(release / "model.safetensors"), _tensors(back_release / "model.safetensors"))
    written = json.loads((back_release / "config.json").read_text())
    assert written["mar"]["type"] == "mar_base" and written["torch_dtype"] == "bfloat16"
    assert ckpt.read_config(back_release) == ckpt.read_config(ours)
    for path in [*ours.iterdir(), *back_release.iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o640, f"{path.name}: {oct(path.stat().st_mode)} (umask 027)"


def test_export_float32_and_pth_layout(small, tmp_path, capsys):
    release, original = small
    f32, pth = tmp_path / "f32", tmp_path / "pth"
    assert main(["export", str(release), "--dtype", "float32", "--out", str(f32)]) == 0
    assert {t.dtype for t in _tensors(f32 / "model.safetensors").values()} == {torch.float32}
    assert main(["export", str(f32), "--layout", "original", "--dtype", "bfloat16", "--out", str(pth)]) == 0
    assert sorted(p.name for p in pth.iterdir()) == ["harmon_release.pth", "kl16.ckpt"]
    config = ckpt.read_config(release)
    again = ckpt.load_original(pth / "harmon_release.pth", pth / "kl16.ckpt", config=config)
    first = ckpt.load_original(original / "harmon_small.pth", original / "kl16.ckpt", config=config)
    _assert_same_tensors(again.state_dict(), first.state_dict())
    assert main(["export", str(release), "--out", str(f32)]) == 2  # not empty, no --force
    assert "not empty" in capsys.readouterr().err


def test_export_refuses_a_model_the_release_cannot_hold(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["export", "--out", str(out), str(Path(ckpt.__file__).parent / "assets" / "shapes-model")])
    assert_user_error(code, capsys, "cannot be written in the release layout", "VAE", "MAR sizes")
    assert not out.exists()


# -- 5. errors that name the problem -------------------------------------------------------------------------
def _copy_with(release: Path, folder: Path, config: dict | None = None) -> Path:
    folder.mkdir()
    for item in release.iterdir():
        os.symlink(item, folder / item.name)
    if config is not None:
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["mar"].update(type="mar_giant"), ["mar.type is 'mar_giant'", "mar_base"]),
    (lambda c: c.update(vision_tower="clip"), ["top-level fields not understood", "vision_tower"]),
    (lambda c: c["llm"].update(sliding_attention_pattern=3), ["llm fields not understood", "sliding_attention"]),
    (lambda c: c["mar"].update(foo=1), ["mar fields not understood", "foo"]),
    (lambda c: c["mar"].update(encoder_depth=3), ["mar.encoder_depth is set", "fixes it"]),
    (lambda c: c["llm"].update(model_type="llama"), ["llm.model_type is 'llama'"]),
])
def test_config_errors_name_the_field(small, tmp_path, capsys, edit, words):
    release, _ = small
    config = json.loads((release / "config.json").read_text())
    edit(config)
    folder = _copy_with(release, tmp_path / "bad", config)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder)
    assert "Hugging Face release layout" in str(err.value) and all(w in str(err.value) for w in words), err.value
    assert_user_error(main(["info", str(folder)]), capsys, *words)


def _rewritten(release: Path, folder: Path, edit) -> Path:
    folder = _copy_with(release, folder)
    tensors = _tensors(release / "model.safetensors")
    edit(tensors)
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_missing_and_extra_tensors_are_named(small, tmp_path):
    release, _ = small
    missing = _rewritten(release, tmp_path / "missing", lambda t: t.pop("mar.decoder_blocks.11.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: mar\.decoder_blocks\.11\.mlp\.fc2\.bias"):
        load_pretrained(missing)
    extra = _rewritten(release, tmp_path / "extra", lambda t: t.update({"mar.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: mar\.extra_head\.weight"):
        load_pretrained(extra)

    def other_head(tensors):
        tensors[ckpt.TIED_KEY] = tensors[ckpt.TIED_KEY].clone()
        tensors[ckpt.TIED_KEY][-1, -1] += 1
    differing = _rewritten(release, tmp_path / "head", other_head)
    with pytest.raises(CheckpointError, match="differ, but the config ties them"):
        load_pretrained(differing)


def test_half_downloaded_weights_are_named(small, tmp_path, capsys):
    release, _ = small
    folder = _copy_with(release, tmp_path / "cut")
    (folder / "model.safetensors").unlink()
    with open(release / "model.safetensors", "rb") as src, open(folder / "model.safetensors", "wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(CheckpointError, match="cut short .* download or copy it again"):
        load_pretrained(folder)
    assert_user_error(main(["info", str(folder)]), capsys, "50,000,000 bytes", "cut short")
