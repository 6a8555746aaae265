"""Many prompts -> many images: resumable, shardable across processes, in the layouts of GenEval, DPG-Bench
and WISE on request (what each benchmark's official scorer reads).

``harmon batch PROMPTS_FILE --model DIR --out-dir OUT`` calls :func:`run_batch`.

Prompts (:func:`load_prompts`)
    a JSON list of strings or of objects with a ``"prompt"`` (other keys, e.g. GenEval's
    ``"tag"`` and ``"include"``, are kept), JSONL (one object or JSON string per line, blank
    lines skipped), or ``.txt`` (one prompt per non-blank line). ``.json`` files are read as
    JSON, ``.jsonl`` as JSONL, anything else by its first character (``[`` -> JSON list).
    The benchmarks' own files: GenEval's ``evaluation_metadata.jsonl``; DPG-Bench's folder
    ``prompts/`` of ``<item_id>.txt`` files (one prompt each, in name order); a WISE JSON file
    (objects with ``"Prompt"`` and ``"prompt_id"``).

Work items and seeds
    Prompt ``i`` (0-based, in file order) gets ``K = num_images`` images; image ``k`` of it is
    work item ``j = i * K + k`` and uses seed ``S + j`` (``S = seed``). Items are cut into
    blocks of ``batch_size`` consecutive items, and block ``b`` belongs to rank
    ``b % world_size``. Each block is always generated as one batch (also when resuming a
    partly written block), so with the same ``batch_size`` every image is bit-identical
    whatever the number of ranks or interruptions. Another ``batch_size`` changes images
    only by float rounding (batch-shaped kernels; at most 1/255 on a few pixels seen on CPU).

Layout
    default:   ``OUT/<i:05d>_<k:02d>.png`` + ``OUT/<i:05d>_<k:02d>.json``
    GenEval:   ``OUT/<i:05d>/metadata.jsonl`` (the prompt's original JSON object, one line),
               ``OUT/<i:05d>/samples/<k:04d>.png``, ``OUT/<i:05d>/meta/<k:04d>.json``
    DPG-Bench: ``OUT/images/<item_id>.png``: the 2x2 grid of the prompt's 4 images (image k at
               column k % 2, row k // 2), the only files there, as ``compute_dpg_bench.py
               --image-root-path OUT/images --pic-num 4 --resolution SIZE`` reads them; the images
               themselves in ``OUT/samples/<item_id>_<k>.png`` + ``OUT/meta/<item_id>_<k>.json``
    WISE:      ``OUT/images/<prompt_id>.png`` (one image per prompt, as ``gpt_eval.py --image_dir
               OUT/images`` reads it) + ``OUT/meta/<prompt_id>.json``
    plus ``OUT/run.json``: the settings of the run. The PNGs carry prompt, seed and
    settings in their text chunks, as ``harmon generate`` writes them.

    Per-image metadata is one sidecar JSON per image rather than one shared ``metadata.jsonl``:
    ranks never write to the same file (no interleaved or torn appends, no locks, works on
    network file systems), each record is written whole with ``os.replace``, and a record
    exists exactly when its image was finished, so resuming needs no log replay or repair.

Atomicity and resume
    Every file is written to ``.<name>.<random>.tmp`` in its own folder, flushed, fsync'ed and
    ``os.replace``'d onto its name. The PNG is written first, its sidecar second: the sidecar is
    the commit record. An image counts as done when its sidecar parses and names the same
    prompt, seed and run settings, and its PNG exists and ends with PNG's ``IEND`` chunk; everything
    else is (re)generated. A killed run so loses only the images in flight; the stale temporary files
    it leaves are removed by whichever rank owns those images in the next run.
    ``run.json`` is created once (no-clobber, via a hard link) and compared on every later run:
    other settings (model, prompts, seed, images per prompt, size, guidance, steps, fast mode,
    VAE tiles, dtype, layout) are refused with :class:`RunMismatchError` instead of mixing
    outputs. The batch size, device and number of ranks are not settings and may change between runs.

Sharding
    Under ``torchrun --nproc_per_node N`` the ranks read ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` from the environment (without them: rank 0 of 1). No collectives are
    needed, so ``torch.distributed`` is never initialised. On CUDA rank r uses
    ``cuda:LOCAL_RANK``. Run one command (one set of ranks) per out-dir at a time.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .files import check_folder_path, file_mode
from .validation import check_guidance, check_prompt

PathLike = str | os.PathLike
RUN_FILE = "run.json"
RUN_FORMAT = 1
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last 12 bytes of every complete PNG file
_STALE_RUN_TMP_S = 60.0


class BatchError(ValueError):
    """A problem with what was asked of a batch run (reported by the command line as one line, exit 2)."""


class PromptFileError(BatchError):
    """The prompts file cannot be read or holds something that is not a usable prompt."""


class RunMismatchError(BatchError):
    """The out-dir holds a run made with other settings."""


# -- prompts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptRecord:
    """One prompt: its 0-based index, text, the original JSON object (strings become ``{"prompt": s}``)
    and where it was in the file (``line`` for JSONL and text files, else None)."""

    index: int
    prompt: str
    record: dict[str, Any]
    line: int | None = None
    name: str | None = None  # the benchmark's name of the prompt (DPG-Bench item id, WISE prompt_id)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _record(value: Any, index: int, where: str, source: str, line: int | None = None, *, key: str = "prompt",
            name: str | None = None) -> PromptRecord:
    if isinstance(value, str):
        prompt, record = value, {key: value}
    elif isinstance(value, dict):
        if key not in value:
            raise PromptFileError(f"{source}: prompt {index} ({where}) has no \"{key}\" key "
                                  f"(keys: {', '.join(map(str, value)) or 'none'})")
        prompt, record = value[key], dict(value)
        if not isinstance(prompt, str):
            raise PromptFileError(f"{source}: prompt {index} ({where}): \"prompt\" must be a string, "
                                  f"got {_kind(prompt)}")
    else:
        raise PromptFileError(f"{source}: prompt {index} ({where}) is {_kind(value)}; expected a string or an "
                              "object with a \"prompt\" key")
    try:
        check_prompt(prompt, f"{source}: prompt {index} ({where})")
    except ValueError as err:
        raise PromptFileError(str(err)) from None
    return PromptRecord(index, prompt, record, line, name)


def parse_prompts(text: str, *, fmt: str = "auto", source: str = "prompts", key: str = "prompt") -> list[PromptRecord]:
    """Prompts from the text of a prompts file; ``fmt`` is ``json``, ``jsonl``, ``txt`` or ``auto``; objects
    hold the prompt under ``key``.

    Raises :class:`PromptFileError` naming the line (JSONL, text), the line and column (JSON
    syntax) or the entry (JSON list) at fault.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if fmt == "auto":
        fmt = "json" if text.lstrip().startswith("[") else "jsonl"
    records: list[PromptRecord] = []
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{source}: not valid JSON at line {err.lineno}, column {err.colno} "
                                  f"(character {err.pos}): {err.msg}") from None
        except RecursionError:
            raise PromptFileError(f"{source}: JSON nested too deeply to read") from None
        if not isinstance(data, list):
            raise PromptFileError(f"{source}: expected a JSON list of prompts (strings or objects with a "
                                  f"\"prompt\" key), got {_kind(data)}")
        records = [_record(value, i, f"entry {i}", source, key=key) for i, value in enumerate(data)]
    elif fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{source}: line {number} is not valid JSON ({err.msg} at column "
                                      f"{err.colno})") from None
            except RecursionError:
                raise PromptFileError(f"{source}: line {number} is JSON nested too deeply to read") from None
            records.append(_record(value, len(records), f"line {number}", source, number, key=key))
    elif fmt == "txt":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_record(line.strip(), len(records), f"line {number}", source, number))
    else:
        raise ValueError(f"unknown prompts format {fmt!r}: use json, jsonl, txt or auto")
    if not records:
        raise PromptFileError(f"{source}: no prompts in the file")
    return records


