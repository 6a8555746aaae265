"""Weight-only int8 (``quantize="int8"``, ``--quantize int8``) on the tiny reference model: which weights it
stores as int8, how close the outputs stay, the load option through every command, and what is refused."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cli_helpers import assert_user_error
from harmon.batch import BatchOptions
from harmon.batch.options import BatchError
from harmon.checkpoint import load_model
from harmon.cli import build_parser, main
from harmon.errors import InputError
from harmon.hub import load_pretrained
from harmon.quantize import (QUANTIZED_PARTS, Int8Embedding, check_combination, check_quantization, quantize_model,
                             weight_bytes)
from harmon.saving import save_model

FAST = ["--num-iter", "2", "--num-steps", "2", "--size", "64", "-q"]


@pytest.fixture(scope="module")
def int8_model(tiny_model_dir):
    return load_model(tiny_model_dir, quantize="int8")


def _is_int8(weight) -> bool:
    return hasattr(weight, "qdata") and weight.qdata.dtype == torch.int8


def test_int8_stores_the_llm_and_mar_blocks_and_keeps_the_rest(int8_model, reference_model):
    model = int8_model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name for name in linears if name.startswith(QUANTIZED_PARTS)}
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in chosen} >= {"llm.model", "llm.lm_head",
                                                                        "mar.encoder_blocks", "mar.decoder_blocks"}
    for name, module in linears.items():
        assert _is_int8(module.weight) == (name in chosen), name
        if name in chosen:  # one scale per output row, in float32
            assert module.weight.scale.shape == (module.weight.shape[0], 1)
    # what stays in the compute dtype: the diffusion head, the projections, the VAE, norms, position embeddings
    for part in (model.mar.diffloss, model.proj_in, model.proj_out, model.vae):
        assert all(p.dtype == torch.float32 and not _is_int8(p) for p in part.parameters())
    # the tied head and embedding stay one tensor
    embed = model.llm.get_input_embeddings()
    assert isinstance(embed, Int8Embedding) and embed.weight is model.llm.lm_head.weight
    assert model.quantization == "int8" and reference_model.quantization is None
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    for part in ("llm", "mar.encoder_blocks", "mar.decoder_blocks"):  # int8 + scales + float32 norms and biases
        int8, full = (weight_bytes(m.get_submodule(part)) for m in (model, reference_model))
        assert 0.25 * full < int8 < 0.32 * full, (part, int8 / full)


def test_outputs_stay_close(int8_model, reference_model):
    ids = torch.tensor([[1, 17, 250, 3, 999, 42, 7]])
    with torch.no_grad():
        ref = reference_model.llm(ids).logits
        got = int8_model.llm(ids).logits
        embed = int8_model.llm.get_input_embeddings()(ids)
    error = (got - ref).abs().max().item()
    assert 0 < error < 0.02 * ref.abs().max().item(), (error, ref.abs().max().item())  # measured 0.7%
    head = int8_model.llm.lm_head.weight
    assert torch.equal(embed[0], head.dequantize()[ids[0]])  # only the rows looked up, as the head stores them
    # the MAR encoder over image tokens: int8 blocks, float32 elsewhere
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 4, 4, reference_model.token_dim, generator=g)
    with torch.no_grad():
        a = reference_model.extract_visual_feature(tokens)
        b = int8_model.extract_visual_feature(tokens)
    feature_error = ((a[0] - b[0]).norm() / a[0].norm()).item()
    assert 0 < feature_error < 0.01, feature_error  # measured 0.4%


def test_quantizing_while_reading_equals_quantizing_after(tiny_model_dir, int8_model):
    after = quantize_model(load_model(tiny_model_dir), "int8")
    for (name, a), (_, b) in zip(int8_model.named_parameters(), after.named_parameters()):
        assert type(a) is type(b) and torch.equal(getattr(a, "qdata", a), getattr(b, "qdata", b)), name
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(after, "int8")


def test_bfloat16_activations(tiny_model_dir, reference_model):
    model = load_model(tiny_model_dir, dtype=torch.bfloat16, quantize="int8")
    ids = torch.tensor([[1, 17, 250, 3]])
    with torch.no_grad():
        logits = model.llm(ids).logits
        ref = reference_model.llm(ids).logits
    assert logits.dtype == torch.bfloat16 and model.llm.lm_head.weight.qdata.dtype == torch.int8
    assert (logits.float() - ref).abs().max() < 0.03 * ref.abs().max()  # measured 1.1%


@pytest.mark.parametrize("value, words", [("int4", "unknown quantization 'int4'"), ("INT8", "unknown"),
                                          (8, "unknown quantization 8")])
def test_bad_values_are_input_errors(tiny_model_dir, value, words):
    with pytest.raises(InputError, match=words):
        load_pretrained(tiny_model_dir, quantize=value)
    with pytest.raises(BatchError, match="quantize must be"):
        BatchOptions(quantize=value if isinstance(value, str) else str(value))


def test_combination_rules():
    assert check_quantization(None) is None and check_quantization("none") is None
    assert check_quantization("int8") == "int8"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_combination("int8", torch.device("cpu"), dtype)
    check_combination(None, torch.device("mps"), torch.float64)  # nothing to check without quantization
    with pytest.raises(InputError, match="not float64"):
        check_combination("int8", torch.device("cpu"), torch.float64)
    with pytest.raises(InputError, match="not mps"):
        check_combination("int8", torch.device("mps"), torch.float32)


def test_a_quantized_model_is_not_saved(int8_model, tmp_path):
    with pytest.raises(InputError, match="cannot be saved"):
        save_model(int8_model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


COMMANDS = {  # every command that loads a model, with its required arguments
    "generate": ["generate", "a cat"], "edit": ["edit", "x.png", "a cat", "--box", "0,0,8,8", "--out", "o.png"],
    "batch": ["batch", "p.json", "--out-dir", "o"], "describe": ["describe", "x.png", "what?"],
    "chat": ["chat", "x.png"], "serve": ["serve"], "eval shapes": ["eval", "shapes"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_the_option(command):
    parser = build_parser()
    assert parser.parse_args(COMMANDS[command] + ["--quantize", "int8"]).quantize == "int8"
    assert parser.parse_args(COMMANDS[command]).quantize == "none"


def test_cli_generates_and_describes_with_int8(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "a.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), "--out", str(path), "--seed", "3",
                 "--quantize", "int8", *FAST]) == 0
    with Image.open(path) as im:
        text = dict(im.text)
    assert text["quantization"] == "int8" and json.loads(text["parameters"])["quantization"] == "int8"
    plain = tmp_path / "b.png"
    assert main(["generate", "a red circle", "--model", str(tiny_model_dir), "--out", str(plain), "--seed", "3",
                 *FAST]) == 0
    with Image.open(plain) as im:
        assert "quantization" not in im.text and json.loads(im.text["parameters"])["quantization"] is None
    capsys.readouterr()
    assert main(["describe", str(path), "What is it?", "--model", str(tiny_model_dir), "--quantize", "int8",
                 "--max-new-tokens", "4"]) == 0
    assert_user_error(main(["describe", str(path), "What is it?", "--model", str(tiny_model_dir),
                            "--quantize", "int4"]), capsys, "unknown quantization 'int4'", "int8")


def test_batch_records_the_quantization(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a red circle"]))
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "--model", str(tiny_model_dir), "--out-dir", str(out), *FAST]
    assert main(argv + ["--quantize", "int8"]) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["quantization"] == "int8"
    capsys.readouterr()
    assert_user_error(main(argv), capsys, "other settings", "quantization")  # int8 images are not mixed in
    assert_user_error(main(argv + ["--quantize", "fp8"]), capsys, "unknown quantization 'fp8'")


def test_importing_harmon_prints_no_torchao_warnings():
    done = subprocess.run([sys.executable, "-c", "import harmon.models.harmon, torchao"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr


def test_image_pixels_stay_close(int8_model, reference_model):
    from harmon.pipelines import TextToImagePipeline
    from harmon.settings import GenerationSettings
    from harmon.tokenizer import build_byte_tokenizer

    settings = GenerationSettings(num_iter=2, num_steps=4, height=64, width=64, temperature=1e-3)  # ~deterministic
    images = [TextToImagePipeline(m, build_byte_tokenizer())("a red circle", settings, seeds=[0], output_type="pt",
                                                             progress=False).images for m in (reference_model,
                                                                                              int8_model)]
    error = (images[0] - images[1]).abs().mul(127.5)
    assert np.isfinite(error.numpy()).all() and 0 < error.mean().item() < 2, error.mean().item()  # measured 0.3/255


def test_plain_reads_equal_the_mapped_tensors(tiny_fixture_dir, tmp_path):
    from harmon.tensor_files import SafetensorsFile

    weights = SafetensorsFile(tiny_fixture_dir / "weights.safetensors")
    for key in weights:  # what loading reads when it copies a tensor anyway (int8, another dtype or device)
        assert torch.equal(weights.read_copy(key), weights[key]), key
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_fixture_dir / "config.json").read_text())
    data = (tiny_fixture_dir / "weights.safetensors").read_bytes()
    (folder / "weights.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="cut short"):
        load_model(folder, quantize="int8")


def test_int8_loading_checks_what_it_reads(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    key = next(k for k in state if k.startswith("llm.model.layers.0.mlp") and k.endswith("weight"))
    state[key] = state[key].clone()
    state[key][-1, 3] = float("nan")  # in the last rows read
    folder = tmp_path / "nan"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match=f"NaN or infinite.*{key}"):
        load_model(folder, quantize="int8")
