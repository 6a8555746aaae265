"""The training loop: one process or many (``torchrun``, DistributedDataParallel), resumable exactly.

Each step takes ``t2i_batch_size`` caption examples and ``i2t_batch_size``
conversation examples from deterministic per-epoch permutations, split evenly
over the processes, and minimises ``t2i_weight * L_t2i + i2t_weight * L_i2t`` (plus
``latent_readout * L_readout`` when that auxiliary loss is switched on).
All randomness of a step is keyed by (seed, step, sample index), so a run on N
processes computes the losses of a one-process run with the same global batch,
and a resumed run continues with exactly the losses it would have had.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import read_json, save_model
from ..files import check_folder_path
from ..hub import load_pretrained, load_tokenizer, resolve_model_folder
from ..tokenizer import save_tokenizer
from ..models.harmon import Harmon
from ..rng import TrainingRNG, derive_seed
from .config import TrainConfig
from .data import Batcher, CaptionExample, ConversationExample, read_finetune, read_jsonl, read_llava
from .losses import image_to_text_token_losses, latent_readout_loss, text_to_image_loss

CHECKPOINTS = "checkpoints"


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)  # one record per logged step
    skipped_images: list[str] = field(default_factory=list)
    final_dir: Path | None = None


# -- distributed set-up ------------------------------------------------------------------------
@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_world(device: str) -> World:
    """Join the ``torchrun`` process group if there is one (gloo on CPU, nccl on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(rank, size, dev)


def _all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


# -- model preparation -----------------------------------------------------------------------
def part_parameters(model: Harmon, part: str) -> list[nn.Parameter]:
    """The parameters of one trainable part: llm, mar_encoder, mar_decoder (with the diffusion head), projections."""
    mar = model.mar
    groups = {
        "llm": [model.llm],
        "mar_encoder": [mar.z_proj, mar.z_proj_ln, mar.encoder_blocks, mar.encoder_norm, mar.class_emb],
        "mar_decoder": [mar.decoder_embed, mar.decoder_blocks, mar.decoder_norm, mar.diffloss],
        "projections": [model.proj_in, model.proj_out],
    }
    loose = {"mar_encoder": [mar.fake_latent, mar.encoder_pos_embed_learned],
             "mar_decoder": [mar.mask_token, mar.decoder_pos_embed_learned, mar.diffusion_pos_embed_learned]}
    params = [p for m in groups[part] for p in m.parameters()]
    return params + loose.get(part, [])


def prepare_model(model: Harmon, cfg: TrainConfig) -> Harmon:
    """Freeze what the config says (the VAE always), add LoRA, switch on gradient checkpointing, compile."""
    model.requires_grad_(True)
    model.vae.requires_grad_(False)
    for part in cfg.freeze:
        for p in part_parameters(model, part):
            p.requires_grad_(False)
    if cfg.lora.r > 0:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        # on the decoder stack (llm.model), so code that calls llm.model(...) runs the adapted layers
        model.llm.model = get_peft_model(model.llm.model, PeftLoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules)))
    if cfg.gradient_checkpointing:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.mar.grad_checkpointing = True
        model.mar.diffloss.net.grad_checkpointing = True
    if cfg.compile:
        model.compile_for_training()
    return model


