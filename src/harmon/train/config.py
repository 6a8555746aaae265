"""The training configuration: one YAML file or dataclass; unknown keys are rejected.

Defaults are the original recipe: AdamW lr 1e-5, betas (0.9, 0.95), weight decay
0.02 (none on 1-D parameters, biases and the diffusion head), gradient clipping
1.0, 1% linear warm-up then cosine decay, bfloat16 autocast where supported,
gradient checkpointing, VAE frozen, captions replaced by the unconditional
prompt 10% of the time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import InputError
from ..settings import GenerationSettings
from ..validation import check_field_types, check_prompt, check_range

PARTS = ("llm", "mar_encoder", "mar_decoder", "projections")


@dataclass
class DataConfig:
    """Where the examples come from and how many of each kind make one global step."""

    finetune: list[str] = field(default_factory=list)  # FINETUNE roots (data_info.json, images/, annotations/)
    jsonl: list[str] = field(default_factory=list)     # {"image", "caption"} per line
    llava: list[str] = field(default_factory=list)     # LLaVA conversation JSON files (understanding)
    image_size: int = 256
    t2i_batch_size: int = 8                            # text-to-image examples per step, over all processes
    i2t_batch_size: int = 8                            # image-to-text examples per step, over all processes
    uncond_prob: float = 0.1
    max_length: int = 2048

    def __post_init__(self):
        check_field_types(self, "data")
        for name in ("t2i_batch_size", "i2t_batch_size"):
            check_range(getattr(self, name), f"data.{name}", 0)
        if self.t2i_batch_size + self.i2t_batch_size == 0:
            raise InputError("data: t2i_batch_size and i2t_batch_size are both 0: nothing to train on")
        check_range(self.uncond_prob, "data.uncond_prob", 0, 1)
        check_range(self.max_length, "data.max_length", 1)
        if self.image_size % 16 or self.image_size < 16:
            raise InputError(f"data.image_size must be a multiple of 16, got {self.image_size}")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    warmup_ratio: float = 0.01
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        check_field_types(self, "optim")
        self.betas = tuple(self.betas)
        check_range(self.lr, "optim.lr", 0, low_open=True)
        for i, beta in enumerate(self.betas):
            check_range(beta, f"optim.betas[{i}]", 0, 1, high_open=True)
        check_range(self.weight_decay, "optim.weight_decay", 0)
        check_range(self.grad_clip, "optim.grad_clip", 0, low_open=True)
        check_range(self.warmup_ratio, "optim.warmup_ratio", 0, 1)
        check_range(self.min_lr_ratio, "optim.min_lr_ratio", 0, 1)


@dataclass
class LoraConfig:
    """LoRA on the LLM through PEFT; ``r = 0`` turns it off."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        check_field_types(self, "lora")
        check_range(self.r, "lora.r", 0)
        check_range(self.alpha, "lora.alpha", 1)
        check_range(self.dropout, "lora.dropout", 0, 1, high_open=True)


@dataclass
class GRPOConfig:
    """Reward fine-tuning of generation (:mod:`harmon.train.grpo`): a run with this section draws images for
    ``prompts`` and learns from ``reward`` instead of reading data.

    ``prompts``: a JSON list or JSONL file of prompt strings or GenEval-style records (``{"prompt", ...}``,
    passed whole to the reward); ``reward``: ``"module:Name"``, a :class:`~harmon.train.rewards.Reward`
    class (or factory) called without arguments; ``generation``: the rollouts'
    :class:`~harmon.settings.GenerationSettings` fields (default: the model's inference defaults).
    """

    prompts: str
    reward: str
    prompts_per_step: int = 4          # over all processes; each process draws whole groups
    group_size: int = 8                # images per prompt, whose rewards are normalised together
    reverse_steps: int = 4             # noisy reverse steps trained per MAR iteration, drawn at random ...
    noisiest: float = 0.5              # ... from this share of each chain, from its noisiest end (see grpo.py)
    updates: int = 1                   # optimiser steps per rollout (the clip acts from the second on)
    clip: float = 0.2
    kl: float = 0.0                    # weight of the KL term to the starting model (kept frozen when > 0)
    generation: dict = field(default_factory=dict)

    def __post_init__(self):
        check_field_types(self, "grpo")
        for name in ("prompts_per_step", "reverse_steps", "updates"):
            check_range(getattr(self, name), f"grpo.{name}", 1)
        check_range(self.group_size, "grpo.group_size", 2)
        check_range(self.clip, "grpo.clip", 0, 1, low_open=True, high_open=True)
        check_range(self.kl, "grpo.kl", 0)
        check_range(self.noisiest, "grpo.noisiest", 0, 1, low_open=True)
        for name in ("prompts", "reward"):
            check_prompt(getattr(self, name), f"grpo.{name}")
        try:
            settings = GenerationSettings(**self.generation)
        except (TypeError, InputError) as err:
            raise InputError(f"grpo.generation: {err}") from None
        if settings.self_check != 1:
            raise InputError("grpo.generation.self_check must be 1: the policy is the sampler itself")


@dataclass
class TrainConfig:
    model: str                                  # model to start from: folder (any layout) or hub id
    output_dir: str
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_steps: int = 1000
    seed: int = 0
    t2i_weight: float = 1.0
    i2t_weight: float = 1.0
    latent_readout: float = 0.0  # weight of the auxiliary readout loss (losses.latent_readout_loss); 0: the original's only
    freeze: list[str] = field(default_factory=list)  # any of PARTS; the VAE is always frozen
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, else float32
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile the transformer layers and the diffusion head (Harmon.compile_for_training)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # with several processes: ddp keeps a whole model on each, fsdp shards parameters, gradients and optimiser
    # state over them (train/fsdp.py; checkpoints written by every process)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True
    grpo: GRPOConfig | None = None  # reward fine-tuning instead of the data's objectives

    def __post_init__(self):
        check_field_types(self, "")
        unknown = sorted(set(self.freeze) - set(PARTS))
        if unknown:
            raise InputError(f"freeze: unknown parts {unknown}; choose from {list(PARTS)}")
        has_data = bool(self.data.finetune or self.data.jsonl or self.data.llava)
        if self.grpo is None and not has_data:
            raise InputError("data: give at least one of finetune, jsonl, llava (or a grpo section)")
        if self.grpo is not None and has_data:
            raise InputError("a grpo run learns from its rewards: leave data out")
        if self.grpo is not None and self.parallel != "ddp":
            raise InputError("a grpo run runs with parallel: ddp (reward fine-tuning is not sharded yet)")
        for name in ("latent_readout", "t2i_weight", "i2t_weight", "seed"):
            check_range(getattr(self, name), name, 0)
        for name in ("max_steps", "save_every", "log_every", "keep_checkpoints"):
            check_range(getattr(self, name), name, 1)
        for name in ("model", "output_dir"):
            check_prompt(getattr(self, name), name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _build(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise InputError(f"cannot read {path}: {err}") from err
        except RecursionError:
            raise InputError(f"cannot read {path}: nested too deeply") from None
        if not isinstance(data, dict):
            raise InputError(f"{path} must hold a mapping of settings")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        nested = {"data": DataConfig, "optim": OptimConfig, "lora": LoraConfig, "grpo": GRPOConfig}.get(name) \
            if cls is TrainConfig else None
        absent = value is None and fields[name].default is None  # an optional section left out (grpo: null)
        kwargs[name] = _build(nested, value, f"{where}.{name}") if nested and not absent else value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise InputError(f"{where}: {err}") from err
