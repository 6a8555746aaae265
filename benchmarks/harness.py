"""What every benchmark process shares: memory and matmul-peak probes, random-weight models, the best-of
timer, and running one measurement in a fresh process (``run.py`` with one of its internal flags)."""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN = HERE / "run.py"  # the command line every measurement subprocess goes through


def rss_now() -> int:
    """Current resident set size in bytes (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_peak() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_matmul_peak(reps: int = 10, budget_s: float = 2.0, device: str = "cpu") -> dict[str, float]:
    """Best GFLOP/s of an n x n @ n x n matmul on ``device``, float32 and bfloat16: n = 2048, or 512 for a dtype
    this CPU computes so slowly (no bf16 matrix units: ~0.3 GFLOP/s) that a 2048 product would take over
    ``budget_s``; the best of ``reps`` calls or of those that fit in ``budget_s`` (at least one)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        n = 512
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        product = lambda: (a @ b, sync())  # noqa: E731 (a and b are rebound below)
        product()
        if best_time(product, 1) * 64 < budget_s:  # a 2048 product does 64x the work
            n = 2048
            a = torch.randn(n, n, generator=g).to(device, dtype)
            b = torch.randn(n, n, generator=g).to(device, dtype)
            for _ in range(3):
                product()
        out[str(dtype).removeprefix("torch.")] = 2 * n**3 / best_time(product, reps, budget_s) / 1e9
    return out


def best_time(fn, reps: int, budget_s: float = math.inf) -> float:
    """The fastest of ``reps`` calls of ``fn`` (fewer once ``budget_s`` seconds are spent; at least one), in
    seconds."""
    best, start = math.inf, time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


def init_tensor(name: str, shape: tuple[int, ...], g, dtype):
    """One random tensor: norms' weights 1, biases 0, VAE convs ~N(0, (0.5/sqrt(fan_in))^2), rest ~N(0, 0.02^2).

    Drawn directly in ``dtype`` so a bfloat16 model never exists in float32 as well.
    """
    import torch

    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if len(shape) == 1 and leaf == "weight" and ("norm" in parent or "ln" in parent):
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    std = 0.02
    if name.startswith("vae.") and len(shape) == 4:
        std = 0.5 / math.sqrt(shape[1] * shape[2] * shape[3])
    t = torch.randn(shape, generator=g, dtype=dtype)
    return t.mul_(std)


def random_state(config, dtype, seed: int = 0) -> dict:
    """A random state dict for ``config`` (tied lm_head left out), tensor by tensor from one generator."""
    import torch
    from harmon.checkpoint import TIED_KEY, expected_keys

    g = torch.Generator().manual_seed(seed)
    tied = bool(config.llm.get("tie_word_embeddings", False))
    return {k: init_tensor(k, shape, g, dtype) for k, shape in expected_keys(config).items()
            if not (tied and k == TIED_KEY)}


def build_model(config, dtype, seed: int = 0, device: str = "cpu"):
    """A model of ``config`` with random weights (:func:`random_state`) in ``dtype``, on ``device``."""
    from harmon.checkpoint import load_state_dict

    return load_state_dict(config, random_state(config, dtype, seed), device=device, dtype=dtype)


def weights_bytes(model) -> int:
    """Bytes of the model's distinct parameters and buffers (the tied embedding counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def linear_weights(module) -> int:
    """Entries of all nn.Linear weights under ``module`` (= multiply-adds per token of its matmuls)."""
    from torch import nn

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def subprocess_json(args: list[str], timeout: float) -> dict:
    """Run ``run.py ARGS`` in a fresh process and return the JSON of its last output line, with its wall time
    (or the error, when it fails or times out)."""
    cmd = [sys.executable, str(RUN)] + args
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (other jobs on the machine?)", "wall_s": timeout}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "returncode": proc.returncode, "wall_s": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def machine_info() -> dict:
    """The CPU, its vector extensions, torch's version and threads, Python and the memory."""
    import torch

    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split("flags", 2)[1].split("\n")[0] if cpuinfo.exists() else ""
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if f" {f}" in flags]
    return {"cpu": model, "logical_cpus": os.cpu_count(), "isa": isa, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
