"""Reward fine-tuning (GRPO): config, rewards, the policy's log-probabilities, learning, exact resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from harmon.errors import InputError
from harmon.hub import default_model_folder, load_pretrained
from harmon.pipelines import TextToImagePipeline
from harmon.settings import GenerationSettings
from harmon.shapes import world
from harmon.shapes.reward import ShapesReward
from harmon.train.config import GRPOConfig, TrainConfig
from harmon.train.distributed import World
from harmon.train.grpo import GRPOPolicy, choose_reverse_steps, group_advantages, reward_report
from harmon.train.rewards import load_reward, read_prompt_records
from harmon.train.trainer import train

TINY_FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tiny"
TOY_REWARDS = '''
import numpy as np


class Redness:
    """How much redder than green or blue the image is, on average: the shapes model raises it by drawing red."""

    def __call__(self, images, records):
        out = []
        for image in images:
            a = np.asarray(image, dtype=np.float32) / 255
            out.append(float(np.clip(a[..., 0] - np.maximum(a[..., 1], a[..., 2]), 0, None).mean()))
        return out

    def category(self, record):
        return record["prompt"].split()[-1]


class Brightness:
    """The mean pixel value: a reward on which even a random tiny model's images differ."""

    def __call__(self, images, records):
        return [float(np.asarray(image, dtype=np.float32).mean() / 255) for image in images]

    def category(self, record):
        return "all"


class NotAReward:
    pass
