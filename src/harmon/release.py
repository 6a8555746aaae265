"""The layout of the official Hugging Face release (``wusize/Harmon-0_5B``, ``wusize/Harmon-1_5B``).

Such a folder holds ``config.json`` (``model_type: "harmon"``, transformers' bookkeeping,
an ``llm`` dict that is a whole saved ``Qwen2Config`` and a ``mar`` dict of MAR keyword
arguments whose ``type`` -- ``mar_base``, ``mar_large`` or ``mar_huge`` -- fixes the
widths, depths and heads), one ``model.safetensors`` with every tensor (the VAE under
``vae.``), the tokenizer files, and the release's remote-code ``.py`` files, which
``harmon`` never imports. The VAE and ``vae_scale`` are not in the config: the release's
model code fixes them (KL-16, ``embed_dim=16, ch_mult=(1, 1, 2, 2, 4)``, scale 0.2325).

This module translates between that ``config.json`` and :class:`HarmonConfig`, in both
directions; the weights need no translation (the key names are the original's, as ours).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .config import HarmonConfig, MARConfig, VAEConfig
from .errors import InputError

# what the release's model code builds regardless of config.json
RELEASE_VAE = VAEConfig(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
RELEASE_VAE_SCALE = 0.2325
# the MAR sizes named by mar.type: (embed_dim, depth, num_heads) of both encoder and decoder
MAR_TYPES = {"mar_base": (768, 12, 12), "mar_large": (1024, 16, 16), "mar_huge": (1280, 20, 16)}
_MAR_FIXED = {"mlp_ratio": 4.0, "norm_layer_eps": 1e-6}
_MAR_SIZE_KEYS = ("encoder_embed_dim", "encoder_depth", "encoder_num_heads",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
# MAR keyword arguments config.json may set besides mar.type
MAR_KWARGS = tuple(f.name for f in dataclasses.fields(MARConfig) if f.name not in _MAR_SIZE_KEYS + tuple(_MAR_FIXED))

# Qwen2Config fields that shape the LLM (transformers 4.45's, and transformers 5's rope/layer fields)
LLM_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "attention_dropout", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"})
# what transformers writes into every saved config (generation defaults, labels, versions): no effect on the model
BOOKKEEPING = frozenset({
    "_name_or_path", "_attn_implementation_autoset", "add_cross_attention", "architectures", "auto_map",
    "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "dtype", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type", "pruned_heads",
    "remove_invalid_values", "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
    "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version", "typical_p",
    "use_bfloat16", "use_cache"})
# our settings that the release has no place for, kept under this key so that a round trip loses nothing
HARMON_KEY = "harmon"
_HARMON_FIELDS = ("name", "image_size", "num_iter")
# the transformers version of the release's remote code (and of the original code)
RELEASE_TRANSFORMERS = "4.45.2"


class ReleaseConfigError(InputError):
    """A release ``config.json`` that cannot be read as Harmon's, naming the field."""


