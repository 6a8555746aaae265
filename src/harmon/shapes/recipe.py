"""The shapes recipe: train the whole small Harmon of the shapes world from nothing, in one command.

``run_recipe(out_dir, RecipeConfig())`` (``harmon train-shapes --out DIR``) runs these stages,
each written to ``out_dir`` and skipped when a later call finds it done, so an
interrupted run continues where it stopped:

1. ``data/``: training scenes in the trainer's formats (:mod:`harmon.shapes.datasets`);
2. ``tokenizer/``: a byte-level BPE tokenizer learnt from the training texts;
3. ``vae/``: the KL autoencoder trained on the training images (:mod:`harmon.train.vae`),
   and ``vae_scale`` chosen to give unit-variance latents;
4. ``init/``: the Harmon model (:func:`harmon.config.shapes`) with fresh weights from the
   seed, the trained VAE and the tokenizer;
5. ``harmon/``: the project's trainer (:mod:`harmon.train.trainer`) on both objectives,
   exported to ``harmon/final``; with ``local_decoder_after`` set, the run stops at
   that step, half of the MAR decoder's heads are made local in its checkpoint (the ``local``
   stage), and the run goes on from there;
7. ``restart1/``, ``restart2/``, ...: ``restarts`` further runs of the same trainer over the same data, each
   from the last run's export (the first from ``harmon/final``) with a fresh optimizer and a warm-up and cosine
   schedule of its own (``restart_steps`` at peak ``restart_lr``): the first run stops while still learning, and
   each restart raised both scores (docs/shapes.md, "Restarts");
8. ``decoder/``: the VAE's decoder, alone, trained further on the training images plus empty canvases
   (:func:`refine_decoder`): a decoder that never saw an empty canvas draws the latent of one as a
   washed-out noisy frame, which is what the model's images without an object looked like
   (docs/shapes.md); the encoder, and so every latent the Harmon learnt, stays as it is. The finished
   model is the last restart's export (``harmon/final`` without restarts) with this decoder.

``model/`` holds the finished model with its weights stored in float16 (the shipped form).
``recipe.json`` records the settings and the seconds each stage took. Everything is
drawn from ``seed``; the same seed on the same machine gives the same model.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, read_json
from ..config import HarmonConfig, shapes
from ..errors import InputError
from ..files import check_folder_path, write_atomically
from ..models.harmon import Harmon
from ..models.init import init_local_decoder_attention, init_vae, init_weights
from ..models.vae import AutoencoderKL
from ..processing import GENERATION_PREFIX, UNCONDITIONAL_PROMPT, chat_prompt
from ..rng import derive_seed
from ..saving import save_model
from ..tokenizer import save_tokenizer, train_small_tokenizer
from ..train.config import DataConfig, OptimConfig, TrainConfig
from ..train.checkpoints import setting_changes
from ..train.trainer import edit_checkpoint, latest_step, train
from ..train.vae import VAETrainConfig, latent_scale, train_vae
from .datasets import write_datasets
from .world import BACKGROUND

VAE_STREAM, INIT_STREAM, LOCAL_STREAM, DECODER_STREAM = 101, 102, 103, 104  # derive_seed tags of the recipe's
# own generators
IMAGES_PER_EMPTY_CANVAS = 16  # the decoder stage adds one empty canvas per this many training images
# By step 500 the visible tokens enter the MAR decoder ~4x larger than in a fresh model (norm ~63
# against ~16, measured), and the local positions are drawn at that size.
LOCAL_TOKEN_SCALE = 4.0


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX). Without them bf16 autocast is
    far slower than float32, not faster: 9x for a linear layer and 50x for a convolution, measured on an
    AVX2-only 2-core EPYC, where the recipe's VAE stage in bf16 ran at 9.8 s a step and in float32 at 1.0 s."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass
class RecipeConfig:
    """Settings of the recipe; the defaults are the shipped model's."""

    seed: int = 0
    n_images: int = 30000
    vae: VAETrainConfig = field(default_factory=lambda: VAETrainConfig(steps=1500, batch_size=32, lr=3e-3))
    steps: int = 3500
    t2i_batch_size: int = 32
    i2t_batch_size: int = 16
    lr: float = 1e-3
    warmup_ratio: float = 0.02
    # autocast of the VAE and Harmon stages; "auto": bfloat16 where the CPU has bf16 matrix instructions
    # (cpu_has_bf16), else float32, resolved at construction so that recipe.json records what ran
    precision: str = "auto"
    # make half of the MAR decoder's heads local after this many Harmon steps (a multiple of save_every;
    # None: never); see models.init.init_local_decoder_attention
    local_decoder_after: int | None = 500
    latent_readout: float = 1.0  # weight of the trainer's auxiliary readout loss (TrainConfig.latent_readout)
    # the restarts (stage 7): how many further runs (0: none), the steps and peak learning rate of each; warm-up,
    # batches, seed and the rest as the first run's
    restarts: int = 2
    restart_steps: int = 1750
    restart_lr: float = 5e-4
    compile: bool = True  # torch.compile for the Harmon stage: 1.39x on a 2-core CPU, same losses up to rounding
    # the decoder stage, in float32: it is short, and bf16 autocast is ~100x slower on CPUs without bf16 matrix units
    decoder: VAETrainConfig = field(default_factory=lambda: VAETrainConfig(
        steps=300, batch_size=32, lr=5e-4, warmup_steps=20, log_every=50, bfloat16=False, decoder_only=True))
    save_every: int = 250
    progress: bool = True

    def __post_init__(self):
        if self.precision not in ("auto", "bfloat16", "float32"):
            raise InputError(f"precision must be 'auto', 'bfloat16' or 'float32', got {self.precision!r}")
        if self.precision == "auto":
            self.precision = "bfloat16" if cpu_has_bf16() else "float32"
        if self.precision == "float32":
            self.vae = dataclasses.replace(self.vae, bfloat16=False)
        for name, least in (("restarts", 0), ("restart_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be a whole number >= {least}, got {value!r}")
        if isinstance(self.restart_lr, bool) or not isinstance(self.restart_lr, (int, float)) \
                or not 0 < self.restart_lr < float("inf"):
            raise InputError(f"restart_lr must be a positive number, got {self.restart_lr!r}")
        after = self.local_decoder_after
        if after is not None and not (0 < after < self.steps and after % self.save_every == 0):
            raise InputError(f"local_decoder_after must be a multiple of save_every ({self.save_every}) "
                             f"between 0 and steps ({self.steps}), got {after}")

    def to_dict(self) -> dict:
        """The settings that shape the model (all but ``progress``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}


def training_texts(data_dir: Path) -> list[str]:
    """Every text the model reads or writes in training, in chat form (the tokenizer's corpus)."""
    texts = [chat_prompt(UNCONDITIONAL_PROMPT)]
    for line in (data_dir / "scenes.jsonl").read_text(encoding="utf-8").splitlines():
        scene = json.loads(line)
        texts.append(chat_prompt(GENERATION_PREFIX + scene["prompt"]))
        texts += [chat_prompt(f"<image>\n{q['question']}") + q["answer"] + "<|im_end|>" for q in scene["questions"]]
    return texts


def load_images(data_dir: Path) -> torch.Tensor:
    """The training images of ``data_dir/t2i.jsonl`` as (N, 3, H, W) uint8."""
    rows = [json.loads(line) for line in (data_dir / "t2i.jsonl").read_text(encoding="utf-8").splitlines()]
    arrays = [np.asarray(Image.open(data_dir / row["image"]).convert("RGB")) for row in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _stage(out: Path, name: str, times: dict, run) -> None:
    """Run ``run()`` unless ``out/name`` is marked done; record its seconds in ``times``."""
    done = out / name / ".done"
    if done.is_file():
        return
    tick = time.perf_counter()
    run()
    times[name] = round(time.perf_counter() - tick, 1)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text("")


def run_recipe(out_dir: str | Path, cfg: RecipeConfig) -> Path:
    """Run (or continue) every stage of the recipe in ``out_dir``; returns the finished model folder."""
    out = check_folder_path(out_dir, "the recipe's output folder")
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "recipe.json"
    record = read_json(record_path) if record_path.is_file() else {"config": cfg.to_dict(), "seconds": {}}
    changed = setting_changes(record["config"], cfg.to_dict())
    if changed:
        raise InputError(f"{out} holds a recipe run with other settings ({'; '.join(changed)}): continue it with "
                         f"its own ({record_path}), or use a new folder")
    times = record["seconds"]
    data, tok_dir, vae_dir, init_dir = out / "data", out / "tokenizer", out / "vae", out / "init"
    config = shapes()

    def save_record():
        write_atomically(record_path, json.dumps(record, indent=1) + "\n")  # the resume record: never torn

    stages = {
        "data": lambda: write_datasets(data, cfg.n_images, cfg.seed, config.mar.img_size),
        "tokenizer": lambda: train_small_tokenizer(training_texts(data), int(config.llm["vocab_size"]))
        .save_pretrained(str(tok_dir)),
        "vae": lambda: _train_vae(config, data, vae_dir, cfg),
        "init": lambda: _initial_model(config, tok_dir, vae_dir, init_dir, cfg.seed),
    }
    save_record()
    for name, run in stages.items():
        _stage(out, name, times, run)
        save_record()
    harmon_dir = out / "harmon"
    harmon_cfg = harmon_train_config(cfg, init_dir, data, harmon_dir, cfg.steps, cfg.lr)
    tick = time.perf_counter()
    if cfg.local_decoder_after is not None:
        done = latest_step(harmon_dir)
        if done < cfg.local_decoder_after:
            train(harmon_cfg, stop_after=cfg.local_decoder_after - done)
        times["harmon"] = round(times.get("harmon", 0.0) + time.perf_counter() - tick, 1)
        generator = torch.Generator().manual_seed(derive_seed(cfg.seed, LOCAL_STREAM))
        _stage(out, "local", times, lambda: edit_checkpoint(harmon_dir, lambda model: init_local_decoder_attention(
            model.mar, generator, token_scale=LOCAL_TOKEN_SCALE)))
        save_record()
        tick = time.perf_counter()
    final = train(harmon_cfg).final_dir
    times["harmon"] = round(times.get("harmon", 0.0) + time.perf_counter() - tick, 1)
    save_record()
    for restart in range(1, cfg.restarts + 1):
        if final is None:
            break
        name = f"restart{restart}"
        tick = time.perf_counter()
        final = train(harmon_train_config(cfg, final, data, out / name, cfg.restart_steps, cfg.restart_lr)).final_dir
        times[name] = round(times.get(name, 0.0) + time.perf_counter() - tick, 1)
        save_record()
    model_dir = out / "model"
    if final is not None:
        _stage(out, "decoder", times, lambda: refine_decoder(final, data, out / "decoder", cfg))
        times["total"] = round(sum(v for k, v in times.items() if k != "total"), 1)
        save_record()
        store_float16(out / "decoder", final, model_dir)
    return model_dir


def store_float16(model_dir: Path, files_dir: Path, out: Path) -> None:
    """Write ``out`` anew: the model of ``model_dir`` with its weights in the shipped form (float16: half the
    size, the same evaluation scores, docs/shapes.md) beside the other files (tokenizer) of ``files_dir``."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(files_dir, out, ignore=shutil.ignore_patterns(WEIGHTS_NAME, CONFIG_NAME))
    save_model(load_model(model_dir, dtype=torch.float16), out)


def harmon_train_config(cfg: RecipeConfig, model_dir: Path, data: Path, output_dir: Path, steps: int,
                        lr: float) -> TrainConfig:
    """The trainer's settings for the recipe's runs of the Harmon (the first run and the restarts differ in the
    model they start from, their folder, steps and peak learning rate): both objectives on the recipe's data."""
    image_size = shapes().mar.img_size
    return TrainConfig(
        model=str(model_dir), output_dir=str(output_dir),
        data=DataConfig(jsonl=[str(data / "t2i.jsonl")], llava=[str(data / "llava.json")],
                        image_size=image_size, t2i_batch_size=cfg.t2i_batch_size,
                        i2t_batch_size=cfg.i2t_batch_size),
        optim=OptimConfig(lr=lr, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=0.05),
        max_steps=steps, seed=cfg.seed, latent_readout=cfg.latent_readout, precision=cfg.precision,
        gradient_checkpointing=False, compile=cfg.compile, device="cpu", save_every=cfg.save_every,
        keep_checkpoints=1, log_every=25, progress=cfg.progress)


def refine_decoder(model_dir: Path, data: Path, out_dir: Path, cfg: RecipeConfig) -> None:
    """The decoder stage: the model of ``model_dir`` with its VAE decoder trained further (``cfg.decoder``) on
    the training images of ``data`` plus one empty canvas per :data:`IMAGES_PER_EMPTY_CANVAS` of them, written
    to ``out_dir`` (float32, with ``log.jsonl``). Its latents do not change: the encoder is frozen."""
    if not cfg.decoder.decoder_only:
        raise InputError("the decoder stage trains the decoder alone: decoder.decoder_only must be true")
    model = load_model(model_dir, dtype=torch.float32)
    images = load_images(data)
    canvas = torch.tensor(BACKGROUND, dtype=torch.uint8).view(1, 3, 1, 1)
    empty = canvas.expand(len(images) // IMAGES_PER_EMPTY_CANVAS, 3, *images.shape[2:])
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, DECODER_STREAM))
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "log.jsonl", "w") as log:
        train_vae(model.vae, torch.cat([images, empty]), cfg.decoder, generator, progress=cfg.progress,
                  log=lambda r: (log.write(json.dumps(r) + "\n"), log.flush()))
    save_model(model, out_dir)


def _train_vae(config: HarmonConfig, data: Path, vae_dir: Path, cfg: RecipeConfig) -> None:
    images = load_images(data)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, VAE_STREAM))
    with torch.random.fork_rng(devices=[]):  # the constructor's default init must not touch the caller's RNG
        vae = AutoencoderKL(config.vae)
    init_vae(vae, generator)
    vae_dir.mkdir(parents=True, exist_ok=True)
    with open(vae_dir / "log.jsonl", "w") as log:
        train_vae(vae, images, cfg.vae, generator, progress=cfg.progress,
                  log=lambda r: (log.write(json.dumps(r) + "\n"), log.flush()))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(vae_dir / "vae.safetensors"))
    scale = latent_scale(vae, images[:2048])
    (vae_dir / "scale.json").write_text(json.dumps({"vae_scale": scale}) + "\n")


def _initial_model(config: HarmonConfig, tok_dir: Path, vae_dir: Path, init_dir: Path, seed: int) -> None:
    from transformers import AutoTokenizer

    scale = read_json(vae_dir / "scale.json")["vae_scale"]
    config = dataclasses.replace(config, vae_scale=float(scale))
    with torch.random.fork_rng(devices=[]):  # the constructors' default init must not touch the caller's RNG
        model = Harmon(config)
    generator = torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM))
    init_weights(model, generator)
    model.vae.load_state_dict(load_file(str(vae_dir / "vae.safetensors")))
    save_model(model, init_dir)
    save_tokenizer(AutoTokenizer.from_pretrained(str(tok_dir)), init_dir)
