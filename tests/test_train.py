"""Training: configuration, data, optimiser recipe, exact resumption, and 1 vs 2 processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmon.checkpoint import load_model
from harmon.tokenizer import build_byte_tokenizer
from harmon.train.config import TrainConfig
from harmon.train.data import Batcher, read_finetune, read_jsonl, read_llava
from harmon.train.losses import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from harmon.settings import DecodingSettings, GenerationSettings
from harmon.train.model import build_optimizer, lr_factor, part_parameters, prepare_model
from harmon.train.trainer import edit_checkpoint, export_checkpoint, latest_step, train

TINY_FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tiny"

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Four coloured squares in the three formats: jsonl, FINETUNE layout and LLaVA conversations."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    lines, conversations, info = [], [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        pixels = np.full((64, 64, 3), 240, np.uint8)
        pixels[16:48, 16:48] = rgb
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        (root / "annotations" / f"{i}.json").write_text(json.dumps({"caption": f"a {name} square"}))
        info.append({"image": f"{i}.png", "annotation": f"{i}.json"})
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": f"a {name} square"}))
        conversations.append({"id": i, "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": name}]})
    (root / "data_info.json").write_text(json.dumps(info))
    (root / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    (root / "i2t.json").write_text(json.dumps(conversations))
    return root


def config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    data = {"jsonl": [str(dataset / "t2i.jsonl")], "llava": [str(dataset / "i2t.json")], "image_size": 64,
            "t2i_batch_size": 4, "i2t_batch_size": 2}
    data.update(overrides.pop("data", {}))
    settings = {"model": str(TINY_FIXTURE), "output_dir": str(out), "max_steps": 4, "save_every": 2,
                "log_every": 1, "progress": False, "optim": {"lr": 1e-3}, "data": data}
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


# -- configuration -------------------------------------------------------------------------------
def test_yaml_config_and_unknown_keys(tmp_path, dataset):
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {TINY_FIXTURE}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 3\n"
                    f"data:\n  jsonl: [{dataset / 't2i.jsonl'}]\n  image_size: 64\noptim:\n  lr: 2.0e-5\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.max_steps == 3 and cfg.optim.lr == 2e-5 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.weight_decay == 0.02 and cfg.optim.grad_clip == 1.0 and cfg.data.uncond_prob == 0.1
    with pytest.raises(ValueError, match="unknown keys.*lerning_rate"):
        TrainConfig.from_dict({"model": "m", "output_dir": "o", "lerning_rate": 1})
    with pytest.raises(ValueError, match=r"config.optim: unknown keys.*'lrr'"):
        TrainConfig.from_dict({"model": "m", "output_dir": "o", "data": {"jsonl": ["x"]}, "optim": {"lrr": 1}})
    with pytest.raises(ValueError, match="freeze: unknown parts"):
        TrainConfig.from_dict({"model": "m", "output_dir": "o", "data": {"jsonl": ["x"]}, "freeze": ["brain"]})
    with pytest.raises(ValueError, match="at least one of"):
        TrainConfig.from_dict({"model": "m", "output_dir": "o"})


# -- data --------------------------------------------------------------------------------------------
def test_readers_agree_and_report_bad_lines(dataset, tmp_path):
    finetune, jsonl = read_finetune(dataset), read_jsonl(dataset / "t2i.jsonl")
    assert [e.caption for e in finetune] == [e.caption for e in jsonl] == [f"a {c} square" for c in COLORS]
    assert all(e.image.is_file() for e in finetune + jsonl)
    conv = read_llava(dataset / "i2t.json")
    assert conv[0].turns == (("What color is the square?", "red"),)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\n\nnot json\n')
    with pytest.raises(ValueError, match="line 3"):
        read_jsonl(bad)


def test_batches_tokens_labels_and_skipped_images(dataset, tmp_path):
    tok = build_byte_tokenizer()
    batcher = Batcher(tok, image_size=64, num_image_tokens=20, uncond_prob=0.0, seed=0)
    captions = read_jsonl(dataset / "t2i.jsonl")
    t2i = batcher.text_to_image(captions[:2], [0, 1], step=0)
    assert t2i["pixel_values"].shape == (2, 3, 64, 64) and t2i["input_ids"].shape[0] == 2
    text = tok.decode(t2i["input_ids"][0][t2i["attention_mask"][0]])
    assert text == "<|im_start|>user\nGenerate an image: a red square<|im_end|>\n<|im_start|>assistant\n"
    always = Batcher(tok, 64, 20, uncond_prob=1.0, seed=0).text_to_image(captions[:1], [0], step=0)
    assert "Generate an image.<|im_end|>" in tok.decode(always["input_ids"][0])

    i2t = batcher.image_to_text(read_llava(dataset / "i2t.json")[:2], [0, 1])
    ids, labels = i2t["input_ids"][0], i2t["labels"][0]
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 20
    answer = labels[labels != IGNORE_INDEX]
    assert tok.decode(answer) == "red<|im_end|>"  # only the answer and its end token are learned

    corrupt = tmp_path / "c.jsonl"
    corrupt.write_text(json.dumps({"image": str(dataset / "images/0.png"), "caption": "ok"}) + "\n" +
                       json.dumps({"image": str(tmp_path / "missing.png"), "caption": "gone"}) + "\n")
    batch = batcher.text_to_image(read_jsonl(corrupt), [0, 1], step=0)
    assert batch["sample_ids"] == [0] and len(batcher.skipped) == 1 and "missing.png" in batcher.skipped[0]


# -- recipe --------------------------------------------------------------------------------------------
def test_optimizer_groups_freezing_and_schedule(dataset, tmp_path):
    cfg = config(dataset, tmp_path, freeze=["llm", "mar_encoder", "projections"], max_steps=200)
    model = prepare_model(load_model(TINY_FIXTURE), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mar.") for n in trainable)
    assert {id(p) for p in part_parameters(model, "mar_decoder")} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model.vae.parameters())
    decay, no_decay = build_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and not names[id(p)].startswith("mar.diffloss.") for p in decay["params"])
    assert any(names[id(p)].startswith("mar.diffloss.") and p.ndim == 2 for p in no_decay["params"])
    assert lr_factor(0, cfg) == 0.5 and lr_factor(1, cfg) == 1.0  # 1% of 200 steps = 2 warm-up steps
    assert lr_factor(199, cfg) < 1e-3 and 0.45 < lr_factor(101, cfg) < 0.55


# -- runs ------------------------------------------------------------------------------------------------
def test_resume_continues_with_the_same_losses(dataset, tmp_path):
    full = train(config(dataset, tmp_path / "full"))
    # stopped after step 3; the last checkpoint is step 2's, so step 3 is done (and logged) again
    first = train(config(dataset, tmp_path / "split"), stop_after=3)
    assert first.steps == 3 and first.final_dir is None
    rest = train(config(dataset, tmp_path / "split"))
    assert [h["step"] for h in rest.history] == [3, 4]
    for a, b in zip(full.history[2:], rest.history):
        assert a["t2i"] == pytest.approx(b["t2i"], rel=1e-6) and a["i2t"] == pytest.approx(b["i2t"], rel=1e-6)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert full.final_dir is not None
    exported = load_model(full.final_dir)
    # the last checkpoint exported is the final model; a step without a checkpoint is named in the error
    midway = load_model(export_checkpoint(tmp_path / "full", tmp_path / "step4"))
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), midway.state_dict().values()))
    assert (tmp_path / "step4" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match=r"no checkpoint step_0000003 .*step_0000004"):
        export_checkpoint(tmp_path / "full", tmp_path / "step3", step=3)
    (tmp_path / "full" / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match=r"no 'latest' pointer .*step_0000004.*pass a step"):
        export_checkpoint(tmp_path / "full", tmp_path / "latest")
    assert (full.final_dir / "tokenizer.json").is_file()
    from harmon.pipelines import TextToImagePipeline
    from harmon.hub import load_tokenizer
    pipe = TextToImagePipeline(exported, load_tokenizer(full.final_dir, 1000))
    settings = GenerationSettings(height=64, num_iter=2, num_steps=2)
    assert len(pipe("a red square", settings, seeds=[0], progress=False).images) == 1


def test_training_resumes_from_an_edited_checkpoint(dataset, tmp_path):
    assert latest_step(tmp_path / "run") == 0
    train(config(dataset, tmp_path / "run"), stop_after=2)
    unedited = train(config(dataset, tmp_path / "unedited"))

    def zero_mask_token(model):
        with torch.no_grad():
            model.mar.mask_token.zero_()

    assert edit_checkpoint(tmp_path / "run", zero_mask_token) == 2 == latest_step(tmp_path / "run")
    edited = load_model(export_checkpoint(tmp_path / "run", tmp_path / "edited"))
    assert float(edited.mar.mask_token.detach().abs().sum()) == 0.0
    rest = train(config(dataset, tmp_path / "run"))
    assert [h["step"] for h in rest.history] == [3, 4]
    assert rest.history[0]["t2i"] != pytest.approx(unedited.history[2]["t2i"], rel=1e-6)  # trained from the edit
    (tmp_path / "unedited" / "checkpoints" / "latest").unlink()
    with pytest.raises(ValueError, match="no 'latest' pointer"):
        edit_checkpoint(tmp_path / "unedited", zero_mask_token)


def test_latent_readout_trains_resumes_exactly_and_stays_out_of_the_export(dataset, tmp_path):
    full = train(config(dataset, tmp_path / "full", latent_readout=1.0))
    assert all(h["t2i_readout"] > 0 for h in full.history)
    first = train(config(dataset, tmp_path / "split", latent_readout=1.0), stop_after=3)
    rest = train(config(dataset, tmp_path / "split", latent_readout=1.0))
    for a, b in zip(full.history[2:], rest.history):
        assert a["t2i_readout"] == pytest.approx(b["t2i_readout"], rel=1e-6)
        assert a["t2i"] == pytest.approx(b["t2i"], rel=1e-6) and a["i2t"] == pytest.approx(b["i2t"], rel=1e-6)
    assert first.steps == 3 and set(load_model(full.final_dir).state_dict()) == set(load_model(TINY_FIXTURE).state_dict())
    with pytest.raises(ValueError, match=r"other settings \(latent_readout: 1.0 -> 0.0\)"):
        train(config(dataset, tmp_path / "split", max_steps=6))  # a readout checkpoint resumed without it
    with pytest.raises(ValueError, match="latent_readout must be >= 0"):
        config(dataset, tmp_path, latent_readout=-1.0)


def test_batches_are_prepared_one_step_ahead_in_order():
    from harmon.train.loop import prefetched

    made, fourth_started = [], threading.Event()

    def make(step):
        made.append(step)
        if step == 4:
            fourth_started.set()
        if step == 7:
            raise OSError("disk gone")
        return {"step": step}

    seen = []
    for step, value in prefetched(make, range(3, 6)):
        assert value == {"step": step}
        if step == 3:  # step 4's batch is made while step 3's work goes on (a serial loop would wait here in vain)
            assert fourth_started.wait(timeout=30)
        seen.append(step)
    assert seen == [3, 4, 5] and sorted(made) == [3, 4, 5]  # nothing made beyond the range
    assert list(prefetched(make, range(4, 4))) == []
    with pytest.raises(OSError, match="disk gone"):  # a failure reaches the loop at its step
        for step, _ in prefetched(make, range(6, 9)):
            assert step == 6


def test_latent_readout_loss_is_the_masked_mean_squared_error():
    from harmon.train.losses import TextToImageLoss, latent_readout_loss

    latents = torch.randn(2, 6, 4)
    mask = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    z = torch.cat([latents, torch.randn(2, 6, 3)], dim=-1)  # (2, 6, 7): the first 4 channels hold the latents
    readout = torch.nn.Linear(7, 4)
    t2i = TextToImageLoss(torch.zeros(()), None, mask, latents, z, None, None, {})
    with torch.no_grad():
        readout.weight.copy_(torch.cat([torch.eye(4), torch.zeros(4, 3)], dim=1))
        readout.bias.zero_()
        assert float(latent_readout_loss(readout, t2i)) == pytest.approx(0.0, abs=1e-12)
        readout.weight.zero_()
        expected = (latents ** 2).mean(-1)[mask.bool()].mean()
        assert float(latent_readout_loss(readout, t2i)) == pytest.approx(float(expected), rel=1e-6)


def test_compiled_training_compiles_every_layer_and_gives_the_same_losses(dataset, tmp_path, monkeypatch):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from harmon.models.harmon import Harmon

    compile_for_training, traced, compiled = Harmon.compile_for_training, [], []

    def backend(graph, example_inputs):  # records the graph, then runs it as traced (no inductor: quick)
        traced.append(graph)
        return graph.forward

    def recording(model, **options):
        compile_for_training(model, backend=backend)
        compiled.extend(m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None)

    monkeypatch.setattr(Harmon, "compile_for_training", recording)
    eager = train(config(dataset, tmp_path / "eager", max_steps=2))
    fast = train(config(dataset, tmp_path / "compiled", max_steps=2, compile=True))  # with gradient checkpointing
    assert traced
    layers = [m for m in compiled if isinstance(m, Qwen2DecoderLayer)]
    model = load_model(TINY_FIXTURE)
    assert len(layers) == model.llm.config.num_hidden_layers
    assert len(compiled) == len(layers) + len(model.mar.encoder_blocks) + len(model.mar.decoder_blocks) + 1
    for a, b in zip(eager.history, fast.history):
        assert a["t2i"] == pytest.approx(b["t2i"], rel=1e-5) and a["i2t"] == pytest.approx(b["i2t"], rel=1e-5)


def test_lora_trains_and_merges(dataset, tmp_path):
    result = train(config(dataset, tmp_path / "lora", max_steps=2, lora={"r": 4},
                          freeze=["mar_encoder", "mar_decoder", "projections"], data={"jsonl": []}))
    merged = load_model(result.final_dir)
    base = load_model(TINY_FIXTURE)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(n.startswith("llm.") for n in changed)


def test_two_processes_match_one(dataset, tmp_path):
    """The same global batch on 1 process and on 2 gloo processes gives the same losses.

    MAR's dropout draws from each process's own stream, so the model here has it off.
    """
    from harmon.checkpoint import load_state_dict
    from harmon.saving import save_model
    from harmon.config import HarmonConfig

    base = load_model(TINY_FIXTURE)
    settings = base.config.to_dict()
    settings["mar"].update(attn_dropout=0.0, proj_dropout=0.0)
    model_dir = save_model(load_state_dict(HarmonConfig.from_dict(settings), base.state_dict()), tmp_path / "model")
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        cfg = config(dataset, out, max_steps=3, save_every=3, model=str(model_dir)).to_dict()
        path = tmp_path / f"p{procs}.json"
        path.write_text(json.dumps(cfg))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                   "--master_port", str(29500 + procs), "-m", "harmon.cli", "train", str(path)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[procs] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for one, two in zip(results[1], results[2]):
        assert one["t2i"] == pytest.approx(two["t2i"], rel=1e-4)
        assert one["i2t"] == pytest.approx(two["i2t"], rel=1e-4)
    assert len(results[2]) == 3


def test_fitting_a_few_images_learns_both_directions(dataset, tmp_path):
    """250 steps on four coloured squares: both losses fall at least 5x and the answers are learned."""
    cfg = config(dataset, tmp_path / "fit", max_steps=250, save_every=1000, log_every=50, gradient_checkpointing=False,
                 optim={"lr": 2e-3, "warmup_ratio": 0.05}, data={"i2t_batch_size": 4, "uncond_prob": 0.0})
    result = train(cfg)
    first, last = result.history[0], result.history[-10:]
    t2i_end = sum(h["t2i"] for h in last) / len(last)
    i2t_end = sum(h["i2t"] for h in last) / len(last)
    assert t2i_end < first["t2i"] / 5, (first["t2i"], t2i_end)
    assert i2t_end < first["i2t"] / 5, (first["i2t"], i2t_end)

    from harmon.hub import load_tokenizer
    from harmon.pipelines import ImageToTextPipeline

    model = load_model(result.final_dir)
    answer = ImageToTextPipeline(model, load_tokenizer(result.final_dir, 1000), image_size=64)
    replies = [answer(dataset / "images" / f"{i}.png", "What color is the square?", DecodingSettings(max_new_tokens=8))
               for i in range(len(COLORS))]
    assert replies == list(COLORS)


def test_fine_tuned_shapes_model_redraws_its_training_images(tmp_path):
    """Fitting the shipped shapes model to four scenes with distinct captions (300 steps): the text-to-image
    loss falls at least 3x, and each caption then draws latents near its own scene's and far from the others'."""
    from harmon.hub import default_model_folder, load_tokenizer
    from harmon.pipelines import TextToImagePipeline
    from harmon.processing import image_to_tensor
    from harmon.shapes import world

    rng, scenes = world.make_rng(7, 99), []
    while len(scenes) < 4:  # distinct captions, so that each names one image
        scene = world.sample_scene("single_object", rng)
        if scene.prompt not in [s.prompt for s in scenes]:
            scenes.append(scene)
    (tmp_path / "images").mkdir()
    lines = []
    for i, scene in enumerate(scenes):
        world.render(scene).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": scene.prompt}))
    (tmp_path / "t2i.jsonl").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig.from_dict({
        "model": str(default_model_folder()), "output_dir": str(tmp_path / "run"), "max_steps": 300,
        "save_every": 1000, "log_every": 25, "progress": False, "gradient_checkpointing": False,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.05},
        "data": {"jsonl": [str(tmp_path / "t2i.jsonl")], "image_size": 64, "t2i_batch_size": 8, "uncond_prob": 0.0}})
    result = train(cfg)
    first, end = result.history[0]["t2i"], float(np.mean([h["t2i"] for h in result.history[-4:]]))
    assert end < first / 3, (first, end)

    model = load_model(result.final_dir)
    pipe = TextToImagePipeline(model, load_tokenizer(result.final_dir, 512))
    with torch.no_grad():
        truth = model.encode(torch.cat([image_to_tensor(world.render(s), 64) for s in scenes])).flatten(1)  # (4, L*C)
    own = []
    for i, scene in enumerate(scenes):
        drawn = pipe([scene.prompt], GenerationSettings(guidance_scale=1.0), num_images_per_prompt=2, seeds=[0, 1],
                     output_type="pt", progress=False)
        with torch.no_grad():
            latents = model.encode(drawn.images).flatten(1)  # (2, L*C), re-encoded from the decoded image
        error = torch.cdist(latents, truth) / truth.norm(dim=1)  # (2, 4) relative distance to every scene
        assert (error.argmin(dim=1) == i).all(), (scene.prompt, error)
        own += error[:, i].tolist()
    assert float(np.median(own)) < 0.35, own


def test_unreadable_images_never_stop_a_run(dataset, tmp_path, capsys):
    broken = tmp_path / "broken.jsonl"
    (tmp_path / "bad.png").write_bytes(b"not a png")
    broken.write_text(json.dumps({"image": "missing.png", "caption": "gone"}) + "\n" +
                      json.dumps({"image": "bad.png", "caption": "corrupt"}) + "\n")
    result = train(config(dataset, tmp_path / "run", max_steps=2, save_every=2,
                          data={"jsonl": [str(broken)], "llava": [], "t2i_batch_size": 2}))
    assert result.steps == 2 and result.final_dir is not None
    assert len(result.skipped_images) == 4  # 2 images x 2 steps, each reported
    assert "skipped 4 unreadable images" in capsys.readouterr().out
