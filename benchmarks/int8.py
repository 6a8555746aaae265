"""Weight-only int8 (``quantize="int8"``) against the unquantized model: memory, speed and error, at full size.

For one preset (``harmon-0.5b`` or ``harmon-1.5b``, random weights: a bfloat16 checkpoint streamed to disk
once, as ``run.py``'s loading check writes it) and one compute dtype, two fresh processes load the checkpoint
with ``harmon.checkpoint.load_model`` -- unquantized, then with ``quantize="int8"`` -- and each reports:

* memory: the bytes of the weights as stored (int8 data + scales for the quantized ones), the resident memory
  the load added, and the process's peak resident memory (``ru_maxrss``: loading and every run below);
* speed: the load; one LLM forward over 64 prompt tokens (batch 1, logits of every position); greedy decoding
  of ``--decode-tokens`` (16) tokens after it (``decode_tokens``, tokens/s); one ``--image-px`` (256)
  text-to-image (2 MAR iterations, 10 diffusion steps, guidance 3.0: the reduced run of ``run.py``); each the
  best of 2 where the first took under 10 s;
* error of int8 against the unquantized process's outputs on the same inputs (saved by the first process):
  max and mean absolute difference of the 64 x vocabulary logits (and their scale), how often the top token
  agrees, and the generated image's pixel difference (0-255) for the same seed.

    .venv/bin/python benchmarks/int8.py --config harmon-0.5b --dtype float32 [--image-px 256] [--decode-tokens 16]
        [--out FILE.json] [--part both|none|int8] [--cache-dir DIR]

One (preset, dtype) per call, so that no call runs long (``--part`` splits it further: ``none``, then
``int8`` with the same ``--out``); ``--dtype bfloat16`` is slow on a CPU without bf16 matrix units
(avx512_bf16 / AMX). The measured numbers are in ``docs/performance.md`` (Weight-only int8).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import best_time, machine_info, rss_now, rss_peak, subprocess_json

PROMPT_TOKENS = 64
PROMPT = "a photo of a red apple on a wooden table"
GIB = 1024 ** 3


def worker(spec: dict) -> dict:
    """One process: load ``spec["folder"]`` in ``spec["dtype"]`` (``spec["quantize"]``), time it, and compare
    with the reference outputs of ``spec["reference"]`` where given, else write them there."""
    import torch
    from safetensors.torch import load_file, save_file

    from harmon.checkpoint import load_model
    from harmon.hub import load_tokenizer
    from harmon.pipelines import TextToImagePipeline
    from harmon.pipelines.image_to_text import decode_tokens
    from harmon.quantize import weight_bytes
    from harmon.settings import DecodingSettings, GenerationSettings

    res = {"quantize": spec["quantize"], "dtype": spec["dtype"], "machine": machine_info(),
           "loadavg_start": os.getloadavg()}
    dtype = getattr(torch, spec["dtype"])
    base = rss_now()
    t0 = time.perf_counter()
    model = load_model(spec["folder"], dtype=dtype, quantize=spec["quantize"])
    res["load_s"] = time.perf_counter() - t0
    res.update(rss_before_load_bytes=base, load_added_rss_bytes=rss_now() - base, peak_rss_after_load_bytes=rss_peak(),
               weights_bytes=weight_bytes(model),
               parts_bytes={name: weight_bytes(model.get_submodule(name))
                            for name in ("llm", "mar.encoder_blocks", "mar.decoder_blocks", "mar.diffloss", "vae")})
    tokenizer = load_tokenizer(spec["folder"], int(model.config.llm["vocab_size"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (1, PROMPT_TOKENS), generator=g)
    out = {}
    with torch.no_grad():
        res["llm_forward_s"] = best_time(lambda: out.update(logits=model.llm(input_ids=ids).logits.float()), 2, 10)
        embeds = model.llm.get_input_embeddings()(ids)
        settings = DecodingSettings(max_new_tokens=spec["decode_tokens"])

        def decode():
            steps = decode_tokens(model, embeds, set(), settings)
            next(steps)  # the prompt pass
            t0 = time.perf_counter()
            out["decoded"] = sum(1 for _ in steps)
            out["decode_s"] = time.perf_counter() - t0

        best_time(decode, 2, 10)
        res["decode_tokens_per_s"] = out["decoded"] / out["decode_s"]
    if spec["image_px"]:
        pipe = TextToImagePipeline(model, tokenizer)
        t2i = GenerationSettings(num_iter=2, num_steps=10, height=spec["image_px"], width=spec["image_px"])
        res["t2i_s"] = best_time(lambda: out.update(image=pipe(PROMPT, t2i, seeds=[0], output_type="pt",
                                                               progress=False).images.float()), 2, 10)
    else:
        out["image"] = torch.zeros(0)
    res["peak_rss_bytes"] = rss_peak()
    res["loadavg_end"] = os.getloadavg()
    mine = {"logits": out["logits"].contiguous(), "image": out["image"].contiguous()}
    if not spec["quantize"]:
        save_file(mine, spec["reference"])
        return res
    ref = load_file(spec["reference"])
    diff = (mine["logits"] - ref["logits"]).abs()
    pixels = (mine["image"] - ref["image"]).abs() * 127.5  # images in [-1, 1] -> 0-255 steps
    res["vs_unquantized"] = {
        "logits_max_abs": diff.max().item(), "logits_mean_abs": diff.mean().item(),
        "logits_mean_abs_of_reference": ref["logits"].abs().mean().item(),
        "logits_max_abs_of_reference": ref["logits"].abs().max().item(),
        "top1_agreement": (mine["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean().item(),
    }
    if pixels.numel():
        res["vs_unquantized"].update(pixels_max_abs=pixels.max().item(), pixels_mean_abs=pixels.mean().item(),
                                     pixels_share_over_8=(pixels > 8).float().mean().item())
    return res


def run(args: argparse.Namespace, result: dict) -> dict:
    """The checkpoint (written once), then the unquantized and the int8 process (``args.part``: one of them),
    one after the other; their results go into ``result`` under ``none`` and ``int8``."""
    cache_dir = Path(args.cache_dir)
    folder = cache_dir / f"{args.config}-random-bfloat16"
    result.update(config=args.config, dtype=args.dtype, image_px=args.image_px, decode_tokens=args.decode_tokens,
                  folder=str(folder))
    if not (folder / "model.safetensors").is_file():
        print(f"writing {folder} (once) ...", file=sys.stderr, flush=True)
        result["writer"] = subprocess_json(["--write-checkpoint", args.config, str(folder), "bfloat16"], args.timeout)
    reference = cache_dir / f"int8-reference-{args.config}-{args.dtype}-{args.image_px}.safetensors"
    for quantize in [q for q in (None, "int8") if args.part in ("both", q or "none")]:
        if quantize and not reference.is_file():
            result["int8"] = {"error": f"no reference outputs ({reference}): run --part none first"}
            break
        print(f"{args.config} {args.dtype} {quantize or 'unquantized'} ...", file=sys.stderr, flush=True)
        spec = {"folder": str(folder), "dtype": args.dtype, "quantize": quantize, "reference": str(reference),
                "image_px": args.image_px, "decode_tokens": args.decode_tokens}
        result[quantize or "none"] = _own_subprocess(spec, args.timeout)
    return result


def _own_subprocess(spec: dict, timeout: float) -> dict:
    """``worker(spec)`` in a fresh process of this script (its last output line is the JSON)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(r: dict) -> None:
    """The two processes side by side, then the errors."""
    rows = [("weights (GiB)", lambda x: f"{x['weights_bytes'] / GIB:.2f}"),
            ("RSS added by loading (GiB)", lambda x: f"{x['load_added_rss_bytes'] / GIB:.2f}"),
            ("peak RSS after loading (GiB)", lambda x: f"{x['peak_rss_after_load_bytes'] / GIB:.2f}"),
            ("peak RSS, whole run (GiB)", lambda x: f"{x['peak_rss_bytes'] / GIB:.2f}"),
            ("load (s)", lambda x: f"{x['load_s']:.1f}"),
            (f"LLM forward, {PROMPT_TOKENS} tokens (s)", lambda x: f"{x['llm_forward_s']:.3f}"),
            ("greedy decoding (tokens/s)", lambda x: f"{x['decode_tokens_per_s']:.2f}"),
            (f"text-to-image {r['image_px']} px, 2 it x 10 steps (s)", lambda x: f"{x.get('t2i_s', 0):.1f}"),
            ("load average start / end", lambda x: f"{x['loadavg_start'][0]:.1f} / {x['loadavg_end'][0]:.1f}")]
    rows = [row for row in rows if r["image_px"] or not row[0].startswith("text-to-image")]
    a, b = r["none"], r["int8"]
    if "error" in a or "error" in b:
        print("failed:", a.get("error", ""), b.get("error", ""))
        return
    machine = a["machine"]
    print(f"{r['config']}, compute dtype {r['dtype']}; {machine['cpu']} ({', '.join(machine['isa'])}), "
          f"torch {machine['torch']} with {machine['torch_threads']} threads")
    print(f"{'':<44} {'unquantized':>12} {'int8':>12}")
    for name, fmt in rows:
        print(f"{name:<44} {fmt(a):>12} {fmt(b):>12}")
    e = b["vs_unquantized"]
    print(f"logits int8 - unquantized ({PROMPT_TOKENS} x vocab): max {e['logits_max_abs']:.4f}, mean "
          f"{e['logits_mean_abs']:.5f} (reference mean |logit| {e['logits_mean_abs_of_reference']:.3f}, max "
          f"{e['logits_max_abs_of_reference']:.3f}); top token agrees at {100 * e['top1_agreement']:.1f}% of positions")
    if "pixels_max_abs" in e:
        print(f"image, same seed (0-255): max {e['pixels_max_abs']:.1f}, mean {e['pixels_mean_abs']:.2f}, "
              f"{100 * e['pixels_share_over_8']:.2f}% of values differ by more than 8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["harmon-0.5b", "harmon-1.5b"], default="harmon-0.5b")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "harmon-bench"),
                   help="where the random checkpoint (and the reference outputs) are written; reused")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results here")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per process")
    p.add_argument("--image-px", type=int, default=256,
                   help="side of the generated image (a multiple of 16; 0: no image, for a slow dtype)")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens decoded after the prompt")
    p.add_argument("--part", choices=["both", "none", "int8"], default="both",
                   help="run only the unquantized process (none) or only the int8 one (after none: it compares "
                   "with the outputs none saved); --out then gathers both")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    t0 = time.perf_counter()
    earlier = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else {}
    same = all(earlier.get(k) == v for k, v in (("config", args.config), ("dtype", args.dtype),
                                                ("image_px", args.image_px), ("decode_tokens", args.decode_tokens)))
    result = run(args, earlier if same and args.part != "both" else {})
    result[f"wall_s_{args.part}"] = time.perf_counter() - t0
    if "none" in result and "int8" in result:
        report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