def is_release_config(data: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is in the release's layout (a ``mar`` dict carrying a ``type``)."""
    return isinstance(data.get("mar"), dict) and "type" in data["mar"] and "vae" not in data


def config_from_release(data: dict[str, Any]) -> HarmonConfig:
    """The :class:`HarmonConfig` of a release ``config.json``; a field not understood is an error naming it."""
    unknown = sorted(set(data) - BOOKKEEPING - {"model_type", "llm", "mar", HARMON_KEY})
    if unknown:
        raise ReleaseConfigError(f"top-level fields not understood: {unknown}")
    if data.get("model_type") != "harmon":
        raise ReleaseConfigError(f"model_type is {data.get('model_type')!r}, expected 'harmon'")
    if not isinstance(data.get("llm"), dict):
        raise ReleaseConfigError("'llm' must be a dict (a Qwen2 config)")
    extras = data.get(HARMON_KEY, {})
    if not isinstance(extras, dict) or set(extras) - set(_HARMON_FIELDS):
        raise ReleaseConfigError(f"'{HARMON_KEY}' must be a dict of {list(_HARMON_FIELDS)}, got {extras!r}")
    llm, mar = _llm_from_release(data["llm"]), _mar_from_release(data["mar"])
    return HarmonConfig(llm=llm, mar=mar, vae=RELEASE_VAE, vae_scale=RELEASE_VAE_SCALE,
                        **{"name": _release_name(data), **extras})


def _llm_from_release(llm: dict[str, Any]) -> dict[str, Any]:
    model_type = llm.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ReleaseConfigError(f"llm.model_type is {model_type!r}: only Qwen2 LLMs are supported")
    unknown = sorted(set(llm) - LLM_FIELDS - BOOKKEEPING - {"model_type"})
    if unknown:
        raise ReleaseConfigError(f"llm fields not understood: {unknown}")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key not in llm:
            raise ReleaseConfigError(f"llm.{key} is missing")
    # rope_scaling null is the default; a real one is passed on to Qwen2Config
    return {k: v for k, v in llm.items() if k in LLM_FIELDS and not (k == "rope_scaling" and v is None)}


def _mar_from_release(mar: dict[str, Any]) -> MARConfig:
    mar = dict(mar)
    kind = mar.pop("type")
    if kind not in MAR_TYPES:
        raise ReleaseConfigError(f"mar.type is {kind!r}; the release's model code knows {sorted(MAR_TYPES)}")
    fixed = sorted(set(mar) & (set(_MAR_SIZE_KEYS) | set(_MAR_FIXED)))
    if fixed:
        raise ReleaseConfigError(f"mar.{fixed[0]} is set, but mar.type {kind!r} fixes it (the release's code "
                                 "would fail with 'multiple values')")
    unknown = sorted(set(mar) - set(MAR_KWARGS))
    if unknown:
        raise ReleaseConfigError(f"mar fields not understood: {unknown}; known: {list(MAR_KWARGS)}")
    dim, depth, heads = MAR_TYPES[kind]
    return MARConfig(**mar, **_MAR_FIXED, encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=heads,
                     decoder_embed_dim=dim, decoder_depth=depth, decoder_num_heads=heads)


def _release_name(data: dict[str, Any]) -> str:
    """``harmon-0.5b`` / ``harmon-1.5b`` for the released sizes, else ``harmon-release``."""
    sizes = {(896, "mar_base"): "harmon-0.5b", (1536, "mar_huge"): "harmon-1.5b"}
    return sizes.get((data["llm"].get("hidden_size"), data["mar"]["type"]), "harmon-release")


def mar_type(mar: MARConfig) -> str | None:
    """The ``mar.type`` whose sizes ``mar`` has, or None."""
    sizes = tuple(getattr(mar, k) for k in _MAR_SIZE_KEYS)
    for kind, (dim, depth, heads) in MAR_TYPES.items():
        if sizes == (dim, depth, heads) * 2 and all(getattr(mar, k) == v for k, v in _MAR_FIXED.items()):
            return kind
    return None


def release_config(config: HarmonConfig, dtype: str) -> dict[str, Any]:
    """The release's ``config.json`` for ``config``, weights stored in ``dtype`` (e.g. ``"bfloat16"``).

    Raises :class:`ReleaseConfigError` for a model that the release's code cannot build (another VAE, VAE
    scale or MAR size, or an LLM field transformers 4.45 would not read).
    """
    problems = []
    if config.vae != RELEASE_VAE:
        problems.append(f"its VAE is not KL-16 (embed_dim 16, ch 128, ch_mult (1, 1, 2, 2, 4)): {config.vae}")
    if config.vae_scale != RELEASE_VAE_SCALE:
        problems.append(f"its vae_scale is {config.vae_scale}, not {RELEASE_VAE_SCALE}")
    kind = mar_type(config.mar)
    if kind is None:
        problems.append("its MAR sizes are none of " + ", ".join(
            f"{k} (dim {d}, depth {n}, heads {h})" for k, (d, n, h) in MAR_TYPES.items()))
    foreign = sorted(k for k in config.llm if k not in LLM_FIELDS or k in ("rope_parameters", "layer_types"))
    if foreign:
        problems.append(f"its LLM config has fields transformers {RELEASE_TRANSFORMERS} does not read: {foreign}")
    if problems:
        raise ReleaseConfigError(f"model {config.name!r} cannot be written in the release layout, whose model code "
                                 "fixes the VAE, the VAE scale and MAR's sizes: " + "; ".join(problems))
    mar = dataclasses.asdict(config.mar)
    return {
        "architectures": ["HarmonModel"],
        "auto_map": {"AutoConfig": "configuration_harmon.HarmonConfig", "AutoModel": "modeling_harmon.HarmonModel"},
        "llm": {**config.llm, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": dtype},
        "mar": {"type": kind, **{k: mar[k] for k in MAR_KWARGS}},
        "model_type": "harmon",
        "torch_dtype": dtype,
        "transformers_version": RELEASE_TRANSFORMERS,
        HARMON_KEY: {k: getattr(config, k) for k in _HARMON_FIELDS},
    }
