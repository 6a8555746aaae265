"""The printed report of ``run.py``'s results (the JSON it writes holds every number; see README.md)."""
from __future__ import annotations

GIB = 2**30


def fmt_s(x) -> str:
    """Seconds with 3 decimals below 10 s, 1 above; "-" for None."""
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def fmt(x, spec=".0f") -> str:
    """``x`` formatted with ``spec``; "-" for None."""
    return "-" if x is None else format(x, spec)


def print_report(r: dict) -> None:
    """Print the machine, every model's run, the loading check and the VAE decoding check."""
    m = r["machine"]
    print(f"\nMachine: {m['cpu']}, {m['logical_cpus']} CPUs, ISA {' '.join(m['isa'])}, torch {m['torch']} "
          f"({m['torch_threads']} threads)")
    pk = r["matmul_peak_gflops"]
    print(f"2048x2048 matmul peak (orchestrator): {pk['float32']:.0f} GFLOP/s fp32, {pk['bfloat16']:.0f} bf16")
    for run in r["runs"]:
        if "error" in run:
            print(f"\n[{run['spec']['config']} {run['spec']['dtype']}] FAILED:\n{run['error']}")
            continue
        _print_run(run)
    if r.get("load_check"):
        _print_load_check(r["load_check"])
    for v in r.get("vae_decode", []):
        if "error" in v:
            print(f"\nVAE decoding check FAILED:\n{v['error']}")
            continue
        how = "whole" if v["tile"] == 0 else f"in tiles of {v['tile']} latent cells ({v['tile'] * 16} px)"
        print(f"VAE (KL-16, random weights, {v['dtype']}) decoding one {v['size']} px image {how}: "
              f"{v['seconds']:.1f} s, peak RSS +{v['added_peak_bytes'] / GIB:.2f} GiB")
    print(f"\nbenchmark wall time {r['wall_s']:.0f} s")


def _print_run(run: dict) -> None:
    """One model's text-to-image breakdown (and extrapolation) and image-to-text figures."""
    t = run["t2i"]
    pk = run["matmul_peak_gflops_best"][run["dtype"]]
    pk0, pk1 = run["matmul_peak_gflops"][run["dtype"]], run["matmul_peak_gflops_end"][run["dtype"]]
    print(f"\n== {run['config']} {run['dtype']}: {run['params'] / 1e6:.0f} M params, "
          f"{run['weights_bytes'] / GIB:.2f} GiB weights, peak RSS {run['peak_rss_bytes'] / GIB:.2f} GiB, "
          f"build {run['build_s']:.1f} s")
    print(f"{run['dtype']} matmul peak in this process: {pk0:.0f} GFLOP/s at start, {pk1:.0f} at end (% peak uses "
          f"{pk:.0f}); load average {run['loadavg_start'][0]:.1f} at start, {run['loadavg_end'][0]:.1f} at end")
    print(f"text-to-image, 1 image, {t['image_px']} px, {t['num_iter']} MAR iterations, {t['num_steps']} "
          f"diffusion steps, cfg {t['cfg']}: {t['total_s']:.2f} s (sum of components {t['sum_of_components_s']:.2f} s)")
    print(f"  {'component':30s} {'calls':>6s} {'seconds':>8s} {'% total':>8s} {'GFLOP':>9s} {'GFLOP/s':>8s} "
          f"{'% peak':>7s}")
    for name, c in t["components"].items():
        print(f"  {name:30s} {c['calls']:6d} {fmt_s(c['seconds']):>8s} {fmt(c['pct_of_total'], '.1f'):>8s} "
              f"{fmt(c['gflop'] or None, '.1f'):>9s} {fmt(c['gflops']):>8s} {fmt(c['pct_of_peak'], '.1f'):>7s}")
    tp = t["transformer_parts"]
    print(f"  transformer parts together: {tp['gflop']:.1f} GFLOP in {tp['seconds']:.2f} s = "
          f"{tp['gflops']:.0f} GFLOP/s, {tp['pct_of_peak']:.1f}% of the {run['dtype']} matmul peak")
    if "extrapolated" in t:
        _print_extrapolation(t["extrapolated"])
    i = run["i2t"]
    print(f"image-to-text, {i['image_px']} px image, {i['prompt_tokens']} prompt tokens ({i['visual_tokens']} "
          f"visual): VAE encoder {fmt_s(i['vae_encoder_s'])} s, MAR encoder+proj {fmt_s(i['mar_encoder_proj_s'])} s, "
          f"LLM prefill {fmt_s(i['llm_prefill_s'])} s ({i['prefill_tokens_per_s']:.0f} tok/s, "
          f"{i['prefill_gflops']:.0f} GFLOP/s = {i['prefill_pct_of_peak']:.1f}% peak); decode "
          f"{i['decode_tokens_per_s']:.1f} tok/s ({i['decode_steps_timed']} steps timed, greedy, "
          f"{i['decode_weight_gbytes_per_s']:.1f} GB/s of weights read)")


