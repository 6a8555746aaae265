"""GenerationSettings and DecodingSettings: each rule once, errors naming the field, resolution per model."""
from __future__ import annotations

import dataclasses

import pytest

from harmon.config import shapes, tiny
from harmon.errors import InputError
from harmon.settings import FAST_STEPS, DecodingSettings, GenerationSettings, annealed_steps


@pytest.mark.parametrize("changes, field", [
    ({"guidance_scale": 0.5}, "guidance_scale"), ({"guidance_scale": float("inf")}, "guidance_scale"),
    ({"guidance_scale": True}, "guidance_scale"), ({"cfg_schedule": "cosine"}, "cfg_schedule"),
    ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"num_iter": 0}, "num_iter"), ({"num_iter": 2.0}, "num_iter"), ({"num_steps": 1}, "num_steps"),
    ({"num_steps": 1001}, "num_steps"), ({"num_steps": ""}, "num_steps"), ({"num_steps": []}, "num_steps"),
    ({"num_steps": True}, "num_steps"), ({"fast": "yes"}, "fast"), ({"height": 0}, "height"),
    ({"width": "64"}, "width"), ({"vae_tile": 1}, "vae_tile"),
])
def test_bad_generation_settings_are_refused_naming_the_field(changes, field):
    with pytest.raises(InputError, match=field):
        GenerationSettings(**changes)


def test_generation_settings_are_frozen_and_replace_checks_again():
    s = GenerationSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.guidance_scale = 2.0
    assert s.replace(guidance_scale=2.0).guidance_scale == 2.0
    with pytest.raises(InputError, match="guidance_scale"):
        s.replace(guidance_scale=0.0)


def test_resolve_fills_the_models_defaults():
    config = tiny()  # 512 px, 64 iterations, samples with "10"
    s = GenerationSettings().resolve(config)
    assert (s.num_iter, s.num_steps, s.height, s.width) == (64, "10", 512, 512)
    assert GenerationSettings(height=256).resolve(config).width == 256
    assert GenerationSettings(num_steps=37).resolve(config).num_steps == "37"
    # a model sampling with DDIM respacing keeps that style for a bare count
    assert GenerationSettings(num_steps=37).resolve(shapes()).num_steps == "ddim39"
    assert s.resolve(config) == s  # resolving twice changes nothing


def test_fast_mode_halves_the_iterations_and_anneals_the_steps():
    s = GenerationSettings(fast=True).resolve(shapes())  # 16 iterations -> 8
    assert s.num_iter == 8 and len(s.num_steps) == 8
    assert [int(x[len("ddim"):]) for x in s.num_steps][0] >= FAST_STEPS[0]
    assert annealed_steps(50, 5, 8)[0] == 50 and annealed_steps(50, 5, 8)[-1] == 5
    given = GenerationSettings(fast=True, num_iter=3, num_steps=4).resolve(tiny())
    assert (given.num_iter, given.num_steps) == (3, "4")  # what is given wins over the fast mode


def test_resolve_checks_what_depends_on_the_model():
    with pytest.raises(InputError, match="height must be a positive multiple of 16"):
        GenerationSettings(height=100).resolve(tiny())
    with pytest.raises(InputError, match="3 diffusion step counts for 4 MAR iterations"):
        GenerationSettings(num_steps=(4, 3, 2)).resolve(dataclasses.replace(tiny(), num_iter=4))
    with pytest.raises(InputError, match="num_steps"):
        GenerationSettings(num_steps="ddim1").resolve(tiny())
    per_iteration = GenerationSettings(num_iter=3, num_steps=[4, 3, 2]).resolve(tiny())
    assert per_iteration.num_steps == ("4", "3", "2")
    assert per_iteration.to_dict()["num_steps"] == ["4", "3", "2"]


@pytest.mark.parametrize("changes, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"do_sample": 1}, "do_sample"), ({"temperature": 0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": float("inf")}, "temperature"),
])
def test_bad_decoding_settings_are_refused_naming_the_field(changes, field):
    with pytest.raises(InputError, match=field):
        DecodingSettings(**changes)
