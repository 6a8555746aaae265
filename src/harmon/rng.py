"""Sources of randomness for generation and training; nothing here touches global RNG state.

Two implementations of one small interface:

* :class:`SeededRNG`: one ``torch.Generator`` per image. Each image's orders and
  noise come only from its own generator, so an image is the same whether it
  is generated alone or inside a batch. The default.
* :class:`ReferenceRNG`: reproduces the original code's draws bit for bit on
  CPU: a ``numpy.random.RandomState`` (orders, mask ratio) and a
  ``torch.Generator`` (noise, timesteps), requested with exactly the original's
  element counts and order (torch's CPU normal sampler depends on them).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from .errors import InputError


class SeededRNG:
    """Per-image generators: ``SeededRNG.from_seeds([1, 2])`` or ``SeededRNG([g1, g2])``."""

    def __init__(self, generators: list[torch.Generator]):
        if not generators:
            raise InputError("SeededRNG needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: list[int], device: str | torch.device = "cpu") -> "SeededRNG":
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    def _check(self, num_images: int) -> None:
        if num_images != len(self.generators):
            raise InputError(f"{len(self.generators)} generators for {num_images} images: pass one per image")

    def orders(self, num_images: int, seq_len: int, guided: bool) -> torch.Tensor:
        """(num_images, seq_len) int64: a random generation order per image."""
        self._check(num_images)
        return torch.stack([torch.randperm(seq_len, generator=g, device=g.device).cpu() for g in self.generators])

    def _normal(self, num_images: int, rows: int, channels: int) -> torch.Tensor:
        self._check(num_images)
        return torch.cat([torch.randn(rows, channels, generator=g, device=g.device).cpu() for g in self.generators])

    def start_noise(self, num_images: int, rows: int, channels: int, guided: bool) -> torch.Tensor:
        """(num_images * rows, C) initial diffusion noise, image-major."""
        return self._normal(num_images, rows, channels)

    def step_noise(self, num_images: int, rows: int, channels: int, guided: bool) -> torch.Tensor:
        """(num_images * rows, C) noise for one reverse diffusion step."""
        return self._normal(num_images, rows, channels)


class ReferenceRNG:
    """The original Harmon's random stream, from ``np.random.seed(numpy_seed); torch.manual_seed(torch_seed)``.

    Draws are made on CPU; the results match the original run on CPU.
    """

    def __init__(self, numpy_seed: int, torch_seed: int):
        self.numpy = np.random.RandomState(numpy_seed)
        self.torch = torch.Generator().manual_seed(torch_seed)

    # -- generation -------------------------------------------------------------------------
    def orders(self, num_images: int, seq_len: int, guided: bool) -> torch.Tensor:
        # the original shuffles one order per row of the [cond; uncond] batch and keeps the cond half
        rows = 2 * num_images if guided else num_images
        drawn = []
        for _ in range(rows):
            order = np.arange(seq_len)
            self.numpy.shuffle(order)
            drawn.append(order)
        return torch.from_numpy(np.stack(drawn)[:num_images]).long()

    def start_noise(self, num_images: int, rows: int, channels: int, guided: bool) -> torch.Tensor:
        # with guidance the original draws N/2 rows and duplicates them for the uncond half
        return torch.randn(num_images * rows, channels, generator=self.torch)

    def step_noise(self, num_images: int, rows: int, channels: int, guided: bool) -> torch.Tensor:
        # with guidance the original draws noise for both halves; the cond half is the first
        total = num_images * rows
        return torch.randn(2 * total if guided else total, channels, generator=self.torch)[:total]

    # -- training -------------------------------------------------------------------------
    def train_orders(self, num_images: int, seq_len: int) -> torch.Tensor:
        """(B, L) int64, one numpy shuffle per row."""
        return self.orders(num_images, seq_len, guided=False)

    def mask_ratio(self, mask_ratio_min: float) -> float:
        """One draw of the truncated normal (mean 1, std 0.25, cut to [mask_ratio_min, 1])."""
        dist = stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
        return float(dist.rvs(1, random_state=self.numpy)[0])

    def timesteps(self, n: int, num_timesteps: int) -> torch.Tensor:
        return torch.randint(0, num_timesteps, (n,), generator=self.torch)

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.torch)

    def train_timesteps(self, num_images: int, seq_len: int, mul: int, num_timesteps: int) -> torch.Tensor:
        """(mul*B*L,) as the original: one randint call over all tiled rows."""
        return self.timesteps(mul * num_images * seq_len, num_timesteps)

    def train_noise(self, num_images: int, seq_len: int, mul: int, channels: int) -> torch.Tensor:
        """(mul*B*L, C) as the original: one randn call (randn_like of the tiled targets)."""
        return self.normal(mul * num_images * seq_len, channels)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across runs, processes and platforms)."""
    words = np.array([p & 0xFFFFFFFFFFFFFFFF for p in parts], dtype=np.uint64)
    return int(np.random.SeedSequence(words.tolist()).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class TrainingRNG:
    """Randomness of one training step, keyed by (seed, step, global sample index).

    The mask ratio is shared by the whole global batch (as the original draws one
    per batch) and every other draw belongs to one sample, so a batch split over
    several processes draws exactly what one process would, and a resumed run
    draws what the uninterrupted run would have.
    """

    def __init__(self, seed: int, step: int, sample_ids: list[int]):
        self.seed, self.step, self.sample_ids = seed, step, list(sample_ids)

    def _sample_generator(self, index: int, purpose: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.step, self.sample_ids[index], purpose))

    def train_orders(self, num_images: int, seq_len: int) -> torch.Tensor:
        """(B, L) int64, a random order per sample."""
        return torch.stack([torch.randperm(seq_len, generator=self._sample_generator(i, 0))
                            for i in range(num_images)])

    def mask_ratio(self, mask_ratio_min: float) -> float:
        """Truncated normal (mean 1, std 0.25, cut to [mask_ratio_min, 1]), one per global step."""
        state = np.random.RandomState(derive_seed(self.seed, self.step) % 2**32)
        dist = stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
        return float(dist.rvs(1, random_state=state)[0])

    def _per_sample(self, num_images: int, rows_per_image: int, mul: int, purpose: int, draw) -> torch.Tensor:
        # each sample draws its own (mul, L, ...) block; rows are laid out [all B*L tokens] x mul (tiled)
        if num_images != len(self.sample_ids):
            raise InputError(f"{num_images} images but {len(self.sample_ids)} sample ids")
        blocks = torch.stack([draw(mul * rows_per_image, self._sample_generator(i, purpose))
                              for i in range(num_images)])  # (B, mul*L, ...)
        return blocks.unflatten(1, (mul, rows_per_image)).transpose(0, 1).flatten(0, 2)

    def train_timesteps(self, num_images: int, seq_len: int, mul: int, num_timesteps: int) -> torch.Tensor:
        """(mul*B*L,) int64 diffusion timesteps in the tiled row layout."""
        return self._per_sample(num_images, seq_len, mul, 1,
                                lambda k, g: torch.randint(0, num_timesteps, (k,), generator=g))

    def train_noise(self, num_images: int, seq_len: int, mul: int, channels: int) -> torch.Tensor:
        """(mul*B*L, C) diffusion noise in the tiled row layout."""
        return self._per_sample(num_images, seq_len, mul, 2, lambda k, g: torch.randn(k, channels, generator=g))
