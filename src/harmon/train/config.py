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


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    warmup_ratio: float = 0.01
    min_lr_ratio: float = 0.0


@dataclass
class LoraConfig:
    """LoRA on the LLM through PEFT; ``r = 0`` turns it off."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


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
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.freeze) - set(PARTS))
        if unknown:
            raise ValueError(f"freeze: unknown parts {unknown}; choose from {list(PARTS)}")
        if not (self.data.finetune or self.data.jsonl or self.data.llava):
            raise ValueError("data: give at least one of finetune, jsonl, llava")
        if self.latent_readout < 0:
            raise ValueError(f"latent_readout must be >= 0, got {self.latent_readout}")
        for name in ("max_steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.data.image_size % 16 or self.data.image_size < 16:
            raise ValueError(f"data.image_size must be a multiple of 16, got {self.data.image_size}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _build(cls, data, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        nested = {"data": DataConfig, "optim": OptimConfig, "lora": LoraConfig}.get(name) if cls is TrainConfig \
            else None
        kwargs[name] = _build(nested, value, f"{where}.{name}") if nested else value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from err
