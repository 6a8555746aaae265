"""Gaussian diffusion of the per-token head: cosine schedule, respacing, sampling step, training loss.

Only what Harmon uses of the improved-DDPM formulation: epsilon prediction,
"learned range" variance, MSE + variational-bound loss. Schedules are computed
in float64 and cast to the sample dtype after indexing, like the original.
Respaced processes call the network with the *original* timestep
(``timestep_map[t]``), without rescaling.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import InputError

NUM_TRAIN_TIMESTEPS = 1000

# network(x_t (N, C), original t (N,)) -> (N, 2C) = [eps, variance interpolation value]
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_betas(num_steps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal), float64."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def respaced_timesteps(num_steps: int, section_counts: str) -> list[int]:
    """Original timesteps kept by a respacing string, ascending: section counts such as ``"100"`` or
    ``"10,5"`` (each section's first and last timestep included, so ``"100"`` ends at 999), or
    ``"ddimN"``, every k-th timestep from 0 for the integer stride k giving exactly N steps
    (``"ddim100"``: 0, 10, ..., 990), as the original's ``space_timesteps``."""
    text = str(section_counts)
    if text.startswith("ddim"):
        wanted = int(text[len("ddim"):])
        if wanted < 2:
            raise InputError(f"sampling needs at least 2 diffusion steps, got {section_counts!r}")
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == wanted:
                return list(range(0, num_steps, stride))
        raise InputError(f"cannot take exactly {wanted} of {num_steps} timesteps with an integer stride")
    counts = [int(c) for c in text.split(",")]
    if sum(counts) < 2:
        raise InputError(f"sampling needs at least 2 diffusion steps, got {section_counts!r}")
    size_per, extra = divmod(num_steps, len(counts))
    start, kept = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise InputError(f"cannot take {count} sampling steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.add(start + round(cur))
            cur += stride
        start += size
    return sorted(kept)


@functools.lru_cache(maxsize=None)
def ddim_count(num_steps: int, wanted: int) -> int:
    """The smallest step count >= ``wanted`` that a ``"ddimN"`` respacing of ``num_steps`` takes exactly
    without reaching the last timestep (strides dividing ``num_steps - 1`` end there, where the cosine
    schedule's alpha_bar is ~0 and the first sampling step amplifies the head's error ~300x)."""
    counts = {len(range(0, num_steps, stride)) for stride in range(1, num_steps) if (num_steps - 1) % stride}
    fitting = [c for c in counts if c >= wanted]
    if not fitting:
        raise InputError(f"cannot take {wanted} of {num_steps} timesteps")
    return min(fitting)


def sampling_spec(configured: str, num_steps: str | int | None = None) -> str:
    """The respacing string for ``num_steps`` on a model configured to sample with ``configured``: the
    configured one when None; a bare count N keeps the configured style (``"N"``, or for a model that samples
    with ``"ddim..."`` the DDIM respacing of N steps, rounded up to a count that :func:`ddim_count` allows:
    37 -> ``"ddim39"``); any other string (``"10,5"``, ``"ddim25"``) as it is."""
    if num_steps is None:
        return configured
    spec = str(num_steps)
    if spec.isdigit() and configured.startswith("ddim"):
        return f"ddim{ddim_count(NUM_TRAIN_TIMESTEPS, int(spec))}"
    return spec

@dataclass
class ReverseStep:
    """One noisy reverse step as sampled: respaced index t, x_t and x_{t-1} (N, C), and log p(x_{t-1} | x_t)
    per row (N,) as :func:`gaussian_log_prob` gives it."""

    t: int
    x_t: torch.Tensor
    x_prev: torch.Tensor
    log_prob: torch.Tensor


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over the channels of log N(x; mean, exp(log_variance) * temperature^2): rows (N, C) -> (N,)."""
    log_std = 0.5 * log_variance + math.log(temperature)
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z ** 2 - log_std - 0.5 * math.log(2 * math.pi)).mean(dim=-1)


class GaussianDiffusion:
    """A (possibly respaced) diffusion process over ``NUM_TRAIN_TIMESTEPS`` cosine-schedule steps.

    ``timesteps`` lists the original steps kept (all of them for training); the
    process has ``len(timesteps)`` steps and ``timestep_map`` gives, for each of
    its indices, the original timestep fed to the network.
    """

    def __init__(self, timesteps: list[int] | None = None):
        base_alphas_cumprod = np.cumprod(1.0 - cosine_betas())
        timesteps = list(range(NUM_TRAIN_TIMESTEPS)) if timesteps is None else sorted(timesteps)
        betas, last = [], 1.0
        for t in timesteps:
            betas.append(1 - base_alphas_cumprod[t] / last)
            last = base_alphas_cumprod[t]
        betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.tables: dict[str, np.ndarray] = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if len(posterior_variance) > 1 else np.array([]),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        self.timestep_map = np.array(timesteps, dtype=np.int64)
        self.tables["timestep_map"] = self.timestep_map
        self._on_device: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    @classmethod
    def respaced(cls, section_counts: str) -> "GaussianDiffusion":
        """The sampling process of ``num_sampling_steps`` (e.g. ``"100"``)."""
        return cls(respaced_timesteps(NUM_TRAIN_TIMESTEPS, section_counts))

    def _table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        if key not in self._on_device:
            # casting the float64 table then indexing equals indexing then casting
            self._on_device[key] = torch.from_numpy(self.tables[name]).to(device=device, dtype=dtype)
        return self._on_device[key]

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Float32 schedule value per row (as the original), shaped (N, 1, ...) to broadcast against x."""
        v = self._table(name, x.device, torch.float32)[t]
        return v.reshape(-1, *([1] * (x.dim() - 1)))

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> the original timesteps the network is trained on."""
        return self._table("timestep_map", t.device, torch.int64)[t]

    # -- forward process -----------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at("sqrt_alphas_cumprod", t, x_start) * x_start + \
            self._at("sqrt_one_minus_alphas_cumprod", t, x_start) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = self._at("posterior_mean_coef1", t, x_t) * x_start + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    # -- reverse process -----------------------------------------------------------------
    def p_mean_variance_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        """Network output (N, 2C) at respaced step t -> mean, variance, log_variance, pred_xstart."""
        c = x_t.shape[1]
        eps, var_values = output[:, :c], output[:, c:]
        min_log = self._at("posterior_log_variance_clipped", t, x_t)
        max_log = self._at("log_betas", t, x_t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - \
            self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: DenoiseFn, x_t: torch.Tensor, t: torch.Tensor) -> dict:
        return self.p_mean_variance_from_output(model(x_t, self.original_timesteps(t)), x_t, t)

    def p_sample(self, model: DenoiseFn, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 temperature: float = 1.0) -> dict:
        """One ancestral step; ``noise`` is used only where t != 0 and is scaled by ``temperature``."""
        out = self.p_mean_variance(model, x_t, t)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        out["sample"] = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return out

    def p_sample_loop(self, model: DenoiseFn, x_T: torch.Tensor, step_noise: Callable[[], torch.Tensor],
                      temperature: float = 1.0, trace: list[ReverseStep] | None = None) -> torch.Tensor:
        """Run all reverse steps from x_T; ``step_noise()`` supplies each step's noise (also at t == 0).
        ``trace`` receives a :class:`ReverseStep` for every step that draws noise (t > 0)."""
        x = x_T
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            out = self.p_sample(model, x, t, step_noise(), temperature)
            if trace is not None and i > 0:
                trace.append(ReverseStep(i, x, out["sample"], gaussian_log_prob(out["sample"], out["mean"],
                                                                                  out["log_variance"], temperature)))
            x = out["sample"]
        return x

    # -- training --------------------------------------------------------------------------
    def training_losses(self, model: DenoiseFn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row ``mse``, ``vb`` (bits/dim, mean output detached) and ``loss`` = mse + vb; t in original steps."""
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.original_timesteps(t))
        c = x_t.shape[1]
        eps = output[:, :c]
        frozen = torch.cat([eps.detach(), output[:, c:]], dim=1)
        vb = self._vb_terms_bpd(frozen, x_start, x_t, t)
        mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x_start.dim())))
        return {"mse": mse, "vb": vb, "loss": mse + vb, "x_t": x_t}

    def _vb_terms_bpd(self, output, x_start, x_t, t):
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t)
        dims = tuple(range(1, x_start.dim()))
        kl = _normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=dims) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
