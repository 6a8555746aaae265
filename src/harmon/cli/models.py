"""Model folders: ``harmon info``, ``harmon convert``, ``harmon export`` and ``harmon parity``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import (CheckpointError, config_from_reference, folder_weights_path, load_original, read_config,
                          read_json, stored_dtype)
from ..saving import save_model, save_original, save_release
from ..config import PRESETS, HarmonConfig
from ..errors import InputError
from ..files import check_folder_path
from ..hub import DTYPES, QWEN2_5_VOCAB_SIZE, default_tokenizer, load_pretrained, resolve_model_folder
from ..inspect_folder import folder_info
from ..parity import run_parity
from ..release import release_config
from ..tokenizer import save_tokenizer
from .common import add_command


def add_parsers(subparsers) -> None:
    """Add ``info``, ``convert``, ``export`` and ``parity``."""
    p = add_command(subparsers, "info", cmd_info, "show what a model folder holds (without loading it)",
                    "Config name, layout, parameters per part, stored dtype and tokenizer of a model folder, read "
                    "from config.json and the weights' headers.")
    p.add_argument("folder", metavar="DIR", help="model folder (any layout) or Hugging Face repo id")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add_command(subparsers, "convert", cmd_convert, "released .pth + kl16.ckpt -> a self-contained model folder",
                    "Load the released layout (harmon_*.pth + kl16.ckpt) and write DIR with config.json, "
                    "model.safetensors and the tokenizer.")
    p.add_argument("--pth", required=True, metavar="FILE", help="harmon_0.5b.pth or harmon_1.5b.pth")
    p.add_argument("--vae", required=True, metavar="FILE", help="kl16.ckpt")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--qwen", metavar="DIR", default=None,
                   help="Qwen2.5-Instruct folder: LLM config and tokenizer from it (default: the preset inferred "
                   "from the weights and the Qwen2.5 tokenizer rebuilt offline)")
    p.add_argument("--config", metavar="NAME|FILE", default=None,
                   help="preset name or config.json to use instead of inferring the preset (e.g. test models)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the stored weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")

    p = add_command(subparsers, "export", cmd_export,
                    "write a model in our layout, the Hugging Face release's, or the .pth layout",
                    "Load MODEL (a folder in any layout, or a hub id) and write it to DIR: 'release' as the official "
                    "Hugging Face release (config.json with llm + mar, model.safetensors, tokenizer; loadable by the "
                    "release's remote code and transformers 4.45), 'ours' as harmon writes model folders, "
                    "'original' as the released harmon_*.pth + kl16.ckpt.")
    p.add_argument("model", metavar="MODEL", help="model folder (ours, the release's, a fixture) or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--layout", choices=["release", "ours", "original"], default="release", help="what to write")
    p.add_argument("--dtype", choices=["keep", "float32", "bfloat16", "float16"], default="keep",
                   help="dtype of the written weights (keep: as stored, so that a round trip is bit for bit)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")

    p = add_command(subparsers, "parity", cmd_parity, "reproduce a reference fixture folder and report errors per case")
    p.add_argument("folder", help="fixture folder with config.json, weights.safetensors and cases/")
    p.add_argument("--case", action="append", help="run only this case (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every tensor's errors")


# -- info -------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Describe a model folder without loading the model."""
    info = folder_info(resolve_model_folder(args.folder))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"folder:    {info['folder']}")
    print(f"config:    {info['config']}")
    print(f"layout:    {info['layout']}")
    print(f"weights:   {info['weights']} ({', '.join(info['dtypes'])})")
    print("parameters:")
    for part, n in info["parameters"].items():
        print(f"  {part:<9} {n:>15,}")
    if info["other"]:
        print(f"  {'other':<9} {info['other']:>15,}")
    print(f"  {'total':<9} {info['total']:>15,}")
    if info["tokenizer"]:
        print(f"tokenizer: present ({info['tokenizer']})")
    else:
        rebuilt = "Qwen2.5, rebuilt offline" if info["vocab_size"] >= QWEN2_5_VOCAB_SIZE else "byte-level"
        print(f"tokenizer: absent (the {rebuilt} tokenizer is used)")
    return 0


