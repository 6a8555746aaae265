"""Configuration dataclasses and named size presets for Harmon.

Field names follow the original code's keyword arguments (``mar_kwargs`` of the
released configs, the LDM ``AutoencoderKL`` arguments, ``Qwen2Config``), so a
config dictionary from the original project, from a reference fixture or from a
Hugging Face style ``config.json`` maps onto these classes without renaming.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import InputError
from .validation import check_field_types, check_range


def _from_dict(cls, data: dict[str, Any], what: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"unknown {what} config keys: {unknown}; expected a subset of {sorted(known)}")
    return cls(**data)


@dataclass(frozen=True)
class VAEConfig:
    """The KL-16 autoencoder of MAR (LDM layout). ``ch`` is 128 in the released VAE."""

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    resolution: int = 256
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        check_field_types(self, "vae")
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "encoder_attn_resolutions", tuple(self.encoder_attn_resolutions))
        object.__setattr__(self, "decoder_attn_resolutions", tuple(self.decoder_attn_resolutions))
        for name in ("embed_dim", "ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
            check_range(getattr(self, name), f"vae.{name}", 1)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise InputError(f"vae.ch_mult must be positive integers, got {self.ch_mult}")
        check_range(self.dropout, "vae.dropout", 0, 1, high_open=True)
        if self.ch % 32:
            raise InputError(f"VAE base width ch={self.ch} must be a multiple of 32 (GroupNorm uses 32 groups)")
        if not self.double_z:
            raise InputError("only the variational KL autoencoder (double_z=True) is supported")

    @property
    def stride(self) -> int:
        """Pixels per latent pixel along each side (16 for KL-16)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VAEConfig":
        return _from_dict(cls, data, "vae")


@dataclass(frozen=True)
class MARConfig:
    """The MAR encoder/decoder and diffusion head (``mar_kwargs`` of the original)."""

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_layer_eps: float = 1e-6
    buffer_size: int = 64
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    label_drop_prob: float = 0.1
    mask_ratio_min: float = 0.7
    diffloss_d: int = 6
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    grad_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.num_sampling_steps, int) and not isinstance(self.num_sampling_steps, bool):
            object.__setattr__(self, "num_sampling_steps", str(self.num_sampling_steps))  # the original takes both
        check_field_types(self, "mar")
        for f in dataclasses.fields(self):
            if f.type in ("int", int):
                check_range(getattr(self, f.name), f"mar.{f.name}", 0 if f.name == "buffer_size" else 1)
        for name in ("attn_dropout", "proj_dropout", "label_drop_prob"):
            check_range(getattr(self, name), f"mar.{name}", 0, 1, high_open=True)
        check_range(self.mask_ratio_min, "mar.mask_ratio_min", 0, 1)
        check_range(self.mlp_ratio, "mar.mlp_ratio", 0, low_open=True)
        check_range(self.norm_layer_eps, "mar.norm_layer_eps", 0, low_open=True)
        if self.patch_size != 1:
            raise InputError(f"Harmon uses patch_size=1 (one token per latent pixel), got {self.patch_size}")
        if self.img_size % self.vae_stride:
            raise InputError(f"img_size {self.img_size} is not a multiple of vae_stride {self.vae_stride}")
        for dim, heads, name in ((self.encoder_embed_dim, self.encoder_num_heads, "encoder"),
                                 (self.decoder_embed_dim, self.decoder_num_heads, "decoder")):
            if dim % heads:
                raise InputError(f"{name}_embed_dim {dim} is not divisible by {name}_num_heads {heads}")

    @property
    def seq_h(self) -> int:
        """Native latent grid side (16 for 256 px)."""
        return self.img_size // self.vae_stride

    @property
    def seq_w(self) -> int:
        return self.img_size // self.vae_stride

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_w

    @property
    def token_embed_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MARConfig":
        return _from_dict(cls, data, "mar")


