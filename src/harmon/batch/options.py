"""What a batch run is asked to do besides the generation settings (:class:`BatchOptions`), and this
process's share of it (:class:`Shard`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from ..errors import InputError
from ..outputs import BENCHMARKS
from ..quantize import QUANTIZATIONS
from ..validation import check_field_types


class BatchError(InputError):
    """A problem with what was asked of a batch run (reported by the command line as one line, exit 2)."""


@dataclass(frozen=True)
class BatchOptions:
    """How a batch run lays out and draws its images; checks itself when made (:class:`BatchError`).

    ``seed``: the seed of image 0 of prompt 0 (image k of prompt i gets ``seed + i * num_images + k``);
    ``num_images``: images per prompt; ``batch_size``: images generated at once (not a setting of the run:
    it may change when resuming, and changes images only by float rounding); ``benchmark``: one of
    :data:`~harmon.outputs.BENCHMARKS`, whose official scorer reads the layout written (None: ours);
    ``device`` and ``dtype`` as :func:`~harmon.hub.load_pretrained` takes them by name, and ``quantize`` (None
    or ``"int8"``: a setting of the run, since it changes the images); ``compile``:
    :meth:`~harmon.models.harmon.Harmon.compile_for_sampling` (not a setting of the run either);
    ``progress``: a progress bar on rank 0.
    """

    seed: int = 0
    num_images: int = 1
    batch_size: int = 4
    benchmark: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    compile: bool = False
    progress: bool = True

    def __post_init__(self):
        try:
            check_field_types(self, "")
        except ValueError as err:
            raise BatchError(str(err)) from None
        checks = [
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.benchmark is None or self.benchmark in BENCHMARKS,
             f"benchmark must be one of {', '.join(BENCHMARKS)} or None, got {self.benchmark!r}"),
            (self.benchmark != "dpg" or (self.num_images == 4 and self.batch_size % 4 == 0),
             "DPG-Bench scores a 2x2 grid of 4 images per prompt: num_images must be 4 and batch_size a multiple "
             f"of 4 (got num_images={self.num_images}, batch_size={self.batch_size})"),
            (self.benchmark != "wise" or self.num_images == 1,
             f"WISE scores one image per prompt (<prompt_id>.png): num_images must be 1, got {self.num_images}"),
            (self.quantize is None or self.quantize in QUANTIZATIONS,
             f"quantize must be None or one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BatchError(message)


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: blocks ``b`` with ``b % world_size == rank``; on CUDA it uses
    ``cuda:local_rank``."""

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
