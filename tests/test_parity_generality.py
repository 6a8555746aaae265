"""The parity runner must not assume the tiny set's sizes.

``tests/fixture_writer.py`` writes complete fixture folders in the reference format
for configurations unlike the tiny set's (other widths and depths, buffer size,
latent channels, diffusion steps, native grid, non-square generation grids with
interpolated position embeddings, other seeds, runs and iteration counts). Their
expected numbers come from this package's own model code, so ``run_parity`` must
reproduce every output of every case -- and must notice a corrupted one.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixture_writer import other_config, write_fixture
from harmon import parity
from harmon.cli import main as cli_main

CASE_NAMES = sorted(parity.CASES)


def odd_config() -> dict:
    """A second variant: odd 3 x 3 native grid (48 px), one-slot buffer, one LLM layer with one kv head,
    16 latent channels, a two-section respacing ("3,2") and a deeper decoder than encoder."""
    cfg = copy.deepcopy(other_config())
    cfg["name"] = "generality-odd"
    cfg["llm_config"].update(vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                             num_attention_heads=3, num_key_value_heads=1, bos_token_id=290, eos_token_id=292)
    cfg["special_token_ids"] = {"pad_endoftext": 290, "im_start": 291, "im_end_eos": 292,
                                "image_placeholder": 293, "newline": 10}
    cfg["mar_kwargs"].update(img_size=48, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                             decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
                             vae_embed_dim=16, buffer_size=1, diffloss_d=1, diffloss_w=32,
                             num_sampling_steps="3,2", diffusion_batch_mul=2)
    cfg["vae"].update(embed_dim=16, z_channels=16, decoder_attn_resolutions=[])
    cfg["vae_scale"] = 0.2
    return cfg


CONFIGS = {"other": (other_config, 20240611), "odd": (odd_config, 7)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def generated(request, tmp_path_factory) -> Path:
    make, seed = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(f"fixture_{request.param}")
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    write_fixture(folder, make(), seed)
    # explicit generators only: the global random states are left as they were
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    return folder


def _outputs(folder: Path, case: str) -> list[str]:
    info = json.loads((folder / "cases" / f"{case}.json").read_text())
    return [k for k, v in info["tensors"].items() if v["role"] == "output"]


def test_written_folder_has_the_reference_format(generated, tiny_fixture_dir):
    """Same files, JSON structure, tensor roles/dtypes/shapes and weight key layout as the tiny set."""
    config = json.loads((generated / "config.json").read_text())
    for key in ("llm_config", "mar_kwargs", "vae", "vae_scale", "special_token_ids", "weights"):
        assert key in config
    assert sorted(p.stem for p in (generated / "cases").glob("*.json")) == CASE_NAMES
    assert sorted(p.stem for p in (generated / "cases").glob("*.safetensors")) == CASE_NAMES
    for case in CASE_NAMES:
        info = json.loads((generated / "cases" / f"{case}.json").read_text())
        assert info["case"] == case and {"title", "calls", "tensors", "notes", "meta"} <= set(info)
        tensors = load_file(str(generated / "cases" / f"{case}.safetensors"))
        assert set(tensors) == set(info["tensors"])
        for name, t in tensors.items():
            entry = info["tensors"][name]
            assert entry["role"] in ("input", "output")
            assert entry["shape"] == list(t.shape) and entry["dtype"] == str(t.dtype).replace("torch.", "")
        assert _outputs(generated, case)
    with safe_open(str(generated / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("llm.lm_head.weight").equal(f.get_tensor("llm.model.embed_tokens.weight"))
    assert config["weights"]["num_tensors"] == len(keys)
    tiny_config = json.loads((tiny_fixture_dir / "config.json").read_text())
    assert set(tiny_config) <= set(config) | {"reference", "seeds"}
    assert set(tiny_config["mar_kwargs"]) == set(config["mar_kwargs"])
    assert set(tiny_config["vae"]) - {"note"} == set(config["vae"])
    with safe_open(str(tiny_fixture_dir / "weights.safetensors"), "pt") as f:
        tiny_keys = set(f.keys())

    def layout(ks):
        return {re.sub(r"\.\d+(?=\.)", ".#", k) for k in ks}
    assert layout(keys) - layout(tiny_keys) <= {k for k in layout(keys) if ".up.#.attn." in k}
    assert layout(tiny_keys) <= layout(keys)
    # the case files use the tiny set's names wherever the names do not encode a size or a run
    for case in ("a_vae_encode", "b_vae_decode", "c_mae_encoder", "e_mae_decoder", "i_image2text",
                 "j_training_losses"):
        tiny_info = json.loads((tiny_fixture_dir / "cases" / f"{case}.json").read_text())
        info = json.loads((generated / "cases" / f"{case}.json").read_text())
        assert {k: v["role"] for k, v in info["tensors"].items()} == \
            {k: v["role"] for k, v in tiny_info["tensors"].items()}, case
        assert set(info["meta"]) == set(tiny_info["meta"]), case
    for case in ("d_llm_context_encoder", "f_diffloss", "g_mask_schedule", "h_sample"):
        tiny_meta = json.loads((tiny_fixture_dir / "cases" / f"{case}.json").read_text())["meta"]
        meta = json.loads((generated / "cases" / f"{case}.json").read_text())["meta"]
        assert set(meta) == set(tiny_meta), case


def test_folder_really_differs_from_the_tiny_set(generated):
    config = json.loads((generated / "config.json").read_text())
    mar = config["mar_kwargs"]
    assert mar["buffer_size"] != 4 and mar["num_sampling_steps"] != "10" and mar["encoder_embed_dim"] != 64
    assert config["llm_config"]["num_hidden_layers"] != 2 and config["llm_config"]["vocab_size"] != 1000
    runs = json.loads((generated / "cases" / "h_sample.json").read_text())["meta"]["runs"]
    assert any(r["image_shape"][0] != r["image_shape"][1] for r in runs.values())  # non-square generation
    native = (mar["img_size"] // mar["vae_stride"],) * 2
    assert any(tuple(r["image_shape"]) != native for r in runs.values())            # interpolated pos embeds
    g_runs = json.loads((generated / "cases" / "g_mask_schedule.json").read_text())["meta"]["runs"]
    assert {tuple(r["image_shape"]) for r in g_runs} != {(4, 4), (16, 16), (32, 32)}
    layers = config["llm_config"]["num_hidden_layers"]
    assert sum(n.startswith("prefix_cache_key_layer") for n in _outputs(generated, "d_llm_context_encoder")) == layers


def test_parity_reproduces_every_case(generated):
    lines: list[str] = []
    results = parity.run_parity(generated, print_fn=lines.append)
    by_name = {r.name: r for r in results}
    assert sorted(by_name) == CASE_NAMES, lines
    for name, res in by_name.items():
        outputs = _outputs(generated, name)
        assert not res.error, f"{name}: {res.error}"
        failed = [f"{t.name}: abs {t.max_abs:.3e} rel {t.max_rel:.3e} {t.note}" for t in res.tensors if not t.passed]
        assert not failed, f"{name}:\n" + "\n".join(failed)
        # every output of the file was compared (nothing "not reproduced", nothing silently skipped)
        assert len(res.tensors) >= len(outputs) > 0, name
        assert not [t for t in res.tensors if t.note == "not reproduced"], name
        assert res.passed
    assert all(line.rstrip().endswith("PASS") for line in lines if not line.startswith(" ")), lines
    assert cli_main(["parity", str(generated)]) == 0


def test_a_corrupted_output_is_caught(generated, tmp_path, capsys):
    folder = tmp_path / "corrupted"
    shutil.copytree(generated, folder)
    path = folder / "cases" / "h_sample.safetensors"
    tensors = load_file(str(path))
    first_image = next(n for n in _outputs(folder, "h_sample") if n.endswith(".images"))
    tensors[first_image] = tensors[first_image] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})

    results = {r.name: r for r in parity.run_parity(folder, print_fn=lambda line: None)}
    assert sorted(results) == CASE_NAMES
    broken = results.pop("h_sample")
    assert not broken.passed and not broken.error
    assert [t.name for t in broken.tensors if not t.passed] == [first_image]
    assert all(r.passed for r in results.values()), [n for n, r in results.items() if not r.passed]

    capsys.readouterr()
    assert cli_main(["parity", str(folder)]) != 0
    out = capsys.readouterr().out
    assert re.search(r"h_sample\s.*FAIL", out), out
    assert "1 failed" in out
