"""Render benchmarks/results.json (from run.py) as the Markdown tables used in docs/performance.md.

    .venv/bin/python benchmarks/tables_md.py [benchmarks/results.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 2**30


def main(path: str) -> None:
    """Print every table of the results file at ``path``."""
    r = json.loads(Path(path).read_text())
    runs = [x for x in r["runs"] if "error" not in x]
    _machine(r, runs)
    _text_to_image(runs)
    ext = [x for x in runs if "extrapolated" in x["t2i"]]
    if ext:
        _extrapolated(ext)
    _image_to_text(runs)
    _memory(runs, r.get("load_check"))


def _machine(r: dict, runs: list[dict]) -> None:
    """The machine, and the matmul peak and load average of every process at its start and end."""
    m = r["machine"]
    print(f"Machine: {m['cpu']}, {m['logical_cpus']} CPUs, {', '.join(m['isa'])}; torch {m['torch']}, "
          f"{m['torch_threads']} threads; benchmark wall time {r['wall_s']:.0f} s.\n")
    print("| process | fp32 GFLOP/s start / end | bf16 GFLOP/s start / end | load avg start / end |")
    print("|---|---|---|---|")
    print(f"| orchestrator | {r['matmul_peak_gflops']['float32']:.0f} / {r['matmul_peak_gflops_end']['float32']:.0f} | "
          f"{r['matmul_peak_gflops']['bfloat16']:.0f} / {r['matmul_peak_gflops_end']['bfloat16']:.0f} | |")
    for x in runs:
        a, b = x["matmul_peak_gflops"], x["matmul_peak_gflops_end"]
        print(f"| {x['config']} {x['dtype']} | {a['float32']:.0f} / {b['float32']:.0f} | {a['bfloat16']:.0f} / "
              f"{b['bfloat16']:.0f} | {x['loadavg_start'][0]:.1f} / {x['loadavg_end'][0]:.1f} |")


def _text_to_image(runs: list[dict]) -> None:
    """The measured text-to-image run of each model, by component."""
    print("\n### Text-to-image, measured (1 image, cfg 3.0, best of 2 runs)\n")
    names = ["llm_prefill", "mar_encoder", "projections", "llm", "mar_decoder", "diffusion_head",
             "diffusion_sampler_rest", "vae_decoder", "other (masking, noise, glue)"]
    head = " | ".join(f"{x['config']} {x['dtype']}" for x in runs)
    print(f"| component | {head} |")
    print("|---|" + "---|" * len(runs))
    print("| settings | " + " | ".join(f"{x['t2i']['image_px']} px, {x['t2i']['num_iter']} it, {x['t2i']['num_steps']} "
                                      f"steps" for x in runs) + " |")
    for n in names:
        cells = []
        for x in runs:
            c = x["t2i"]["components"].get(n)
            if c is None:
                cells.append("–")
                continue
            extra = f", {c['gflops']:.0f} GF/s = {c['pct_of_peak']:.0f}%" if c.get("gflops") else ""
            cells.append(f"{c['seconds']:.3f} s ({c['pct_of_total']:.0f}%{extra})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("| **total** | " + " | ".join(f"**{x['t2i']['total_s']:.2f} s** (sum {x['t2i']['sum_of_components_s']:.2f})"
                                      for x in runs) + " |")
    print("| transformer parts | " + " | ".join(
        f"{x['t2i']['transformer_parts']['gflops']:.0f} GFLOP/s = {x['t2i']['transformer_parts']['pct_of_peak']:.0f}% "
        f"of {x['matmul_peak_gflops_best'][x['dtype']]:.0f}" for x in runs) + " |")


def _extrapolated(ext: list[dict]) -> None:
    """The extrapolation to the original's schedule, its probes, and the exact shortcuts' savings."""
    print("\n### Text-to-image extrapolated to the original's schedule (256 px, 64 iterations x 100 steps)\n")
    print("| component | " + " | ".join(f"{x['config']} {x['dtype']}" for x in ext) + " |")
    print("|---|" + "---|" * len(ext))
    for k in ext[0]["t2i"]["extrapolated"]["components_s"]:
        print(f"| {k} | " + " | ".join(
            f"{x['t2i']['extrapolated']['components_s'][k]:.1f} s ({x['t2i']['extrapolated']['components_pct'][k]:.0f}%)"
            for x in ext) + " |")
    print("| **seconds per image** | " + " | ".join(
        f"**{x['t2i']['extrapolated']['seconds_per_image']:.0f} s**" for x in ext) + " |")
    print("\nProbes (best of 3 rounds): diffusion-head net per call at 2n rows, n = tokens sampled per iteration:\n")
    for x in ext:
        p = x["t2i"]["extrapolated"]["probes"]
        hn = ", ".join(f"n={k}: {v * 1e3:.1f} ms" for k, v in p["head_net_s_by_tokens_per_iter"].items())
        print(f"* {x['config']} {x['dtype']}: {hn}; MAR decoder {p['mar_decoder_call_s'] * 1e3:.0f} ms per call; "
              f"LLM (2 rows) at 0/128/255 visible: "
              + "/".join(f"{v * 1e3:.0f}" for v in p["llm_2rows_s"].values()) + " ms; MAR encoder (1 row): "
              + "/".join(f"{v * 1e3:.0f}" for v in p["mar_encoder_1row_s"].values()) + " ms")

    print("\n### Exact-output speed-ups vs the original's schedule of work\n")
    print("| | " + " | ".join(f"{x['config']} {x['dtype']}" for x in ext) + " |")
    print("|---|" + "---|" * len(ext))
    rows = [("MAR encoder over 64 iterations, 1 row (ours)", "mar_encoder_once_s", "{:.2f} s"),
            ("MAR encoder over 64 iterations, 2 rows (original)", "mar_encoder_twice_s", "{:.2f} s"),
            ("saved per image", "mar_encoder_saved_s", "{:.2f} s"),
            ("saved, % of the extrapolated image", "mar_encoder_saved_pct_of_image", "{:.1f}%"),
            ("diffusion sampling of one iteration (N tokens, 100 steps), cond-only state (ours)",
             "head_sample_cond_only_s_per_iter", "{:.3f} s"),
            ("same, cond+uncond state (original)", "head_sample_cond_uncond_s_per_iter", "{:.3f} s"),
            ("head net, N rows", "head_net_N_rows_s", "{:.4f} s"),
            ("head net, 2N rows", "head_net_2N_rows_s", "{:.4f} s")]
    for label, key, spec in rows:
        print(f"| {label} | " + " | ".join(spec.format(x['t2i']['extrapolated']['exact_speedups'][key])
                                         for x in ext) + " |")


def _image_to_text(runs: list[dict]) -> None:
    """Image-to-text prefill and decoding of each model."""
    print("\n### Image-to-text (256-px image, greedy, 16 tokens)\n")
    print("| | " + " | ".join(f"{x['config']} {x['dtype']}" for x in runs) + " |")
    print("|---|" + "---|" * len(runs))
    rows = [("prompt tokens (visual)", lambda i: f"{i['prompt_tokens']} ({i['visual_tokens']})"),
            ("VAE encoder", lambda i: f"{i['vae_encoder_s']:.3f} s"),
            ("MAR encoder + proj_in", lambda i: f"{i['mar_encoder_proj_s']:.3f} s"),
            ("LLM prefill (+ first token)", lambda i: f"{i['llm_prefill_s']:.3f} s"),
            ("time to first token", lambda i: f"{i['time_to_first_token_s']:.2f} s"),
            ("prefill tokens/s", lambda i: f"{i['prefill_tokens_per_s']:.0f}"),
            ("prefill GFLOP/s (% peak)", lambda i: f"{i['prefill_gflops']:.0f} ({i['prefill_pct_of_peak']:.0f}%)"),
            ("decode tokens/s", lambda i: f"{i['decode_tokens_per_s']:.1f}"),
            ("decode: weight bytes read/s", lambda i: f"{i['decode_weight_gbytes_per_s']:.1f} GB/s")]
    for label, fn in rows:
        print(f"| {label} | " + " | ".join(fn(x["i2t"]) for x in runs) + " |")


def _memory(runs: list[dict], lc: dict | None) -> None:
    """Each worker's peak memory against its weights, and the loading check."""
    print("\n### Memory\n")
    print("| | weights | peak RSS (build + all runs) | ratio |")
    print("|---|---|---|---|")
    for x in runs:
        print(f"| {x['config']} {x['dtype']} | {x['weights_bytes'] / GIB:.2f} GiB | {x['peak_rss_bytes'] / GIB:.2f} GiB | "
              f"{x['peak_rss_bytes'] / x['weights_bytes']:.2f}x |")
    if lc and "error" not in lc:
        print(f"\nLoading check, {lc['config']} {lc['dtype']}, `load_model` in a fresh process: weights "
              f"{lc['weights_bytes'] / GIB:.2f} GiB; peak RSS after reading every weight {lc['peak_rss_bytes'] / GIB:.2f} GiB "
              f"= **{lc['peak_over_weights']:.2f}x** the weights ({lc['peak_minus_base_over_weights']:.2f}x counting only "
              f"what loading added to the {lc['rss_before_load_bytes'] / GIB:.2f} GiB after imports); target <= 1.2x. "
              f"`load_model` itself returned in {lc['load_s']:.1f} s at {lc['peak_rss_after_load_bytes'] / GIB:.2f} GiB: "
              f"the tensors are memory-mapped from the file and read on first use "
              f"({lc['rss_split_after_touch_bytes'].get('RssFile', 0) / GIB:.2f} GiB file-backed, "
              f"{lc['rss_split_after_touch_bytes'].get('RssAnon', 0) / GIB:.2f} GiB anonymous after reading).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(Path(__file__).resolve().parent / "results.json"),
                        help="the JSON that run.py wrote (default: benchmarks/results.json)")
    main(parser.parse_args().results)
