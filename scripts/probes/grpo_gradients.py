"""Where the GRPO gradient of the shipped shapes model comes from, and how much of it is signal.

Usage: python scripts/probes/grpo_gradients.py [ROLLOUTS]   (default 6; ~1 minute per rollout on 2 cores)

Draws ROLLOUTS independent rollouts of the same 4 prompts x 8 images (rollouts at 20 diffusion steps, as
grpo_shapes.py; each rollout its own image seeds), scores them with the world's evaluator and prints

1. for the first rollout, the gradient norm of the GRPO loss (diffusion head; MAR decoder) when only the
   reverse step of index s (t = 19 .. 1) of every MAR iteration is trained;
2. the mean cosine between the gradients of two disjoint sets of rollouts (1, 2, 3 and ROLLOUTS // 2 rollouts
   each), with the trained steps drawn from the noisiest half of each chain (``grpo.noisiest`` 0.5) and from
   the whole chain (1.0). Independent estimates of the same expected gradient g with noise of variance s2 per
   image agree with cosine ~ |g|^2 / (|g|^2 + s2 / n) at n images each: a cosine near 0 says that the update
   of a step of n images is noise, and how it grows with n says how many images a step needs.

Measured in docs/shapes.md ("Reward fine-tuning (GRPO)").
"""
from __future__ import annotations

import argparse

import torch

from harmon.hub import load_pretrained
from harmon.shapes import world
from harmon.shapes.reward import ShapesReward
from harmon.train.config import GRPOConfig
from harmon.train.grpo import GRPOPolicy, Rollout, choose_reverse_steps, group_advantages

PROMPTS, GROUP = 4, 8


def gradient(policy: GRPOPolicy, rollout: Rollout, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The GRPO loss's gradient over ``params``, flattened (zeros where a parameter gets none)."""
    policy.model.zero_grad(set_to_none=True)
    policy(rollout)["loss"].backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def main() -> None:
    p = argparse.ArgumentParser(description="Per-step gradient norms and gradient agreement of GRPO rollouts.")
    p.add_argument("rollouts", type=int, nargs="?", default=6)
    args = p.parse_args()
    if args.rollouts < 2:
        p.error("ROLLOUTS must be at least 2 (the agreement is measured between pairs)")
    model, tokenizer = load_pretrained(None, dtype=torch.float32)
    head = [p for n, p in model.named_parameters() if n.startswith("mar.diffloss.")]
    decoder = [p for n, p in model.named_parameters() if "decoder" in n and not n.startswith("mar.diffloss.")]
    n_head, n_decoder = sum(p.numel() for p in head), sum(p.numel() for p in decoder)
    records = [r for r in world.make_prompts(PROMPTS, 12345) for _ in range(GROUP)]
    policy = GRPOPolicy(model, GRPOConfig(prompts="-", reward="-", generation={"num_steps": 20}))
    reward = ShapesReward()
    grads: dict[float, list[torch.Tensor]] = {0.5: [], 1.0: []}
    for r in range(args.rollouts):
        rollout, images = policy.rollout(tokenizer, [x["prompt"] for x in records],
                                         [1000 * r + i for i in range(len(records))])
        rollout.rewards = torch.tensor(reward(images, records), dtype=torch.float32)
        rollout.advantages = group_advantages(rollout.rewards, GROUP)
        print(f"rollout {r}: mean reward {rollout.rewards.mean():.3f}", flush=True)
        if r == 0:
            for s, step in enumerate(rollout.trace[0].steps):
                rollout.trained_steps = [[s] if s < len(it.steps) else [] for it in rollout.trace]
                g_head, g_dec = gradient(policy, rollout, head + decoder).split([n_head, n_decoder])
                g_head, g_dec = g_head.norm(), g_dec.norm()
                print(f"  only step {s:2d} (t = {step.t:3d}) trained: gradient norm head {g_head:.3e}, "
                      f"MAR decoder {g_dec:.3e}")
        for share, kept in grads.items():
            rollout.trained_steps = choose_reverse_steps(rollout.trace, 4, r, share)
            kept.append(gradient(policy, rollout, head + decoder))
    for share, kept in grads.items():
        half = args.rollouts // 2
        for size in sorted({1, 2, 3, half} & set(range(1, half + 1))):
            cos = torch.tensor(split_cosines(kept, size))
            print(f"noisiest {share}: cosine between the gradients of two disjoint sets of {size} rollouts "
                  f"({size * len(records)} images each): mean {cos.mean():.4f} over {len(cos)} pairs "
                  f"({cos.min():.3f} .. {cos.max():.3f})")


def split_cosines(grads: list[torch.Tensor], size: int, draws: int = 20) -> list[float]:
    """Cosines between the mean gradients of two disjoint sets of ``size`` rollouts: every pair for ``size``
    1, else ``draws`` random splits (a fixed generator)."""
    n = len(grads)
    if size == 1:
        return [torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=0).item()
                for i in range(n) for j in range(i + 1, n)]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(draws):
        order = torch.randperm(n, generator=g).tolist()
        a = torch.stack([grads[i] for i in order[:size]]).mean(0)
        b = torch.stack([grads[i] for i in order[size:2 * size]]).mean(0)
        out.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    return out


if __name__ == "__main__":
    main()