'''


@pytest.fixture()
def toy_rewards(tmp_path, monkeypatch):
    (tmp_path / "toy_rewards.py").write_text(TOY_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "toy_rewards"
    sys.modules.pop("toy_rewards", None)


def grpo_config(model: str, out: Path, prompts: Path, reward: str, **overrides) -> TrainConfig:
    grpo = {"prompts": str(prompts), "reward": reward, "prompts_per_step": 2, "group_size": 4, "reverse_steps": 2,
            "generation": {"num_iter": 2, "num_steps": 6}}
    grpo.update(overrides.pop("grpo", {}))
    settings = {"model": model, "output_dir": str(out), "max_steps": 4, "save_every": 2, "log_every": 1,
                "progress": False, "gradient_checkpointing": False, "grpo": grpo,
                "optim": {"lr": 3e-4, "warmup_ratio": 0.0, "min_lr_ratio": 1.0}}
    settings.update(overrides)
    return TrainConfig.from_dict(settings)


def test_group_advantages_normalise_within_each_group():
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]), 4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-3)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group of equal rewards teaches nothing


@pytest.mark.parametrize("grpo, words", [
    ({"group_size": 1}, "grpo.group_size"),
    ({"clip": 0}, "grpo.clip"),
    ({"kl": -1}, "grpo.kl"),
    ({"noisiest": 0}, "grpo.noisiest"),
    ({"noisiest": 1.5}, "grpo.noisiest"),
    ({"generation": {"guidance": 2}}, "grpo.generation"),
    ({"generation": {"num_iter": 0}}, "grpo.generation"),
    ({"generation": {"self_check": 4}}, "self_check must be 1"),
    ({"prompts_per_step": "4"}, "grpo.prompts_per_step"),
])
def test_grpo_config_is_checked(tmp_path, grpo, words):
    with pytest.raises(InputError, match=words):
        grpo_config("m", tmp_path, tmp_path / "p.json", "a:b", grpo=grpo)


def test_reward_report_gives_means_per_category_and_the_share_of_flat_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    report = reward_report(rewards, ["a"] * 4 + ["b"] * 8, 4, World(0, 1, torch.device("cpu")))
    assert report == pytest.approx({"reward": 5 / 12, "flat_groups": 2 / 3, "reward/a": 1.0, "reward/b": 0.125})


def test_trained_steps_come_from_the_noisiest_share_of_each_chain():
    """Of 19 reverse steps (t = 19 .. 1), ``noisiest=0.5`` draws only among the first 10; 1.0 among all."""
    trace = [SimpleNamespace(steps=[None] * 19) for _ in range(200)]
    half = choose_reverse_steps(trace, 4, 0, noisiest=0.5)
    assert all(len(c) == 4 and max(c) <= 9 for c in half) and {s for c in half for s in c} == set(range(10))
    whole = choose_reverse_steps(trace, 4, 0)
    assert {s for c in whole for s in c} == set(range(19))
    assert choose_reverse_steps(trace[:1], 50, 0, noisiest=0.5) == [list(range(10))]  # fewer than asked: all
    assert choose_reverse_steps([SimpleNamespace(steps=[None])], 4, 0, noisiest=0.01) == [[0]]


def test_a_grpo_run_takes_no_data_and_no_sharding(tmp_path):
    with pytest.raises(InputError, match="leave data out"):
        grpo_config("m", tmp_path, tmp_path / "p.json", "a:b", data={"jsonl": ["x.jsonl"]})
    with pytest.raises(InputError, match="parallel: ddp"):
        grpo_config("m", tmp_path, tmp_path / "p.json", "a:b", parallel="fsdp")


def test_rewards_and_prompt_files_are_checked(tmp_path, toy_rewards):
    assert load_reward(f"{toy_rewards}:Redness").category({"prompt": "a red circle"}) == "circle"
    for name, words in (("no_colon", "module:Name"), ("no_such_module:X", "cannot import"),
                        (f"{toy_rewards}:Missing", "has no"), (f"{toy_rewards}:NotAReward", "lacks")):
        with pytest.raises(InputError, match=words):
            load_reward(name)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "tag": "single_object"}\n"a blue square"\n')
    assert read_prompt_records(path) == [{"prompt": "a red circle", "tag": "single_object"}, {"prompt": "a blue square"}]
    for text, words in (("[]", "no prompts"), ('[{"text": "x"}]', "item 0"), ('["  "]', "item 0"), ("{", "cannot read")):
        path.write_text(text)
        with pytest.raises(InputError, match=words):
            read_prompt_records(path)


def test_shapes_reward_gives_full_and_partial_credit():
    reward = ShapesReward()
    record = world.make_prompts(1, 0, categories=("two_object",))[0]
    a, b = record["include"]
    scene = world.Scene((world.Obj(a["class"], "red", 16, 32, 18), world.Obj(b["class"], "blue", 48, 32, 18)))
    half = world.Scene((world.Obj(a["class"], "red", 32, 32, 20),))
    scores = reward([world.render(scene), world.render(half), world.render(world.Scene(()))], [record] * 3)
    assert scores == [1.0, 0.25, 0.0] and reward.category(record) == "two_object"


def test_the_policy_scores_its_own_rollout_as_drawn():
    """Recomputed from the stored trajectory, each reverse step's log-density equals the sampler's own: the
    policy ratio of the first update is 1 (to float rounding)."""
    model, tokenizer = load_pretrained(None)
    policy = GRPOPolicy(model, GRPOConfig(prompts="p", reward="a:b", group_size=2, reverse_steps=50,
                                          generation={"num_iter": 2, "num_steps": 6}))
    rollout, images = policy.rollout(tokenizer, ["a red circle", "two blue squares"], [1, 2])
    assert len(images) == 2 and [len(it.steps) for it in rollout.trace] == [5, 5]  # t = 5 .. 1
    rollout.advantages = torch.tensor([1.0, -1.0])
    rollout.trained_steps = choose_reverse_steps(rollout.trace, 50, 0)
    out = policy(rollout)
    assert abs(out["loss"].item()) < 1e-4 and out["clip_fraction"].item() == 0.0
    out["loss"].backward()
    assert model.mar.diffloss.net.final_layer.linear.weight.grad.abs().sum() > 0


def test_reward_rises_on_a_toy_reward(tmp_path, toy_rewards):
    """The shipped shapes model, rewarded for red pixels, draws redder images for the same prompts and seeds."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a circle", "a square", "a triangle"]))
    cfg = grpo_config(str(default_model_folder()), tmp_path / "run", prompts, f"{toy_rewards}:Redness",
                      max_steps=12, save_every=12, freeze=["llm"], optim={"lr": 3e-3, "warmup_ratio": 0.0})
    result = train(cfg)
    assert all(set(r) >= {"reward", "loss", "kl", "clip_fraction", "grad_norm"} for r in result.history)
    assert all(0 <= r["flat_groups"] <= 1 for r in result.history)
    assert {k for r in result.history for k in r} >= {"reward/circle", "reward/square", "reward/triangle"}
    settings = GenerationSettings(**cfg.grpo.generation)
    redness = load_reward(f"{toy_rewards}:Redness")
    fixed = [p for p in ("a circle", "a square", "a triangle") for _ in range(6)]

    def mean_reward(folder) -> float:
        images = TextToImagePipeline.from_pretrained(folder)(fixed, settings, seeds=list(range(18)), progress=False)
        return float(np.mean(redness(images.images, [{"prompt": p} for p in fixed])))

    before, after = mean_reward(default_model_folder()), mean_reward(result.final_dir)
    assert after > before + 0.01, (before, after, [round(r["reward"], 3) for r in result.history])


def test_grpo_resumes_exactly_and_exports(tmp_path, toy_rewards):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red circle", "a blue square", "a green triangle"]))
    tiny = {"kl": 0.1, "updates": 2, "generation": {"num_iter": 2, "num_steps": 6, "height": 32}}
    straight = train(grpo_config(str(TINY_FIXTURE), tmp_path / "a", prompts, f"{toy_rewards}:Brightness",
                                 grpo=tiny)).history
    cfg = grpo_config(str(TINY_FIXTURE), tmp_path / "b", prompts, f"{toy_rewards}:Brightness", grpo=tiny)
    train(cfg, stop_after=2)
    result = train(cfg)
    assert [r["loss"] for r in result.history] == [r["loss"] for r in straight[2:]]
    assert [r["kl"] for r in result.history] == [r["kl"] for r in straight[2:]] and straight[-1]["kl"] > 0
    assert result.final_dir is not None and (result.final_dir / "config.json").is_file()