def build_optimizer(model: Harmon, cfg: TrainConfig, extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters and those of ``extra`` (the trainer's own modules);
    no weight decay on 1-D parameters, biases and the diffusion head (as the original)."""
    decay, no_decay = [], []
    named = list(model.named_parameters()) + (list(extra.named_parameters(prefix="extra")) if extra else [])
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or name.startswith("mar.diffloss."):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every part is frozen")
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine decay to ``min_lr_ratio``."""
    warmup = max(1, round(cfg.optim.warmup_ratio * cfg.max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.optim.min_lr_ratio + (1 - cfg.optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class HarmonForTraining(nn.Module):
    """Both objectives behind one ``forward`` (so DistributedDataParallel sees the call).

    With ``latent_readout`` it also owns the linear readout of that auxiliary loss
    (:func:`~harmon.train.losses.latent_readout_loss`), started at zero; it is trained and
    checkpointed with the model but not exported.
    """

    def __init__(self, model: Harmon, latent_readout: bool = False):
        super().__init__()
        self.model = model
        self.readout = None
        if latent_readout:
            mar = model.config.mar
            self.readout = nn.Linear(mar.decoder_embed_dim, mar.vae_embed_dim, device=model.device)
            nn.init.zeros_(self.readout.weight)
            nn.init.zeros_(self.readout.bias)

    def forward(self, t2i: dict | None, i2t: dict | None, rng: TrainingRNG | None) -> dict[str, torch.Tensor]:
        if t2i is None and i2t is None:
            # every image of this step was unreadable: a zero loss over all trainable weights keeps the
            # step (and, with several processes, the gradient all-reduce) going
            return {"empty": sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0}
        out = {}
        if t2i is not None:
            t2i_loss = text_to_image_loss(self.model, t2i["pixel_values"], t2i["input_ids"],
                                          t2i["attention_mask"], rng)
            out["t2i"] = t2i_loss.loss
            if self.readout is not None:
                out["t2i_readout"] = latent_readout_loss(self.readout, t2i_loss)
        if i2t is not None:
            losses, null = image_to_text_token_losses(self.model, i2t["input_ids"], i2t["attention_mask"],
                                                      i2t["labels"], i2t["pixel_values"])
            out["i2t_sum"], out["i2t_count"], out["i2t_null"] = losses.sum(), losses.numel(), null
        return out


# -- data order -------------------------------------------------------------------------------
def batch_positions(step: int, batch_size: int, world: World) -> list[int]:
    """Global stream positions of this process's share of step ``step``."""
    if batch_size % world.size:
        raise ValueError(f"batch size {batch_size} does not split over {world.size} processes")
    share = batch_size // world.size
    start = step * batch_size + world.rank * share
    return list(range(start, start + share))


def example_index(position: int, n: int, seed: int, task: int, cache: dict) -> int:
    """The example at a global stream position: epoch-wise permutations from (seed, task, epoch)."""
    epoch, offset = divmod(position, n)
    if (task, epoch) not in cache:
        g = torch.Generator().manual_seed(derive_seed(seed, task, epoch))
        cache[(task, epoch)] = torch.randperm(n, generator=g).tolist()
    return cache[(task, epoch)][offset]


# -- checkpoints ------------------------------------------------------------------------------------
def _trainable_state(model: Harmon) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(out: Path, step: int, module: HarmonForTraining, optimizer, world: World, cfg: TrainConfig
                    ) -> None:
    """Write ``checkpoints/step_XXXXXXX`` atomically (temp folder, then rename) and point ``latest`` at it."""
    root = out / CHECKPOINTS
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.tmp"
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(world)
    torch.save(torch.get_rng_state(), tmp / f"rng_rank{world.rank}.pt")
    if world.main:
        state = {"step": step, "model": _trainable_state(module.model), "optimizer": optimizer.state_dict(),
                 "config": cfg.to_dict(), "world_size": world.size}
        if module.readout is not None:
            state["readout"] = {k: v.detach().cpu() for k, v in module.readout.state_dict().items()}
        torch.save(state, tmp / "state.pt")
    _barrier(world)
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        for old in sorted(root.glob("step_*"))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)


def load_checkpoint(out: Path, module: HarmonForTraining, optimizer, world: World) -> int:
    """Restore the latest checkpoint; returns the step to continue from (0 when there is none)."""
    name = _latest_name(out)
    if name is None:
        return 0
    folder = out / CHECKPOINTS / name
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    if state["world_size"] != world.size:
        raise ValueError(f"{folder} was written by {state['world_size']} processes; resume with the same number")
    if (module.readout is None) != ("readout" not in state):
        raise ValueError(f"{folder} was written with latent_readout {'off' if module.readout is not None else 'on'}; "
                         "resume with the same setting")
    _restore_trainable(module.model, state["model"], folder)
    if module.readout is not None:
        module.readout.load_state_dict(state["readout"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(torch.load(folder / f"rng_rank{world.rank}.pt", weights_only=True))
    return int(state["step"])


def _restore_trainable(model: nn.Module, saved: dict[str, torch.Tensor], folder: Path) -> None:
    """Load a checkpoint's trained tensors into ``model``, refusing one that lacks any of them."""
    missing = set(_trainable_state(model)) - set(saved)
    if missing:
        raise ValueError(f"{folder} lacks trainable tensors {sorted(missing)[:5]}: "
                         "was the freeze/LoRA setting changed?")
    model.load_state_dict(saved, strict=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step``: a killed run may have logged steps its last checkpoint lacks."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        _write_atomic(path, "".join(line + "\n" for line in kept))


def _barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


# -- the loop ---------------------------------------------------------------------------------------
def _read_data(cfg: TrainConfig) -> tuple[list[CaptionExample], list[ConversationExample]]:
    captions = [e for root in cfg.data.finetune for e in read_finetune(root)]
    captions += [e for path in cfg.data.jsonl for e in read_jsonl(path)]
    conversations = [e for path in cfg.data.llava for e in read_llava(path)]
    return captions, conversations


def train(cfg: TrainConfig, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training; ``stop_after`` ends the run early after that many steps (for tests).

    Dropout draws from torch's global generator: it is seeded here from (seed, rank),
    saved in checkpoints, and the caller's global RNG state is restored afterwards.
    """
    world = setup_world(cfg.device)
    devices = [world.device.index or 0] if world.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(cfg.seed, world.rank))
        return _train(cfg, world, stop_after)


# settings a resumed run may change: when to stop, to save and to log, where to run, compiling (which changes
# losses by float rounding at most); any other change would make the run something else than it says
RESUMABLE_CHANGES = ("max_steps", "save_every", "keep_checkpoints", "log_every", "tensorboard", "progress", "device",
                     "compile")


def check_resume_config(out: Path, cfg: TrainConfig) -> None:
    """A run with a checkpoint in ``out`` resumes only with its own settings (but :data:`RESUMABLE_CHANGES`):
    ``ValueError`` naming every setting that changed."""
    saved_path = out / "train_config.json"
    if _latest_name(out) is None or not saved_path.is_file():
        return
    saved = read_json(saved_path)
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as JSON has them

    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}
    old, new = flat(saved), flat(now)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}): resume it with its own "
                         f"({saved_path}), or train into a new output_dir")


def _train(cfg: TrainConfig, world: World, stop_after: int | None) -> TrainResult:
    out = check_folder_path(cfg.output_dir, "output_dir")
    check_resume_config(out, cfg)
    model, tokenizer = load_pretrained(cfg.model, device=world.device)
    model = prepare_model(model, cfg)
    model.train()
    captions, conversations = _read_data(cfg)
    image_tokens = (cfg.data.image_size // model.config.mar.vae_stride) ** 2 + model.buffer_size
    batcher = Batcher(tokenizer, cfg.data.image_size, image_tokens, cfg.data.uncond_prob, cfg.seed,
                      cfg.data.max_length)
    module = HarmonForTraining(model, latent_readout=cfg.latent_readout > 0)
    wrapped = module
    if world.size > 1:
        wrapped = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    optimizer = build_optimizer(model, cfg, module.readout)
    start = load_checkpoint(out, module, optimizer, world)
    use_bf16 = cfg.precision == "bfloat16" or (cfg.precision == "auto" and world.device.type == "cuda")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    if world.main and start > 0:
        _truncate_log(out / "log.jsonl", start)
    log = open(out / "log.jsonl", "a") if world.main else None
    writer = _tensorboard(out) if cfg.tensorboard and world.main else None
    result = TrainResult(steps=start)
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, start + stop_after)
    bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and world.main), desc="training")
    perm_cache: dict = {}

    def step_batches(step: int) -> tuple[dict | None, dict | None]:
        t2i = i2t = None
        if captions:
            pos = batch_positions(step, cfg.data.t2i_batch_size, world)
            idx = [example_index(p, len(captions), cfg.seed, 0, perm_cache) for p in pos]
            t2i = batcher.text_to_image([captions[i] for i in idx], pos, step)
        if conversations:
            pos = batch_positions(step, cfg.data.i2t_batch_size, world)
            idx = [example_index(p, len(conversations), cfg.seed, 1, perm_cache) for p in pos]
            i2t = batcher.image_to_text([conversations[i] for i in idx], pos)
        return t2i, i2t

    tick, samples = time.perf_counter(), 0
    for step, (t2i, i2t) in _prefetched(step_batches, range(start, end)):
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg)
        rng = TrainingRNG(cfg.seed, step, t2i["sample_ids"]) if t2i is not None else None
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = wrapped(t2i, i2t, rng)
        # i2t: token-weighted mean over the whole global batch, whatever its split over processes
        i2t_tokens = _all_reduce_sum(torch.tensor(float(losses.get("i2t_count", 0))), world).item()
        total = losses.get("empty", torch.zeros((), device=world.device))
        if "t2i" in losses:
            total = total + cfg.t2i_weight * losses["t2i"]
        if "t2i_readout" in losses:
            total = total + cfg.latent_readout * losses["t2i_readout"]
        if "i2t_sum" in losses and i2t_tokens > 0:
            total = total + cfg.i2t_weight * (losses["i2t_sum"] * world.size / i2t_tokens + losses["i2t_null"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad],
                                                   cfg.optim.grad_clip)
        optimizer.step()
        samples += (len(t2i["sample_ids"]) if t2i else 0) + (len(i2t["sample_ids"]) if i2t else 0)

        record = _step_record(step, losses, i2t_tokens, world, optimizer, grad_norm)
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            elapsed = time.perf_counter() - tick
            record["samples_per_s"] = _all_reduce_sum(torch.tensor(float(samples)), world).item() / elapsed
            tick, samples = time.perf_counter(), 0
            if world.main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                if writer is not None:
                    for key, value in record.items():
                        writer.add_scalar(key, value, step + 1)
        result.history.append(record)
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("t2i", "i2t", "lr", "samples_per_s")})
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            save_checkpoint(out, step + 1, module, optimizer, world, cfg)
        result.steps = step + 1
    bar.close()
    result.skipped_images = _gather_skipped(batcher.skipped, world)
    if world.main:
        if result.skipped_images:
            print(f"skipped {len(result.skipped_images)} unreadable images, e.g. {result.skipped_images[0]}")
        if result.steps == cfg.max_steps:
            result.final_dir = export(model, tokenizer, out / "final")
        log.close()
        if writer is not None:
            writer.close()
    _barrier(world)
    return result


def _prefetched(make: Callable[[int], Any], steps: range) -> Iterator[tuple[int, Any]]:
    """Yield ``(step, make(step))`` for each step, computing the next step's value in a thread meanwhile.

    The trainer's batches (image decoding, tokenising) depend on the step alone, so preparing
    them one step ahead changes nothing but the time the loop waits for them.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmon-batches") as pool:
        upcoming = pool.submit(make, steps[0]) if steps else None
        for step in steps:
            value = upcoming.result()
            if step + 1 < steps.stop:
                upcoming = pool.submit(make, step + 1)
            yield step, value


def _step_record(step: int, losses: dict, i2t_tokens: float, world: World, optimizer, grad_norm) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step + 1, "lr": optimizer.param_groups[0]["lr"],
                              "grad_norm": float(grad_norm)}
    for key in ("t2i", "t2i_readout"):
        if key in losses:
            record[key] = _all_reduce_sum(losses[key].detach().float().cpu(), world).item() / world.size
    if "i2t_sum" in losses and i2t_tokens > 0:
        record["i2t"] = _all_reduce_sum(losses["i2t_sum"].detach().float().cpu(), world).item() / i2t_tokens
    return record


def _gather_skipped(skipped: list[str], world: World) -> list[str]:
    if world.size == 1:
        return list(skipped)
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, list(skipped))
    return [s for part in gathered for s in part]


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter(str(out / "tensorboard"))


def export(model: Harmon, tokenizer, folder: Path) -> Path:
    """A model folder for the pipelines (LoRA merged into the LLM), with the tokenizer."""
    if hasattr(model.llm.model, "merge_and_unload"):
        model.llm.model = model.llm.model.merge_and_unload()
    model.eval()
    save_model(model, folder)
    save_tokenizer(tokenizer, folder)
    return folder


def export_checkpoint(run_dir: str | Path, folder: str | Path, step: int | None = None) -> Path:
    """A model folder from a run's checkpoint (the latest, or that of ``step``): to evaluate a run midway.

    The run's ``train_config.json`` names the model folder it started from (as the run saw the path);
    that model, the checkpoint's trained tensors (LoRA merged, as at the end of a run) and its
    tokenizer make the folder.
    """
    checkpoint, cfg = _checkpoint_folder(Path(run_dir), step)
    model, _ = _checkpoint_model(checkpoint, cfg)
    tokenizer = load_tokenizer(resolve_model_folder(cfg.model), int(model.config.llm["vocab_size"]))
    return export(model, tokenizer, Path(folder))


def edit_checkpoint(run_dir: str | Path, edit: Callable[[Harmon], None]) -> int:
    """Apply ``edit`` to the model of a run's latest checkpoint and write its trained tensors back.

    Training resumed from it continues from the edited weights, with the optimizer's state and
    the schedule as they were. Returns the checkpoint's step.
    """
    checkpoint, cfg = _checkpoint_folder(Path(run_dir), None)
    model, state = _checkpoint_model(checkpoint, cfg)
    edit(model)
    state["model"] = _trainable_state(model)
    torch.save(state, checkpoint / "state.pt.tmp")
    os.replace(checkpoint / "state.pt.tmp", checkpoint / "state.pt")
    return int(state["step"])


def latest_step(run_dir: str | Path) -> int:
    """The step of a run's latest checkpoint; 0 when it has none."""
    name = _latest_name(Path(run_dir))
    return int(name.removeprefix("step_")) if name is not None else 0


def _latest_name(run: Path) -> str | None:
    """The folder name (``step_XXXXXXX``) the run's ``latest`` pointer names; None without one."""
    pointer = run / CHECKPOINTS / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def _checkpoint_folder(run: Path, step: int | None) -> tuple[Path, TrainConfig]:
    """The folder of a run's checkpoint (the latest, or that of ``step``) and the run's config."""
    cfg = TrainConfig.from_dict(read_json(run / "train_config.json"))
    root = run / CHECKPOINTS
    name = f"step_{step:07d}" if step is not None else _latest_name(run)
    if name is None or not (root / name / "state.pt").is_file():
        found = sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []
        wanted = f"checkpoint {name}" if name is not None else "'latest' pointer"
        raise ValueError(f"no {wanted} in {root}; it holds {found or 'none'} (pass a step)")
    return root / name, cfg


def _checkpoint_model(checkpoint: Path, cfg: TrainConfig) -> tuple[Harmon, dict[str, Any]]:
    """The run's starting model with a checkpoint's trained tensors (prepared as for training), and its state."""
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    model = prepare_model(load_pretrained(cfg.model)[0],
                          dataclasses.replace(cfg, compile=False, gradient_checkpointing=False))
    _restore_trainable(model, state["model"], checkpoint)
    return model, state
