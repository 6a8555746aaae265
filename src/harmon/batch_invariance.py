"""What makes an image drawn in a batch bit-identical to the same image drawn alone.

:func:`harmon.sampling.generate_latents` gives every image its own random generator, so a batch only
changes *how* the arithmetic is done, never *what* is computed. Three things made that difference show
in the last bits (measured by ``scripts/probes/batch_exactness.py``; docs/performance.md has the numbers):

* **Matrix products of few rows.** The CPU's GEMM (MKL here) computes a row of ``x @ W.T`` with one
  kernel whenever the product has at least 12 rows (or 4 or 8), and with other kernels, which round
  differently, for 1-3, 5-7 and 9-11 rows: measured the same for every (K, N) of the models, with 1 or 2
  threads. The loop has such products: the diffusion head runs on the few tokens an iteration samples
  (2 rows for one image's first token with guidance, 2B in a batch) and pads its own rows
  (:func:`pad_rows`); the MAR encoder, the LLM and the MAR decoder run within :class:`StableRows`
  (9 rows for one image of the shipped model in the encoder after its first token).
* **Prompts of different lengths.** Prompts are right-padded to the batch's longest, and attention over a
  longer run of masked keys sums in another order: :class:`harmon.sampling.PromptCaches` runs the LLM
  once per prompt width, each image with the width it has alone.
* **Convolutions** (the VAE decoder) round differently with the batch size: the text-to-image pipeline
  decodes each image by itself.

Attention, normalisations and element-wise operations compute each row of a batch as they compute it
alone (measured: equal to the bit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

MIN_ROWS = 16  # products of fewer rows are padded to this many (the many-rows kernel from 12 rows on)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (N, ...) with zero rows appended up to ``rows`` (N, ...) -> (max(N, rows), ...)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


class StableRows(TorchFunctionMode):
    """Within it, ``torch.nn.functional.linear`` of fewer than :data:`MIN_ROWS` rows (all dimensions but the
    last) runs on zero rows padded up to :data:`MIN_ROWS`, which are dropped again, so each row is computed
    by the same kernel whatever the number of rows. Everything else runs unchanged. Thread-local, like
    every torch mode; it costs a Python call per torch operation, so it wraps the few large calls of an
    iteration, not the diffusion head's many small ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].dim() >= 1 and args[0].shape[-1] > 0:
            x = args[0]
            rows = x.numel() // x.shape[-1]
            if 0 < rows < MIN_ROWS:
                flat = pad_rows(x.reshape(rows, x.shape[-1]), MIN_ROWS)  # (MIN_ROWS, K)
                out = func(flat, *args[1:], **kwargs)  # (MIN_ROWS, N)
                return out[:rows].reshape(*x.shape[:-1], out.shape[-1])
        return func(*args, **kwargs)