@dataclass(frozen=True)
class HarmonConfig:
    """The whole model: Qwen2 LLM (``Qwen2Config`` keyword arguments), MAR, VAE and ``vae_scale``."""

    llm: dict[str, Any]
    mar: MARConfig = field(default_factory=MARConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_scale: float = 0.2325
    name: str = "harmon"
    # defaults of the pipelines and the CLI for this model: image side in pixels (generation and
    # understanding) and MAR iterations; the original's 512 px and 64 for the released models
    image_size: int = 512
    num_iter: int = 64

    def __post_init__(self):
        if isinstance(self.mar, dict):
            object.__setattr__(self, "mar", MARConfig.from_dict(self.mar))
        if isinstance(self.vae, dict):
            object.__setattr__(self, "vae", VAEConfig.from_dict(self.vae))
        check_field_types(self, "")
        check_range(self.vae_scale, "vae_scale", 0, low_open=True)
        check_range(self.image_size, "image_size", 1)
        check_range(self.num_iter, "num_iter", 1)
        _check_llm(self.llm)
        if self.vae.embed_dim != self.mar.vae_embed_dim:
            raise InputError(f"VAE embed_dim {self.vae.embed_dim} != MAR vae_embed_dim {self.mar.vae_embed_dim}")
        if self.vae.stride != self.mar.vae_stride:
            raise InputError(f"VAE stride {self.vae.stride} != MAR vae_stride {self.mar.vae_stride}")
        object.__setattr__(self, "llm", copy.deepcopy(dict(self.llm)))

    @property
    def llm_hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def max_positions(self) -> int:
        """The LLM's positions: prompt, image tokens and buffer together (Qwen2Config's default 32768)."""
        return int(self.llm.get("max_position_embeddings", 32768))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (the ``config.json`` of our model folders)."""
        return {
            "model_type": "harmon",
            "name": self.name,
            "llm": copy.deepcopy(self.llm),
            "mar": dataclasses.asdict(self.mar),
            "vae": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.vae).items()},
            "vae_scale": self.vae_scale,
            "image_size": self.image_size,
            "num_iter": self.num_iter,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HarmonConfig":
        """Inverse of :meth:`to_dict`; ``model_type`` must be ``harmon`` when present."""
        data = dict(data)
        model_type = data.pop("model_type", "harmon")
        if model_type != "harmon":
            raise InputError(f"config.json has model_type {model_type!r}, expected 'harmon'")
        missing = {"llm", "mar"} - set(data)
        if missing:
            raise InputError(f"Harmon config is missing {sorted(missing)}")
        return _from_dict(cls, data, "harmon")


# the Qwen2 fields that size the LLM: positive integers (or positive numbers), checked before anything is built
_LLM_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


def _check_llm(llm: dict[str, Any]) -> None:
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in llm:
            raise InputError(f"llm.{key} is missing")
    for key in _LLM_SIZES:
        value = llm.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"llm.{key} must be a positive integer, got {value!r} ({type(value).__name__})")
    for key in ("rms_norm_eps", "rope_theta"):
        value = llm.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise InputError(f"llm.{key} must be a positive number, got {value!r} ({type(value).__name__})")
    if not isinstance(llm.get("tie_word_embeddings", False), bool):
        raise InputError(f"llm.tie_word_embeddings must be true or false, got {llm['tie_word_embeddings']!r}")
    if llm["hidden_size"] % llm["num_attention_heads"]:
        raise InputError(f"llm.hidden_size {llm['hidden_size']} is not divisible by llm.num_attention_heads "
                         f"{llm['num_attention_heads']}")


def _qwen2_5_llm(hidden: int, layers: int, heads: int, mlp: int) -> dict[str, Any]:
    return {
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    }


def harmon_0_5b() -> HarmonConfig:
    """Harmon-0.5B: Qwen2.5-0.5B-Instruct + MAR-Base."""
    return HarmonConfig(
        name="harmon-0.5b",
        llm=_qwen2_5_llm(hidden=896, layers=24, heads=14, mlp=4864),
        mar=MARConfig(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                      decoder_embed_dim=768, decoder_depth=12, decoder_num_heads=12,
                      diffloss_d=6, diffloss_w=1024),
    )


def harmon_1_5b() -> HarmonConfig:
    """Harmon-1.5B (and 1.5B-o): Qwen2.5-1.5B-Instruct + MAR-Huge."""
    return HarmonConfig(
        name="harmon-1.5b",
        llm=_qwen2_5_llm(hidden=1536, layers=28, heads=12, mlp=8960),
        mar=MARConfig(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16,
                      decoder_embed_dim=1280, decoder_depth=20, decoder_num_heads=16,
                      diffloss_d=12, diffloss_w=1536),
    )


def tiny() -> HarmonConfig:
    """A few-MB model with the real architecture, for tests (hidden 64, 2 layers everywhere)."""
    return HarmonConfig(
        name="tiny",
        llm={
            "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": True, "use_sliding_window": False, "attention_dropout": 0.0,
        },
        mar=MARConfig(img_size=64, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                      decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, buffer_size=4,
                      diffloss_d=2, diffloss_w=64, num_sampling_steps="10"),
        vae=VAEConfig(ch=32),
    )


def shapes() -> HarmonConfig:
    """The small Harmon of the shapes world (SHAPES.md), trained from nothing by ``harmon train-shapes``.

    64 px images, a KL autoencoder with stride 8 and 8 latent channels (an 8 x 8 grid of
    tokens), a 4-layer Qwen2 LLM over a 512-entry byte-level BPE vocabulary, MAR and
    the diffusion head at widths 256 / 128; no dropout (the world has endless data).
    It samples with the respacing ``"ddim100"`` (timesteps 0, 10, ..., 990, an option of the
    original's ``space_timesteps``) instead of ``"100"``, whose first step at t = 999 multiplies
    the error of the predicted noise by about 300: a head trained for minutes is not that precise.
    It trains with ``mask_ratio_min=0.0`` instead of 0.7: sampling draws most tokens while more than
    30% of the image is already visible, and a model trained only on 70-100% masks got worse, not
    better, with more visible tokens (the same truncated normal around 1 still puts 77% of the steps
    above 0.7).
    """
    return HarmonConfig(
        name="shapes",
        llm={
            "vocab_size": 512, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": True, "use_sliding_window": False, "attention_dropout": 0.0,
            "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
        },
        mar=MARConfig(img_size=64, vae_stride=8, vae_embed_dim=8,
                      encoder_embed_dim=256, encoder_depth=3, encoder_num_heads=4,
                      decoder_embed_dim=256, decoder_depth=3, decoder_num_heads=4,
                      buffer_size=8, attn_dropout=0.0, proj_dropout=0.0, mask_ratio_min=0.0,
                      diffloss_d=3, diffloss_w=128, num_sampling_steps="ddim100"),
        vae=VAEConfig(embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, resolution=64,
                      encoder_attn_resolutions=()),
        vae_scale=1.0,
        image_size=64,
        num_iter=16,
    )


PRESETS: dict[str, Callable[[], HarmonConfig]] = {
    "harmon-0.5b": harmon_0_5b,
    "harmon-1.5b": harmon_1_5b,
    "tiny": tiny,
    "shapes": shapes,
}
