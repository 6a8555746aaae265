"""The run: :func:`run_batch` checks everything it was asked before any work, creates or checks
``run.json``, and draws this rank's blocks that are not done yet, writing each image and then its sidecar."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..files import check_folder_path, create_once, temp_owner, write_atomically
from ..outputs import image_metadata, png_bytes
from ..settings import GenerationSettings
from .options import BatchError, BatchOptions, Shard, shard_from_env
from .prompts import PromptRecord, load_prompts
from .work import Item, blocks_for_rank, item_done, prepare_folders, read_json, work_items, write_dpg_grids

RUN_FILE = "run.json"
RUN_FORMAT = 2  # 2: the generation settings under their own names, resolved for the model
_STALE_RUN_TMP_S = 60.0


class RunMismatchError(BatchError):
    """The output folder holds a run made with other settings."""


# -- run.json ---------------------------------------------------------------------------------------
def model_fingerprint(folder: Path) -> str:
    """sha256 of config.json and the weights file's size, first and last MiB: cheap, and tells checkpoints apart."""
    from ..checkpoint import folder_weights_path

    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    weights = folder_weights_path(folder)
    size = weights.stat().st_size
    h.update(f"{weights.name}:{size}".encode())
    chunk = 1 << 20
    with open(weights, "rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            h.update(fh.read())
    return h.hexdigest()


def prompts_digest(prompts: Sequence[PromptRecord]) -> str:
    """sha256 of the prompts' JSON objects: tells prompt files apart whatever their format."""
    text = json.dumps([p.record for p in prompts], sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_run_file(out_dir: Path, settings: dict[str, Any], info: dict[str, Any]) -> bool:
    """Create ``out_dir/run.json`` or check that it holds ``settings``, field by field; True if this call
    created it. Raises :class:`RunMismatchError` naming each field that differs."""
    path = out_dir / RUN_FILE
    data = (json.dumps({"format": RUN_FORMAT, "settings": settings, "info": info}, indent=1) + "\n").encode()
    if not path.exists() and create_once(path, data):
        return True
    saved = read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise RunMismatchError(f"{path} is not the run file of a batch run; use another out_dir")
    if saved.get("format") != RUN_FORMAT:
        raise RunMismatchError(f"{path} was written by another version of harmon (run format "
                               f"{saved.get('format')}, this one writes {RUN_FORMAT}); use another out_dir")
    old = saved["settings"]
    differ = [f"{key}: {_short(old.get(key))} -> {_short(settings.get(key))}"
              for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)]
    if differ:
        raise RunMismatchError(f"out_dir {out_dir} holds a run with other settings ({'; '.join(differ)}): "
                               "resume it with the same settings, or use another out_dir")
    return False


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 20 else text[:12] + "..."


def _remove_old_run_temps(out: Path) -> None:
    """Temporary files of run.json left by a killed run (older than any run still creating it)."""
    now = time.time()
    for name in os.listdir(out):
        if temp_owner(name) == RUN_FILE:
            try:
                if now - os.stat(out / name).st_mtime > _STALE_RUN_TMP_S:
                    os.unlink(out / name)
            except FileNotFoundError:
                pass


# -- the run ----------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    """What one rank did: images written and skipped (already complete), of ``mine`` assigned to it."""

    rank: int
    world_size: int
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    mine: int = 0
    total: int = 0
    out_dir: Path | None = None

    def line(self) -> str:
        """The summary as one line."""
        return (f"rank {self.rank}/{self.world_size}: {len(self.written)} done, {len(self.skipped)} skipped, "
                f"{self.mine} total for this rank ({self.total} images in the run) in {self.out_dir}")


@dataclass(frozen=True)
class _Run:
    """What the steps of one rank's run share: ``settings`` resolved for the model, ``record`` the run's
    settings as run.json and every sidecar hold them."""

    records: list[PromptRecord]
    folder: Path
    settings: GenerationSettings
    options: BatchOptions
    shard: Shard
    record: dict[str, Any]
    emit: Callable[[str], None]


def _records(prompts: str | os.PathLike | Sequence[PromptRecord], benchmark: str | None) -> list[PromptRecord]:
    records = list(prompts) if not isinstance(prompts, (str, os.PathLike)) else load_prompts(prompts, benchmark)
    if not records:
        raise BatchError("no prompts given")
    if [p.index for p in records] != list(range(len(records))):
        raise BatchError("prompt records must be numbered 0, 1, 2, ... in order")
    return records


def _check_prompt_lengths(records: Sequence[PromptRecord], folder: Path, config, grid: tuple[int, int]) -> None:
    """Every prompt fits the LLM's positions beside the image: checked before run.json is written, so that a
    corrected prompts file may go into the same folder."""
    from ..hub import load_tokenizer
    from ..pipelines.text_to_image import check_positions
    from ..processing import GENERATION_PREFIX, chat_prompt

    tokenizer = load_tokenizer(folder, int(config.llm["vocab_size"]))
    for record in records:
        tokens = len(tokenizer.encode(chat_prompt(GENERATION_PREFIX + record.prompt.strip()), add_special_tokens=False))
        try:
            check_positions(config, tokens, grid)
        except ValueError as err:
            raise BatchError(f"prompt {record.index}: {err}") from None


def _device_for(name: str, shard: Shard):
    import torch

    from ..hub import pick_device

    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if shard.local_rank >= count:
            raise BatchError(f"LOCAL_RANK {shard.local_rank} has no GPU: only {count} visible")
        device = torch.device("cuda", shard.local_rank)
    return device


def _print_line(text: str) -> None:
    """One line in one write: lines of several ranks sharing a pipe (torchrun) never interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _run_record(records: Sequence[PromptRecord], folder: Path, config, settings: GenerationSettings,
                options: BatchOptions, dtype) -> dict[str, Any]:
    """The settings of the run (run.json's ``settings``): what must not change between its parts."""
    return {"model": config.name, "model_fingerprint": model_fingerprint(folder), "prompts": len(records),
            "prompts_sha256": prompts_digest(records), "seed": options.seed, "num_images": options.num_images,
            "layout": options.benchmark or "default", **settings.to_dict(), "dtype": str(dtype).split(".")[-1],
            **({"quantization": options.quantize} if options.quantize else {})}  # absent: runs made before it


def _run_info(folder: Path) -> dict[str, Any]:
    """run.json's ``info``: where the run came from (not compared between runs)."""
    from .. import __version__
    from ..checkpoint import folder_weights_path

    return {"model_path": str(Path(folder).resolve()), "weights": folder_weights_path(folder).name,
            "harmon_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seeds": "image k of prompt i uses seed + i * num_images + k"}


def run_batch(prompts: str | os.PathLike | Sequence[PromptRecord], model: str | os.PathLike, out_dir: str | os.PathLike,
              settings: GenerationSettings | None = None, options: BatchOptions | None = None, *,
              shard: Shard | None = None, log: Callable[[str], None] | None = None) -> BatchSummary:
    """Generate this rank's share of the images of ``prompts`` into ``out_dir`` (see :mod:`harmon.batch`).

    ``prompts``: a prompts file (a benchmark's: see :func:`~harmon.batch.load_prompts`) or its records;
    ``model``: a model folder (or a Hugging Face repo id); ``settings``: how each image is drawn (default: the
    original's), resolved for the model before any work; ``options``: seeds, images per prompt, batch size,
    layout, device (default :class:`BatchOptions`). ``shard`` defaults to :func:`shard_from_env`. ``log``
    receives one line per written image (its path) and the summary line (default: print to stdout).
    """
    from ..checkpoint import read_config
    from ..hub import pick_dtype, resolve_model_folder

    options = options if options is not None else BatchOptions()
    records = _records(prompts, options.benchmark)
    folder = resolve_model_folder(model)
    config = read_config(folder)
    settings = (settings if settings is not None else GenerationSettings()).resolve(config)
    _check_prompt_lengths(records, folder, config, settings.grid(config.mar.vae_stride))
    shard = shard if shard is not None else shard_from_env()
    device = _device_for(options.device, shard)
    dtype = pick_dtype(options.dtype, device)
    out = check_folder_path(out_dir, "the output folder")
    run = _Run(records, folder, settings, options, shard, _run_record(records, folder, config, settings, options, dtype),
               log if log is not None else _print_line)
    out.mkdir(parents=True, exist_ok=True)
    check_run_file(out, run.record, _run_info(folder))
    if shard.rank == 0:
        _remove_old_run_temps(out)

    items = work_items(records, out, seed=options.seed, num_images=options.num_images, benchmark=options.benchmark)
    mine = blocks_for_rank(items, options.batch_size, shard)
    summary = BatchSummary(shard.rank, shard.world_size, mine=sum(len(b) for b in mine), total=len(items),
                           out_dir=out)
    prepare_folders(out, records, mine, options.benchmark)
    todo: list[tuple[list[Item], list[Item]]] = []
    for block in mine:
        pending = [it for it in block if not item_done(it, records[it.index].prompt, run.record)]
        summary.skipped.extend(it.png for it in block if it not in pending)
        if pending:
            todo.append((block, pending))
    if todo:
        _generate(run, todo, summary, device, dtype)
    if options.benchmark == "dpg":
        write_dpg_grids(out, records, mine, run.record, set(summary.written), run.emit)
    run.emit(summary.line())
    return summary


def _generate(run: _Run, todo: list[tuple[list[Item], list[Item]]], summary: BatchSummary, device, dtype) -> None:
    """Draw each block whole (so that its images are the same bits as in an uninterrupted run) and write
    its pending items."""
    from tqdm.auto import tqdm

    from ..hub import load_pretrained
    from ..pipelines import TextToImagePipeline

    model, tokenizer = load_pretrained(run.folder, device=device, dtype=dtype, quantize=run.options.quantize)
    if run.options.compile:
        model.compile_for_sampling()
    pipe = TextToImagePipeline(model, tokenizer)
    bar = tqdm(total=sum(len(p) for _, p in todo), desc=f"rank {run.shard.rank} images", unit="img",
               disable=not run.options.progress or run.shard.rank != 0, file=sys.stderr)
    try:
        for block, pending in todo:
            result = pipe([run.records[it.index].prompt for it in block], run.settings,
                          seeds=[it.seed for it in block], progress=False)
            drawn = {it.number: i for i, it in enumerate(block)}
            for it in pending:
                i = drawn[it.number]
                _write_item(run, it, result.images[i], result.settings, model, result.details(i))
                summary.written.append(it.png)
                run.emit(str(it.png))
                bar.update(1)
    finally:
        bar.close()


def _write_item(run: _Run, it: Item, image, settings: GenerationSettings, model, details: dict[str, Any]) -> None:
    """The PNG of ``it`` (with its metadata; ``details``: how self-check chose the image), then its sidecar: the
    record that the image is done."""
    from .. import __version__

    prompt = run.records[it.index].prompt
    model_path = str(Path(run.folder).resolve())
    text = image_metadata(prompt, it.seed, settings, model, model_path,
                          extra={"index": it.index, "sample": it.k, **details})
    write_atomically(it.png, png_bytes(image, text))
    meta = {"index": it.index, "sample": it.k, "seed": it.seed, "prompt": prompt,
            "file": os.path.relpath(it.png, it.meta.parent), "metadata": run.records[it.index].record,
            "settings": run.record, "model_path": model_path, "harmon_version": __version__,
            "rank": run.shard.rank, "world_size": run.shard.world_size}
    write_atomically(it.meta, json.dumps(meta, indent=1) + "\n")