# -- convert and export -----------------------------------------------------------------------------
def _convert_config(spec: str | None) -> HarmonConfig | None:
    """``--config``: a preset name, a model folder or a config.json (ours or a reference fixture's)."""
    if spec is None:
        return None
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec)
    if path.is_dir():
        return read_config(path)
    if not path.is_file():
        raise InputError(f"--config is neither a preset ({', '.join(PRESETS)}) nor a config.json: {spec}")
    data = read_json(path)
    try:
        return config_from_reference(data) if "mar_kwargs" in data else HarmonConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"cannot read {path} as a Harmon config: {err}") from err


def _output_folder(path: str, force: bool) -> Path:
    """``--out``: a folder that does not exist, is empty, or may be overwritten (``--force``)."""
    out = check_folder_path(path, "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out folder {out} is not empty (use --force to overwrite)")
    return out


def _qwen_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # transformers raises many types for a folder without a usable tokenizer
        raise InputError(f"cannot load the tokenizer of --qwen {folder}: {err}") from err


def cmd_convert(args: argparse.Namespace) -> int:
    """Released harmon_*.pth + kl16.ckpt -> a self-contained model folder (config, weights, tokenizer)."""
    for flag, value in (("--pth", args.pth), ("--vae", args.vae)):
        if not Path(value).is_file():
            raise InputError(f"{flag} file not found: {value}")
    if args.qwen is not None and not Path(args.qwen).is_dir():
        raise InputError(f"--qwen folder not found: {args.qwen}")
    out = _output_folder(args.out, args.force)
    config = _convert_config(args.config)
    model = load_original(args.pth, args.vae, config=config, qwen_dir=args.qwen, dtype=DTYPES[args.dtype])
    if args.qwen is not None:
        tokenizer = _qwen_tokenizer(args.qwen)
    else:
        tokenizer = default_tokenizer(int(model.config.llm["vocab_size"]))
    save_model(model, out)
    save_tokenizer(tokenizer, out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.config.name}, {n:,} parameters, {args.dtype}, with tokenizer)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model (any layout, or a hub id) in our layout, the Hugging Face release's, or the .pth layout."""
    folder = resolve_model_folder(args.model)
    if args.layout == "release":
        release_config(read_config(folder), "float32")  # before the load: a model the release cannot hold
    out = _output_folder(args.out, args.force)
    dtype = DTYPES[args.dtype] if args.dtype != "keep" else stored_dtype(folder_weights_path(folder))
    model, tokenizer = load_pretrained(folder, dtype=dtype)  # cast while read: never a float32 copy of 16-bit
    if args.layout == "original":
        out.mkdir(parents=True, exist_ok=True)
        stem = model.config.name.replace("-", "_") if model.config.name.startswith("harmon") else "harmon"
        save_original(model, out / f"{stem}.pth", out / "kl16.ckpt")
        written = f"{stem}.pth + kl16.ckpt (no tokenizer: the original code takes Qwen2.5's)"
    else:
        (save_release if args.layout == "release" else save_model)(model, out, dtype=dtype)
        save_tokenizer(tokenizer, out)
        written = "config.json, model.safetensors, tokenizer"
    print(f"wrote {out}: {written}; {model.config.name}, {str(dtype).removeprefix('torch.')}, {args.layout} layout")
    if args.layout == "release":
        print("to load it with the release's remote code (AutoModel, trust_remote_code=True), copy the release's "
              "configuration_harmon.py, modeling_harmon.py and their modules into it", file=sys.stderr)
    return 0


# -- parity -----------------------------------------------------------------------------------------
def cmd_parity(args: argparse.Namespace) -> int:
    """Run every case of a reference fixture folder; exit 1 if any fails."""
    if not (Path(args.folder) / "config.json").is_file():
        raise InputError(f"{args.folder} is not a reference fixture folder: it has no config.json")
    results = run_parity(args.folder, verbose=args.verbose, cases=args.case or None)
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0