def load_prompts(path: PathLike, benchmark: str | None = None) -> list[PromptRecord]:
    """Read a prompts file (``.json``, ``.jsonl``, ``.txt``; other names are sniffed), or a benchmark's:
    ``benchmark="dpg"`` reads DPG-Bench's folder of ``.txt`` prompts, ``"wise"`` a WISE JSON file."""
    path = Path(path)
    if benchmark == "dpg":
        records = _dpg_prompts(path)
    elif benchmark == "wise":
        records = _wise_prompts(path, _read_text(path))
    else:
        suffix = path.suffix.lower()
        fmt = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}.get(suffix, "auto")
        return parse_prompts(_read_text(path), fmt=fmt, source=str(path))
    _check_names(records, str(path))
    return records


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise PromptFileError(f"prompts file not found: {path}" if not path.exists()
                              else f"prompts file is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _dpg_prompts(folder: Path) -> list[PromptRecord]:
    """DPG-Bench's ``prompts/`` folder: one ``<item_id>.txt`` per prompt, taken in name order."""
    if not folder.is_dir():
        raise PromptFileError(f"DPG-Bench prompts must be its folder of <item_id>.txt files (dpg_bench/prompts), "
                              f"got {folder}")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise PromptFileError(f"{folder}: no .txt prompt files")
    return [_record(_read_text(f).strip(), i, f.name, str(folder), name=f.stem) for i, f in enumerate(files)]


def _wise_prompts(path: Path, text: str) -> list[PromptRecord]:
    """A WISE prompts file: a JSON list of objects with ``"Prompt"`` and ``"prompt_id"``."""
    data = parse_prompts(text, fmt="json", source=str(path), key="Prompt")
    records = []
    for r in data:
        if "prompt_id" not in r.record:
            raise PromptFileError(f"{path}: prompt {r.index} (entry {r.index}) has no \"prompt_id\" key")
        records.append(PromptRecord(r.index, r.prompt, r.record, r.line, str(r.record["prompt_id"])))
    return records


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_names(records: Sequence[PromptRecord], source: str) -> None:
    """Benchmark names become file names: plain, and each used once."""
    seen: dict[str, int] = {}
    for r in records:
        if not _SAFE_NAME.match(r.name or ""):
            raise PromptFileError(f"{source}: prompt {r.index} is named {r.name!r}, which cannot be a file name "
                                  "(letters, digits, '.', '_', '-')")
        if r.name in seen:
            raise PromptFileError(f"{source}: prompts {seen[r.name]} and {r.index} are both named {r.name!r}")
        seen[r.name] = r.index


# -- sharding ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def shard_from_env(environ: Mapping[str, str] | None = None) -> Shard:
    """This process's share from torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (default: 0 of 1)."""
    env = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        raw = env.get(name)
        if raw is None or raw == "":
            values[name] = default
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise BatchError(f"environment variable {name}={raw!r} is not an integer") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    if world < 1 or not 0 <= rank < world or local < 0:
        raise BatchError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Shard(rank, world, local)


# -- work items and paths ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """Image ``k`` of prompt ``index``; ``number`` = index * K + k; seed = S + number."""

    index: int
    k: int
    number: int
    seed: int
    png: Path
    meta: Path


BENCHMARKS = ("geneval", "dpg", "wise")


def item_paths(out_dir: Path, prompt: PromptRecord, k: int, benchmark: str | None) -> tuple[Path, Path]:
    """(png, sidecar json) of image ``k`` of ``prompt`` in the layout of ``benchmark`` (None: ours)."""
    i = prompt.index
    if benchmark == "geneval":
        folder = out_dir / f"{i:05d}"
        return folder / "samples" / f"{k:04d}.png", folder / "meta" / f"{k:04d}.json"
    if benchmark == "dpg":
        return out_dir / "samples" / f"{prompt.name}_{k}.png", out_dir / "meta" / f"{prompt.name}_{k}.json"
    if benchmark == "wise":
        return out_dir / "images" / f"{prompt.name}.png", out_dir / "meta" / f"{prompt.name}.json"
    return out_dir / f"{i:05d}_{k:02d}.png", out_dir / f"{i:05d}_{k:02d}.json"


def dpg_grid_path(out_dir: Path, prompt: PromptRecord) -> Path:
    """Where DPG-Bench's scorer reads the 2x2 grid of a prompt's four images."""
    return out_dir / "images" / f"{prompt.name}.png"


def check_benchmark(benchmark: str | None, num_images: int, batch_size: int) -> None:
    """The images per prompt and batch size a benchmark's layout needs."""
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise BatchError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}")
    if benchmark == "dpg" and (num_images != 4 or batch_size % 4):
        raise BatchError("DPG-Bench scores a 2x2 grid of 4 images per prompt: use 4 images per prompt and a batch "
                         f"size that is a multiple of 4 (got {num_images} and {batch_size})")
    if benchmark == "wise" and num_images != 1:
        raise BatchError(f"WISE scores one image per prompt (<prompt_id>.png): use 1 image per prompt, got {num_images}")


