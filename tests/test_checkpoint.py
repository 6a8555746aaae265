"""Tests for ``harmon.checkpoint``: full-size key layouts, safe and strict loading, round trips.

Everything runs on CPU. Full-size models are only ever built on the meta device.
The reference data lives in the repository's sibling folder ``../shared``.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harmon import checkpoint as ckpt
from harmon import saving
from harmon.checkpoint import CheckpointError
from harmon.config import PRESETS

TIED, EMBED = "llm.lm_head.weight", "llm.model.embed_tokens.weight"


# -- helpers -----------------------------------------------------------------------------------------
def _manifest(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def _shapes(entries) -> dict[str, tuple[int, ...]]:
    return {e["key"]: tuple(e["shape"]) for e in entries}


def _diff_message(ours: dict, ref: dict, what: str) -> str:
    """Lists the keys in only one of the two dicts and the keys whose shapes differ."""
    only_ours = sorted(set(ours) - set(ref))
    only_ref = sorted(set(ref) - set(ours))
    shapes = sorted(f"{k}: ours {ours[k]} vs manifest {ref[k]}" for k in set(ours) & set(ref) if ours[k] != ref[k])
    return (f"{what} differs from the manifest:\n  only in our model ({len(only_ours)}): {only_ours}\n"
            f"  only in the manifest ({len(only_ref)}): {only_ref}\n  shape differences ({len(shapes)}): {shapes}")


def _assert_same_keys_and_shapes(ours: dict, ref: dict, what: str) -> None:
    if ours != ref:  # explicit raise: the message is exactly the key listing, not pytest's dict diff
        raise AssertionError(_diff_message(ours, ref, what))


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), f"key sets differ: only left {sorted(set(a) - set(b))}, only right {sorted(set(b) - set(a))}"
    differing = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing[:10]} ({len(differing)} in all)"


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_tied(model) -> None:
    head, embed = model.llm.lm_head.weight, model.llm.model.embed_tokens.weight
    assert head is embed, "lm_head.weight is not the embedding parameter (not tied)"
    assert head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()


# -- fixtures (the tiny model, its weights and config: see conftest.py) ----------------------------------
@pytest.fixture(scope="module")
def original_files(reference_model, tmp_path_factory):
    """The tiny model written in the released layout: (harmon.pth, kl16.ckpt)."""
    folder = tmp_path_factory.mktemp("original")
    pth, vae = folder / "harmon_tiny.pth", folder / "kl16.ckpt"
    saving.save_original(reference_model, pth, vae)
    return pth, vae


# -- 1. full-size key layouts against the manifests ------------------------------------------------------
@pytest.mark.parametrize("preset, manifest", [("harmon-0.5b", "harmon_0.5b.json"), ("harmon-1.5b", "harmon_1.5b.json")])
def test_preset_keys_match_manifest(preset, manifest, manifests_dir):
    config = PRESETS[preset]()
    model = ckpt.build_empty(config)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.is_meta for t in tensors), "build_empty allocated real memory"

    ours = ckpt.expected_keys(config)
    data = _manifest(manifests_dir, manifest)
    ref = _shapes(data["keys"])
    assert len(ref) == data["num_keys"]
    _assert_same_keys_and_shapes(ours, ref, f"{preset} state dict")
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # the VAE part is exactly kl16.ckpt's layout once "vae." is stripped
    vae_ref = _shapes(_manifest(manifests_dir, "kl16_vae.json")["keys"])
    vae_ours = {k[len("vae."):]: v for k, v in ours.items() if k.startswith("vae.")}
    _assert_same_keys_and_shapes(vae_ours, vae_ref, f"{preset} VAE part (vae. stripped)")

    # the released harmon_*.pth key set is ours minus vae.*
    release = {e["key"] for e in data["keys"] if e["in_release_checkpoint"]}
    assert len(release) == data["num_keys_release_checkpoint"]
    ours_release = {k for k in ours if not k.startswith("vae.")}
    assert release == ours_release, (f"release key set differs: only ours {sorted(ours_release - release)}, "
                                     f"only manifest {sorted(release - ours_release)}")


def test_manifest_diff_message_lists_keys():
    """The mismatch message of the manifest test names the differing keys."""
    ours = {"a": (1,), "b": (2, 3), "c": (4,)}
    ref = {"a": (1,), "b": (2, 4), "d": (5,)}
    with pytest.raises(AssertionError) as info:
        _assert_same_keys_and_shapes(ours, ref, "x")
    msg = str(info.value)
    assert "'c'" in msg and "'d'" in msg and "b: ours (2, 3) vs manifest (2, 4)" in msg and "'a'" not in msg


# -- 2. malicious pickles are refused ------------------------------------------------------------------------
class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _OpenPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _write_malicious(path: Path, payload, fmt: str) -> None:
    obj = {"llm.model.norm.weight": torch.ones(4), "evil": payload}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # "kl16": the payload hidden inside a {"model": ...} VAE container
        torch.save({"model": {"encoder.conv_in.weight": torch.ones(1), "x": payload}}, path)


@pytest.mark.parametrize("payload_cls", [_ShellPayload, _OpenPayload])
def test_payload_would_run_without_weights_only(tmp_path, payload_cls):
    """Control: the payload really executes code when unpickled unsafely, so the refusal tests mean something."""
    marker = tmp_path / "control_marker"
    path = tmp_path / "control.pth"
    _write_malicious(path, payload_cls(marker), "zip")
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "kl16"])
@pytest.mark.parametrize("payload_cls", [_ShellPayload, _OpenPayload])
def test_malicious_pickle_refused(tmp_path, payload_cls, fmt):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    _write_malicious(evil, payload_cls(marker), fmt)

    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.read_torch_file(evil)
    assert not marker.exists(), "unpickling ran code (read_torch_file)"

    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load_original(evil, evil)
    assert not marker.exists(), "unpickling ran code (load_original)"


def test_malicious_vae_ckpt_refused(tmp_path, original_files):
    pth, _ = original_files
    marker = tmp_path / "pwned"
    evil = tmp_path / "kl16.ckpt"
    _write_malicious(evil, _OpenPayload(marker), "kl16")
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.load_original(pth, evil)
    assert not marker.exists()


def test_read_torch_file_plain_and_legacy(tmp_path):
    """Harmless checkpoints load, in the zip and in the legacy format, and containers are unwrapped."""
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    for name, kwargs, obj in [("zip.pth", {}, sd), ("legacy.pth", {"_use_new_zipfile_serialization": False}, sd),
                              ("wrapped.ckpt", {}, {"model": sd}), ("sd.ckpt", {}, {"state_dict": sd})]:
        torch.save(obj, tmp_path / name, **kwargs)
        _assert_same_tensors(ckpt.read_torch_file(tmp_path / name), sd)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="refusing to load"):
        ckpt.read_torch_file(tmp_path / "garbage.pth")
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        ckpt.read_torch_file(tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.read_torch_file(tmp_path / "missing.pth")


# -- 3. round trips on the tiny model --------------------------------------------------------------------
def test_tiny_load_matches_file(reference_model, tiny_weights):
    _assert_same_tensors(_state(reference_model), tiny_weights)
    _assert_tied(reference_model)
    assert not reference_model.training


def test_original_round_trip(reference_model, tiny_config, original_files):
    pth, vae = original_files
    harmon_part = torch.load(pth, weights_only=True)
    vae_part = torch.load(vae, weights_only=True)
    assert harmon_part and not any(k.startswith("vae.") for k in harmon_part)
    assert set(vae_part) == {"model"} and "encoder.conv_in.weight" in vae_part["model"]
    assert len(harmon_part) + len(vae_part["model"]) == len(reference_model.state_dict())

    loaded = ckpt.load_original(pth, vae, config=tiny_config)
    _assert_same_tensors(_state(loaded), _state(reference_model))
    _assert_tied(loaded)
    assert loaded.config == tiny_config


def test_original_without_config_fails_clearly(original_files):
    pth, vae = original_files
    with pytest.raises(CheckpointError, match=r"hidden size 64") as info:
        ckpt.load_original(pth, vae)
    assert "pass a config" in str(info.value)


def test_save_model_round_trip(reference_model, tmp_path):
    folder = saving.save_model(reference_model, tmp_path / "saved")
    weights = folder / ckpt.WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
    assert TIED not in stored and EMBED in stored
    assert stored == set(reference_model.state_dict()) - {TIED}
    config = json.loads((folder / ckpt.CONFIG_NAME).read_text())
    assert config["model_type"] == "harmon"

    loaded = ckpt.load_model(folder)
    _assert_same_tensors(_state(loaded), _state(reference_model))
    _assert_tied(loaded)
    assert loaded.config == reference_model.config


def test_hugging_face_style_folder(tiny_fixture_dir, tiny_config, tiny_weights, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    reference = json.loads((tiny_fixture_dir / "config.json").read_text())
    hf_config = {
        "model_type": "harmon",
        "llm": {k: v for k, v in reference["llm_config"].items() if k != "torch_dtype"},
        "mar": reference["mar_kwargs"],
        "vae": {k: v for k, v in reference["vae"].items() if k != "note"},
        "vae_scale": reference["vae_scale"],
    }
    (folder / "config.json").write_text(json.dumps(hf_config))
    # HF style: the tied head is not stored
    save_file({k: v for k, v in tiny_weights.items() if k != TIED}, str(folder / "model.safetensors"))

    model = ckpt.load_model(folder)
    assert model.config.llm == tiny_config.llm and model.config.mar == tiny_config.mar
    assert model.config.vae == tiny_config.vae
    _assert_same_tensors(_state(model), tiny_weights)
    _assert_tied(model)


# -- 4. strict loading errors ------------------------------------------------------------------------------
def test_tied_head_may_be_absent(tiny_config, tiny_weights):
    model = ckpt.load_state_dict(tiny_config, {k: v for k, v in tiny_weights.items() if k != TIED})
    _assert_tied(model)
    assert torch.equal(model.llm.lm_head.weight, tiny_weights[EMBED])


def test_only_the_tied_head_is_enough(tiny_config, tiny_weights):
    model = ckpt.load_state_dict(tiny_config, {k: v for k, v in tiny_weights.items() if k != EMBED})
    _assert_tied(model)
    assert torch.equal(model.llm.model.embed_tokens.weight, tiny_weights[TIED])


def test_tied_copies_that_differ_are_refused(tiny_config, tiny_weights):
    sd = dict(tiny_weights, **{TIED: tiny_weights[TIED] + 1.0})
    with pytest.raises(CheckpointError, match="differ"):
        ckpt.load_state_dict(tiny_config, sd)


@pytest.mark.parametrize("key", ["proj_out.2.bias", "llm.model.norm.weight",
                                 "mar.diffloss.net.final_layer.linear.weight"])
def test_missing_key_named(tiny_config, tiny_weights, key):
    assert key in tiny_weights
    sd = {k: v for k, v in tiny_weights.items() if k != key}
    with pytest.raises(CheckpointError, match="missing keys") as info:
        ckpt.load_state_dict(tiny_config, sd)
    assert key in str(info.value)
    assert "kl16.ckpt" not in str(info.value)


def test_unexpected_key_named(tiny_config, tiny_weights):
    sd = dict(tiny_weights, **{"mar.not_a_real_module.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected keys") as info:
        ckpt.load_state_dict(tiny_config, sd)
    assert "mar.not_a_real_module.weight" in str(info.value)


def test_wrong_shape_named(tiny_config, tiny_weights):
    key = "proj_in.0.weight"
    assert tuple(tiny_weights[key].shape) == (64, 64)
    sd = dict(tiny_weights, **{key: torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match="wrong shapes") as info:
        ckpt.load_state_dict(tiny_config, sd)
    msg = str(info.value)
    assert key in msg and "(64, 32)" in msg and "(64, 64)" in msg


def test_only_vae_missing_mentions_kl16(tiny_config, tiny_weights):
    sd = {k: v for k, v in tiny_weights.items() if not k.startswith("vae.")}
    with pytest.raises(CheckpointError, match="kl16.ckpt") as info:
        ckpt.load_state_dict(tiny_config, sd)
    assert "vae.encoder.conv_in" in str(info.value) or "vae." in str(info.value)


def test_harmon_pth_with_vae_keys_refused(tiny_weights, original_files, tmp_path):
    _, vae = original_files
    full = tmp_path / "full.pth"
    torch.save(tiny_weights, full)
    with pytest.raises(CheckpointError, match="already holds VAE keys"):
        ckpt.load_original(full, vae)


def test_kl16_that_is_not_a_vae_refused(original_files):
    pth, _ = original_files
    with pytest.raises(CheckpointError, match="not a KL-16 VAE checkpoint"):
        ckpt.load_original(pth, pth)


def test_folder_errors(tmp_path, tiny_fixture_dir, tiny_weights):
    with pytest.raises(CheckpointError, match="model folder not found"):
        ckpt.load_model(tmp_path / "nope")

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    save_file(tiny_weights, str(no_config / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has no config.json"):
        ckpt.load_model(no_config)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_fixture_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no weights"):
        ckpt.load_model(no_weights)


def test_config_errors(tmp_path, reference_model):
    good = reference_model.config.to_dict()

    def load_with(config: dict, name: str):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
        return ckpt.load_model(folder)

    with pytest.raises(CheckpointError, match=r"model_type 'qwen2'.*expected 'harmon'"):
        load_with(dict(good, model_type="qwen2"), "qwen2")

    bad_mar = dict(good, mar=dict(good["mar"], bogus_option=1, another_unknown=2))
    with pytest.raises(CheckpointError, match="unknown mar config keys") as info:
        load_with(bad_mar, "bad_mar")
    assert "bogus_option" in str(info.value) and "another_unknown" in str(info.value)

    # the well-formed config itself is fine (the error then comes from the weights)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_with(good, "good")


# -- 5. loading straight into bfloat16 ---------------------------------------------------------------------
def test_load_bfloat16(tiny_fixture_dir, reference_model):
    model = ckpt.load_model(tiny_fixture_dir, dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert params and {p.dtype for p in params.values()} == {torch.bfloat16}, \
        sorted({n: p.dtype for n, p in params.items() if p.dtype != torch.bfloat16}.items())[:5]
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not meta, f"left on meta: {meta}"
    inv_freq = model.llm.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and not inv_freq.is_meta
    ref_inv_freq = reference_model.llm.model.rotary_emb.inv_freq
    assert torch.equal(inv_freq, ref_inv_freq)
    _assert_tied(model)
    # the values are the float32 weights rounded to bf16
    assert torch.equal(params["proj_in.0.weight"], reference_model.proj_in[0].weight.detach().to(torch.bfloat16))

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokens = model.encode(image.to(torch.bfloat16))
        ref = reference_model.encode(image)
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (1, 4, 4, 16)
    assert torch.isfinite(tokens.float()).all()
    err = (tokens.float() - ref).norm() / ref.norm()
    assert err < 0.05, f"bf16 encode deviates from float32 by {err:.3f} (relative)"


# -- 6. recognising the released presets --------------------------------------------------------------------
@pytest.mark.parametrize("hidden, name", [(896, "harmon-0.5b"), (1536, "harmon-1.5b")])
def test_infer_config(hidden, name):
    sd = {EMBED: torch.empty(151936, hidden, device="meta"), "proj_in.0.weight": torch.empty(hidden, 8, device="meta")}
    config = ckpt.infer_config(sd)
    assert config.name == name and config.llm_hidden_size == hidden


@pytest.mark.parametrize("shape", [(151936, 1024), (1000, 64), (150000, 896)])
def test_infer_config_unknown(shape):
    with pytest.raises(CheckpointError, match=f"hidden size {shape[1]}"):
        ckpt.infer_config({EMBED: torch.empty(*shape, device="meta")})
    with pytest.raises(CheckpointError, match="cannot recognise"):
        ckpt.infer_config({"llm.lm_head.weight": torch.empty(*shape, device="meta")})