def _print_extrapolation(e: dict) -> None:
    """Seconds per image at the original's schedule and the exact shortcuts' savings."""
    print(f"  extrapolated to {e['num_iter']} iterations x {e['num_steps']} steps at {e['image_px']} px: "
          f"{e['seconds_per_image']:.1f} s per image")
    print("    " + ", ".join(f"{k} {v:.1f} s ({e['components_pct'][k]:.0f}%)"
                             for k, v in e["components_s"].items()))
    x = e["exact_speedups"]
    print(f"  exact shortcuts at the full schedule: MAR encoder once {x['mar_encoder_once_s']:.2f} s vs twice "
          f"{x['mar_encoder_twice_s']:.2f} s (saves {x['mar_encoder_saved_s']:.2f} s, "
          f"{x['mar_encoder_saved_pct_of_image']:.1f}% of an image); diffusion sampling per iteration "
          f"({x['head_tokens_per_iter']} tokens, {e['num_steps']} steps) cond-only state "
          f"{x['head_sample_cond_only_s_per_iter'] * 1e3:.0f} ms vs cond+uncond "
          f"{x['head_sample_cond_uncond_s_per_iter'] * 1e3:.0f} ms; head net at N vs 2N rows "
          f"{x['head_net_N_rows_s'] * 1e3:.2f} vs {x['head_net_2N_rows_s'] * 1e3:.2f} ms")


def _print_load_check(lc: dict) -> None:
    """Peak memory of loading against the weights' size, and the target."""
    if "error" in lc:
        print(f"\nloading check FAILED:\n{lc['error']}")
        return
    target = lc["target_max_ratio"]
    print(f"\nLoading {lc['config']} {lc['dtype']} with harmon.checkpoint.load_model in a fresh process: "
          f"weights {lc['weights_bytes'] / GIB:.2f} GiB, peak RSS {lc['peak_rss_bytes'] / GIB:.2f} GiB = "
          f"{lc['peak_over_weights']:.2f}x the weights ({lc['peak_minus_base_over_weights']:.2f}x above the "
          f"{lc['rss_before_load_bytes'] / GIB:.2f} GiB after imports; target <= {target}x: "
          f"{'PASS' if lc['peak_over_weights'] <= target else 'FAIL'}), measured after reading every weight once; "
          f"load_model returned in {lc['load_s']:.1f} s with peak RSS {lc['peak_rss_after_load_bytes'] / GIB:.2f} "
          f"GiB (memory-mapped, not yet read), reading all weights took {lc['touch_all_weights_s']:.1f} s; "
          f"after: {lc['rss_split_after_touch_bytes'].get('RssFile', 0) / GIB:.2f} GiB file-backed, "
          f"{lc['rss_split_after_touch_bytes'].get('RssAnon', 0) / GIB:.2f} GiB anonymous")