def work_items(prompts: Sequence[PromptRecord], out_dir: Path, *, seed: int, num_images: int,
               benchmark: str | None = None) -> list[Item]:
    items = []
    for p in prompts:
        for k in range(num_images):
            number = p.index * num_images + k
            items.append(Item(p.index, k, number, seed + number, *item_paths(out_dir, p, k, benchmark)))
    return items


def blocks_for_rank(items: Sequence[Item], batch_size: int, shard: Shard) -> list[list[Item]]:
    """This rank's blocks: block b = items[b*B:(b+1)*B] belongs to rank b % world_size."""
    blocks = [list(items[s:s + batch_size]) for s in range(0, len(items), batch_size)]
    return [block for b, block in enumerate(blocks) if b % shard.world_size == shard.rank]


# -- atomic files -----------------------------------------------------------------------------------
def _temp_for(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    except OSError:
        pass
    return fd, tmp


def _written_temp(path: Path, data: bytes) -> str:
    """A temporary file beside ``path`` holding ``data``, flushed to disk; its name."""
    fd, tmp = _temp_for(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: a temporary file in the same folder, fsync, then ``os.replace``."""
    tmp = _written_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (never a partial file); True if this call created it."""
    tmp = _written_temp(path, data)
    try:
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists
            return True
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
            return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _temp_owner(name: str) -> str | None:
    """The final file name a temporary file ``.<name>.<random>.tmp`` was for, else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    stem = name[1:-len(".tmp")]
    return stem.rsplit(".", 1)[0] if "." in stem else None


def remove_stale_temps(folder: Path, owned: set[str]) -> int:
    """Delete temporary files in ``folder`` left for the names in ``owned`` (by a killed run)."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if _temp_owner(name) in owned:
            try:
                os.unlink(folder / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def png_complete(path: Path) -> bool:
    """Whether ``path`` is a whole PNG file (signature and the final IEND chunk), without decoding it."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            fh.seek(-len(_PNG_END), os.SEEK_END)
            return fh.read() == _PNG_END
    except OSError:
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def item_done(item: Item, prompt: str, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether the image of ``item`` was finished: its sidecar names this prompt, seed (and ``settings``, if
    given), and its PNG is whole."""
    meta = _read_json(item.meta)
    return (isinstance(meta, dict) and meta.get("seed") == item.seed and meta.get("prompt") == prompt
            and meta.get("index") == item.index and meta.get("sample") == item.k
            and (settings is None or meta.get("settings") == settings) and png_complete(item.png))


# -- settings ---------------------------------------------------------------------------------------
def model_fingerprint(folder: Path) -> str:
    """sha256 of config.json and the weights file's size, first and last MiB: cheap, and tells checkpoints apart."""
    from .checkpoint import folder_weights_path

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
    text = json.dumps([p.record for p in prompts], sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_run_file(out_dir: Path, settings: dict[str, Any], info: dict[str, Any]) -> bool:
    """Create ``out_dir/run.json`` or check that it holds ``settings``; True if this call created it."""
    path = out_dir / RUN_FILE
    data = (json.dumps({"format": RUN_FORMAT, "settings": settings, "info": info}, indent=1) + "\n").encode()
    created = False
    if not path.exists():
        created = create_once(path, data)
    if created:
        return True
    saved = _read_json(path)
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise RunMismatchError(f"{path} is not a run file of `harmon batch`; use another --out-dir")
    old = saved["settings"]
    differ = [f"{key}: {_short(old.get(key))} -> {_short(settings.get(key))}"
              for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)]
    if differ:
        raise RunMismatchError(f"--out-dir {out_dir} holds a run with other settings ({'; '.join(differ)}): "
                               "resume it with the same options, or use another --out-dir")
    return False


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 20 else text[:12] + "..."


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
        return (f"rank {self.rank}/{self.world_size}: {len(self.written)} done, {len(self.skipped)} skipped, "
                f"{self.mine} total for this rank ({self.total} images in the run) in {self.out_dir}")


def _check_options(num_images, batch_size, seed, cfg, cfg_schedule, temperature, num_iter, num_steps,
                   vae_tile) -> None:
    checks = [
        (isinstance(num_images, int) and num_images >= 1, f"--num-images must be >= 1, got {num_images}"),
        (isinstance(batch_size, int) and batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
        (isinstance(seed, int) and seed >= 0, f"--seed must be >= 0, got {seed}"),
        (isinstance(num_iter, int) and num_iter >= 1, f"--num-iter must be >= 1, got {num_iter}"),
        (num_steps is None or (str(num_steps).isdigit() and 2 <= int(num_steps) <= 1000),
         f"--num-steps must be in 2..1000, got {num_steps}"),
        (vae_tile is None or (isinstance(vae_tile, int) and vae_tile >= 2),
         f"--vae-tile must be at least 2 latent cells, got {vae_tile}"),
    ]
    for ok, message in checks:
        if not ok:
            raise BatchError(message)
    try:
        check_guidance(cfg, cfg_schedule, temperature)
    except ValueError as err:
        raise BatchError(str(err)) from None


def _check_prompt_lengths(records: Sequence[PromptRecord], folder: Path, config, grid: tuple[int, int]) -> None:
    """Every prompt fits the LLM's positions beside the image: checked before run.json is written, so that a
    corrected prompts file may go into the same folder."""
    from .hub import load_tokenizer
    from .pipelines.text_to_image import check_positions
    from .processing import GENERATION_PREFIX, chat_prompt

    tokenizer = load_tokenizer(folder, int(config.llm["vocab_size"]))
    for record in records:
        tokens = len(tokenizer.encode(chat_prompt(GENERATION_PREFIX + record.prompt.strip()), add_special_tokens=False))
        try:
            check_positions(config, tokens, grid)
        except ValueError as err:
            raise BatchError(f"prompt {record.index}: {err}") from None


def _device_for(name: str, shard: Shard):
    import torch

    from .hub import pick_device

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


def run_batch(prompts: PathLike | Sequence[PromptRecord], model: PathLike, out_dir: PathLike, *, seed: int = 0,
              num_images: int = 1, batch_size: int = 4, benchmark: str | None = None, cfg: float = 3.0,
              cfg_schedule: str = "constant", temperature: float = 1.0, num_iter: int | None = None,
              num_steps: int | None = None, fast: bool = False, height: int | None = None, width: int | None = None,
              vae_tile: int | None = None, device: str = "auto", dtype: str = "auto", compile: bool = False,
              shard: Shard | None = None, progress: bool = True, log: Callable[[str], None] | None = None
              ) -> BatchSummary:
    """Generate this rank's share of the images of ``prompts`` into ``out_dir`` (see the module docstring).

    ``prompts``: a prompts file (a benchmark's: see :func:`load_prompts`) or :func:`load_prompts`'s records;
    ``model``: a model folder (or a Hugging Face repo id); ``benchmark``: one of :data:`BENCHMARKS`, whose
    official scorer reads the layout written (None: ours). ``fast`` and ``vae_tile`` mean what they mean to
    :class:`~harmon.pipelines.TextToImagePipeline`; ``compile`` calls
    :meth:`~harmon.models.harmon.Harmon.compile_for_sampling` (like ``batch_size``, not a setting of the
    run: it changes outputs only by float rounding). ``shard`` defaults to :func:`shard_from_env`. ``log``
    receives one line per written image (its path) and the summary line (default: print to stdout).
    """
    from .checkpoint import folder_weights_path, read_config
    from .hub import pick_dtype, resolve_model_folder
    from .pipelines.text_to_image import iteration_schedule
    from .processing import check_image_size

    emit = log if log is not None else _print_line
    records = list(prompts) if not isinstance(prompts, (str, os.PathLike)) else load_prompts(prompts, benchmark)
    if not records:
        raise BatchError("no prompts given")
    if [p.index for p in records] != list(range(len(records))):
        raise BatchError("prompt records must be numbered 0, 1, 2, ... in order")
    folder = resolve_model_folder(model)
    config = read_config(folder)
    height = config.image_size if height is None else height
    width = height if width is None else width
    num_iter = iteration_schedule(config.num_iter, num_iter, num_steps, fast)[0]  # steps: the pipeline's
    _check_options(num_images, batch_size, seed, cfg, cfg_schedule, temperature, num_iter, num_steps, vae_tile)
    check_benchmark(benchmark, num_images, batch_size)
    _check_prompt_lengths(records, folder, config, check_image_size(height, width, config.mar.vae_stride))
    shard = shard if shard is not None else shard_from_env()
    torch_device = _device_for(device, shard)
    torch_dtype = pick_dtype(dtype, torch_device)
    try:
        out = check_folder_path(out_dir, "the output folder")
    except ValueError as err:
        raise BatchError(str(err)) from None

    settings = {
        "model": config.name, "model_fingerprint": model_fingerprint(folder),
        "prompts": len(records), "prompts_sha256": prompts_digest(records),
        "seed": seed, "num_images": num_images, "layout": benchmark or "default",
        "height": height, "width": width, "cfg": float(cfg), "cfg_schedule": cfg_schedule,
        "temperature": float(temperature), "num_iter": num_iter, "num_steps": num_steps, "fast": bool(fast),
        "vae_tile": vae_tile, "dtype": str(torch_dtype).split(".")[-1],
    }
    from . import __version__

    info = {"model_path": str(Path(folder).resolve()), "weights": folder_weights_path(folder).name,
            "harmon_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seeds": "image k of prompt i uses seed + i * num_images + k"}
    out.mkdir(parents=True, exist_ok=True)
    check_run_file(out, settings, info)
    if shard.rank == 0:
        _remove_old_run_temps(out)

    items = work_items(records, out, seed=seed, num_images=num_images, benchmark=benchmark)
    mine = blocks_for_rank(items, batch_size, shard)
    summary = BatchSummary(shard.rank, shard.world_size, mine=sum(len(b) for b in mine), total=len(items),
                           out_dir=out)
    _prepare_folders(out, records, mine, benchmark)

    todo: list[tuple[list[Item], list[Item]]] = []
    for block in mine:
        pending = [it for it in block if not item_done(it, records[it.index].prompt, settings)]
        summary.skipped.extend(it.png for it in block if it not in pending)
        if pending:
            todo.append((block, pending))
    if todo:
        _generate(todo, records, folder, summary, emit, settings, shard, torch_device, torch_dtype, compile, progress,
                  dict(guidance_scale=float(cfg), cfg_schedule=cfg_schedule, temperature=float(temperature),
                       num_iter=num_iter, num_steps=num_steps, fast=bool(fast), height=height, width=width,
                       vae_tile=vae_tile))
    if benchmark == "dpg":
        _write_dpg_grids(out, records, mine, settings, summary, emit)
    emit(summary.line())
    return summary


def _write_dpg_grids(out: Path, records: Sequence[PromptRecord], mine: list[list[Item]], settings, summary,
                     emit) -> None:
    """DPG-Bench's 2x2 grid of each of this rank's prompts whose four images are done (image k at column
    k % 2, row k // 2), written when missing or when one of its images was drawn in this run."""
    from PIL import Image

    by_prompt: dict[int, list[Item]] = {}
    for block in mine:  # a batch size that is a multiple of 4 keeps a prompt's images in one block
        for it in block:
            by_prompt.setdefault(it.index, []).append(it)
    fresh = set(summary.written)
    for index, items in by_prompt.items():
        prompt = records[index]
        grid = dpg_grid_path(out, prompt)
        if not all(item_done(it, prompt.prompt, settings) for it in items):
            continue
        if png_complete(grid) and not fresh & {it.png for it in items}:
            continue
        tiles = []
        for it in sorted(items, key=lambda it: it.k):
            with Image.open(it.png) as tile:
                tiles.append(tile.convert("RGB"))
        w, h = tiles[0].size
        canvas = Image.new("RGB", (2 * w, 2 * h))
        for k, tile in enumerate(tiles):
            canvas.paste(tile, ((k % 2) * w, (k // 2) * h))
        text = {"prompt": prompt.prompt, "seeds": ",".join(str(it.seed) for it in items), "model": settings["model"],
                "layout": "dpg 2x2 grid"}
        write_atomic(grid, png_bytes(canvas, text))
        emit(str(grid))


def _remove_old_run_temps(out: Path) -> None:
    now = time.time()
    for name in os.listdir(out):
        if _temp_owner(name) == RUN_FILE:
            try:
                if now - os.stat(out / name).st_mtime > _STALE_RUN_TMP_S:
                    os.unlink(out / name)
            except FileNotFoundError:
                pass


def _prepare_folders(out: Path, records: Sequence[PromptRecord], mine: list[list[Item]],
                     benchmark: str | None) -> None:
    """Create this rank's folders, remove stale temporary files of its items (and DPG-Bench grids), write
    GenEval's metadata.jsonl."""
    owned: dict[Path, set[str]] = {}
    for block in mine:
        for it in block:
            owned.setdefault(it.png.parent, set()).add(it.png.name)
            owned.setdefault(it.meta.parent, set()).add(it.meta.name)
            if benchmark == "dpg":
                grid = dpg_grid_path(out, records[it.index])
                owned.setdefault(grid.parent, set()).add(grid.name)
    geneval = benchmark == "geneval"
    if geneval:
        for block in mine:
            for it in block:
                if it.k == 0:  # the owner of a prompt's first image writes its metadata.jsonl
                    owned.setdefault(it.png.parent.parent, set()).add("metadata.jsonl")
    for folder, names in owned.items():
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, names)
    if geneval:
        for folder, names in owned.items():
            if "metadata.jsonl" in names:
                record = records[int(folder.name)].record
                data = (json.dumps(record) + "\n").encode()
                path = folder / "metadata.jsonl"
                try:
                    same = path.read_bytes() == data
                except OSError:
                    same = False
                if not same:
                    write_atomic(path, data)


def _generate(todo, records, folder, summary: BatchSummary, emit, settings, shard: Shard, device, dtype,
              compile: bool, progress: bool, gen_kwargs: dict) -> None:
    from tqdm.auto import tqdm

    from . import __version__
    from .hub import load_pretrained
    from .pipelines import TextToImagePipeline

    model, tokenizer = load_pretrained(folder, device=device, dtype=dtype)
    if compile:
        model.compile_for_sampling()
    pipe = TextToImagePipeline(model, tokenizer)
    model_path = str(Path(folder).resolve())
    bar = tqdm(total=sum(len(p) for _, p in todo), desc=f"rank {shard.rank} images", unit="img",
               disable=not progress or shard.rank != 0, file=sys.stderr)
    try:
        for block, pending in todo:
            # the whole block, so that its images are the same bits as in an uninterrupted run
            result = pipe([records[it.index].prompt for it in block], seeds=[it.seed for it in block],
                          progress=False, **gen_kwargs)
            images = dict(zip((it.number for it in block), result.images))
            for it in pending:
                prompt = records[it.index].prompt
                text = image_metadata({"prompt": prompt, "seed": it.seed, "cfg": gen_kwargs["guidance_scale"],
                                       "cfg_schedule": gen_kwargs["cfg_schedule"],
                                       "temperature": gen_kwargs["temperature"], "num_iter": gen_kwargs["num_iter"],
                                       "num_steps": result.settings["num_steps"], "fast": gen_kwargs["fast"],
                                       "height": gen_kwargs["height"], "width": gen_kwargs["width"],
                                       "vae_tile": gen_kwargs["vae_tile"], "index": it.index, "sample": it.k},
                                      model, model_path)
                write_atomic(it.png, png_bytes(images[it.number], text))
                meta = {"index": it.index, "sample": it.k, "seed": it.seed, "prompt": prompt,
                        "file": os.path.relpath(it.png, it.meta.parent), "metadata": records[it.index].record,
                        "settings": settings, "model_path": model_path, "harmon_version": __version__,
                        "rank": shard.rank, "world_size": shard.world_size}
                write_atomic(it.meta, (json.dumps(meta, indent=1) + "\n").encode())
                summary.written.append(it.png)
                emit(str(it.png))
                bar.update(1)
    finally:
        bar.close()


def image_metadata(fields: Mapping[str, Any], model, model_path) -> dict[str, Any]:
    """The PNG text metadata of a generated image: ``fields`` (prompt, seed, settings), the model, its
    folder and dtype, the software, and ``parameters``: all of it as one JSON string."""
    from . import __version__

    meta = {**fields, "model": model.config.name, "model_path": str(model_path),
            "dtype": str(model.dtype).split(".")[-1], "harmon_version": __version__,
            "software": f"harmon {__version__}"}
    meta["parameters"] = json.dumps(meta, sort_keys=True, default=str)
    return meta


def png_bytes(image, text: Mapping[str, Any]) -> bytes:
    """The PNG encoding of ``image`` with ``text`` as text chunks (metadata readable by any PNG tool)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        if value is not None:  # absent rather than the text "None" (``parameters`` keeps the null)
            info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
