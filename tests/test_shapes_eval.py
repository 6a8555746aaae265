"""The shapes analyser (GenEval-style checks) on rendered truth and corrupted scenes, and the model evaluation."""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from harmon.errors import InputError
from harmon.settings import GenerationSettings
from harmon.shapes import detect, report, world
from harmon.shapes.eval_plan import INPAINT_CATEGORIES
from harmon.shapes.eval_understanding import answer_correct
from harmon.shapes.evaluate import ShapesEval, evaluate_inpainting, evaluate_model
from harmon.shapes.world import Obj, Scene



def prompt_of(scene: Scene) -> dict:
    return {"category": scene.category, "tag": scene.category, "include": [dict(i) for i in scene.include],
            "exclude": [dict(e) for e in scene.exclude], "prompt": scene.prompt}


def passes(scene: Scene, size: int | None = None, antialias: bool = True) -> tuple[bool, str]:
    return detect.check(prompt_of(scene), detect.analyze(world.render(scene, size, antialias=antialias)))


def sample(category: str, n: int, seed: int, size: int = world.DEFAULT_SIZE) -> list[Scene]:
    rng = world.make_rng(seed, "train")
    return [world.sample_scene(category, rng, size) for _ in range(n)]


# -- rendered ground truth scores 100% ---------------------------------------------------------------
@pytest.mark.parametrize("size,n", [(64, 300), (256, 200)])
def test_rendered_truth_scores_100_percent(size, n):
    cats, oks = [], []
    for category in world.CATEGORIES:
        for scene in sample(category, n, seed=100):
            image = world.render(scene, size)
            dets = detect.analyze(image)
            ok, why = detect.check(prompt_of(scene), dets)
            assert ok, (size, scene.prompt, why, [d.to_dict() for d in dets])
            assert len(dets) == len(scene.objects)
            cats.append(category)
            oks.append(ok)
            if size == 64:  # what the analyser sees answers every question like the ground truth
                for q in world.questions(scene.objects):
                    assert world.answer(dets, q["type"], q["params"]) == q["answer"], (scene.prompt, q)
    summary = report.summarize(cats, oks)
    assert summary["overall"] == 1.0
    assert set(summary["per_category"]) == set(world.CATEGORIES)
    assert all(c == n for c in summary["counts"].values())


def test_rendered_truth_without_antialiasing_and_with_noise_and_blur():
    noise = np.random.default_rng(0)
    for category in world.CATEGORIES:
        for scene in sample(category, 40, seed=200):
            assert passes(scene, antialias=False)[0], scene.prompt
            blurred = world.render(scene).filter(ImageFilter.GaussianBlur(0.8))
            noisy = np.asarray(blurred, dtype=np.float64) + noise.normal(0, 6, (64, 64, 3))
            image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
            ok, why = detect.check(prompt_of(scene), detect.analyze(image))
            assert ok, (scene.prompt, why)


def test_shapes_colours_and_positions_are_measured():
    for size in (14, 20, 32, 60):
        for shape in world.SHAPES:
            for color in world.COLORS:
                scene = Scene((Obj(shape, color, 40, 40, size),), 80)
                dets = detect.analyze(world.render(scene))
                assert [(d.shape, d.color) for d in dets] == [(shape, color)], (size, shape, color)
                assert abs(dets[0].cx - 40) <= 1 and abs(dets[0].width - size) <= 1.5
    expected_fill = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    for shape, fill in expected_fill.items():
        d = detect.analyze(world.render(Scene((Obj(shape, "blue", 128, 128, 120),), 256)))[0]
        assert abs(d.fill - fill) < 0.03, (shape, d.fill)
    blank = Image.new("RGB", (64, 64), world.BACKGROUND)
    assert detect.analyze(blank) == []
    speck = world.render(Scene((Obj("square", "red", 32, 32, 3),), 64))  # tiny blobs are ignored
    assert detect.analyze(speck) == []


# -- corrupted scenes fail -------------------------------------------------------------------------------
def other_color(color: str, rng) -> str:
    choices = [c for c in world.COLORS if c != color]
    return choices[int(rng.integers(len(choices)))]


def recolor(scene: Scene, index: int, color: str) -> Scene:
    objs = list(scene.objects)
    objs[index] = dataclasses.replace(objs[index], color=color)
    return world.replace_objects(scene, objs)


def add_free_object(scene: Scene, obj_like: Obj, rng) -> Scene | None:
    """The scene with one more object like ``obj_like`` where there is room, else None."""
    half = obj_like.size / 2
    for _ in range(300):
        cx = float(rng.uniform(half + 1, scene.size - half - 1))
        cy = float(rng.uniform(half + 1, scene.size - half - 1))
        cand = dataclasses.replace(obj_like, cx=cx, cy=cy)
        if all(world._separated(cand, o, 3.0) for o in scene.objects):
            return world.replace_objects(scene, scene.objects + (cand,))
    return None


def test_wrong_colour_fails():
    rng = np.random.default_rng(1)
    for category in ("single_object", "colors", "counting", "position", "color_attr"):
        for scene in sample(category, 60, seed=300):
            index = int(rng.integers(len(scene.objects)))
            bad = recolor(scene, index, other_color(scene.objects[index].color, rng))
            if category == "position":  # keep the two objects distinct so the check is about the colour
                if (bad.objects[0].color, bad.objects[0].shape) == (bad.objects[1].color, bad.objects[1].shape):
                    continue
            assert passes(scene)[0]
            assert not passes(bad)[0], (category, scene.prompt)


def test_swapped_colours_fail_attribution_only():
    for scene in sample("color_attr", 100, seed=301):
        a, b = scene.objects
        swapped = world.replace_objects(scene, (dataclasses.replace(a, color=b.color),
                                                dataclasses.replace(b, color=a.color)))
        assert not passes(swapped)[0], scene.prompt
        as_two_objects = Scene(swapped.objects, scene.size, "two_object", scene.prompt,
                               tuple({"class": i["class"], "count": 1} for i in scene.include))
        assert passes(as_two_objects)[0]  # both shapes are still there


def test_moved_object_fails_position():
    tested = 0
    for scene in sample("position", 150, seed=302):
        mover, ref = scene.objects
        # swap the two objects' places: the relation is reversed
        moved = (dataclasses.replace(mover, cx=ref.cx, cy=ref.cy), dataclasses.replace(ref, cx=mover.cx, cy=mover.cy))
        if not all(0 <= v <= scene.size for o in moved for v in o.box) or not world._separated(*moved, 1.0):
            continue
        tested += 1
        assert not passes(world.replace_objects(scene, moved))[0], scene.prompt
        # moving it far along the perpendicular axis breaks the relation as well
    assert tested >= 100
    left = Scene((Obj("circle", "red", 12, 32, 16), Obj("square", "blue", 52, 32, 16)), 64, "position",
                 "a red circle to the left of a blue square",
                 ({"class": "square", "count": 1, "color": "blue"},
                  {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]}))
    assert passes(left)[0]
    above = world.replace_objects(left, (Obj("circle", "red", 50, 10, 16), left.objects[1]))
    assert not passes(above)[0]  # moved above the square, not to its left


def test_missing_object_fails():
    for category in world.CATEGORIES:
        for scene in sample(category, 50, seed=303):
            for drop in range(len(scene.objects)):
                fewer = world.replace_objects(scene, scene.objects[:drop] + scene.objects[drop + 1:])
                assert not passes(fewer)[0], (category, scene.prompt, drop)


def test_extra_object_fails_counting_and_single_object():
    rng = np.random.default_rng(4)
    tested = 0
    for category in ("single_object", "counting"):
        for scene in sample(category, 80, seed=304):
            like = scene.objects[0] if category == "counting" else dataclasses.replace(
                scene.objects[0], shape=world.SHAPES[int(rng.integers(3))], color=world.COLORS[int(rng.integers(6))])
            more = add_free_object(scene, like, rng)
            if more is None:
                continue
            tested += 1
            assert not passes(more)[0], (category, scene.prompt, more.objects[-1])
    assert tested >= 120


def test_summaries_are_geneval_style():
    summary = report.summarize(["counting"] * 3 + ["position"], [True, True, False, True])
    assert summary["per_category"] == {"counting": 2 / 3, "position": 1.0}
    assert summary["overall"] == pytest.approx((2 / 3 + 1.0) / 2)  # mean of categories, not of images
    und = report.summarize_answers(["color", "color", "count"], [True, False, True])
    assert und["per_type"] == {"color": 0.5, "count": 1.0} and und["overall"] == 0.75
    by_kind = report.summarize_by_scene_kind(["alike_objects", "one_object", "alike_objects"],
                                             ["count", "color", "count"], [True, False, False])
    assert list(by_kind) == ["one_object", "alike_objects"]  # in world.SCENE_KINDS order, kinds present only
    assert by_kind["alike_objects"]["per_type"] == {"count": 0.5} and by_kind["one_object"]["overall"] == 0.0
    red, blue = world.Obj("circle", "red", 10, 10, 8), world.Obj("circle", "blue", 30, 10, 8)
    assert [world.scene_kind(objs) for objs in ([red], [red, red], [red, blue], [red, dataclasses.replace(
        red, shape="square")])] == ["one_object", "alike_objects", "different_objects", "different_objects"]
    with pytest.raises(ValueError, match="without objects"):
        world.scene_kind([])
    assert answer_correct(" Red. ", "red") and answer_correct("A red  circle", "a red circle.")
    assert not answer_correct("red circle", "a red circle")


# -- the model evaluation, end to end on the tiny reference model -----------------------------------------------
@pytest.fixture(scope="module")
def tiny(reference_model):
    from harmon.tokenizer import build_byte_tokenizer

    return reference_model, build_byte_tokenizer()


def test_evaluate_model_end_to_end(tiny, tmp_path):
    model, tokenizer = tiny
    printed = []
    out = tmp_path / "eval"
    results = evaluate_model(model, tokenizer, ShapesEval(n_prompts=4, seed=123, n_scenes=2, max_new_tokens=4),
                             GenerationSettings(num_iter=2, num_steps=2, height=64), out_dir=out, echo=printed.append)
    table = printed[0]
    for word in ("generation", "understanding", "overall", "single_object", "describe", "images/s"):
        assert word in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["generation"]["overall"] == results["generation"]["overall"]
    assert 0.0 <= saved["generation"]["overall"] <= 1.0
    assert sum(saved["generation"]["counts"].values()) == 4
    assert saved["generation"]["seconds"] > 0
    assert list(saved["generation"]["per_category"]) == list(world.CATEGORIES[:4])
    assert saved["understanding"]["counts"]["describe"] == 2
    assert all(0.0 <= v <= 1.0 for v in saved["understanding"]["per_type"].values())
    kinds = [item["scene_kind"] for item in saved["understanding"]["items"]]
    assert set(saved["understanding"]["by_scene_kind"]) == set(kinds) and "by scene" in table
    for kind, summary in saved["understanding"]["by_scene_kind"].items():
        assert sum(summary["counts"].values()) == kinds.count(kind)
    prompts = world.make_prompts(4, 123)
    for i, p in enumerate(prompts):
        folder = out / f"{i:05d}"
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 1
        meta = json.loads(lines[0])
        assert meta["prompt"] == p["prompt"] and meta["tag"] == p["category"] and meta["include"] == p["include"]
        with Image.open(folder / "samples" / "0000.png") as im:
            assert im.size == (64, 64)
        assert saved["generation"]["items"][i]["prompt"] == p["prompt"]
    assert not (out / "00004").exists()
    assert saved["settings"]["num_iter"] == 2 and saved["settings"]["num_steps"] == "2"
    assert saved["settings"]["n_prompts"] == 4 and saved["settings"]["n_scenes"] == 2  # the plan beside the settings
    assert saved["settings"]["height"] == saved["settings"]["width"] == 64 and saved["settings"]["model"] == "tiny"
    # without a size the shapes world's (64 px), not the model's own (512 px for the tiny reference model)
    fast = evaluate_model(model, tokenizer, ShapesEval(n_prompts=2, seed=123, understanding=False),
                          GenerationSettings(fast=True, num_iter=4), echo=None)
    assert model.config.image_size == 512 and fast["settings"]["height"] == world.DEFAULT_SIZE
    assert fast["settings"]["fast"] and fast["settings"]["num_iter"] == 4
    assert fast["settings"]["num_steps"] == ["50", "35", "20", "5"]  # the fast mode's steps, annealed 50 -> 5


def test_inpainting_evaluation(tiny, tmp_path):
    model, tokenizer = tiny
    short = GenerationSettings(num_iter=2, num_steps=2)
    res = evaluate_inpainting(model, tokenizer, n_scenes=3, seed=9, settings=short, out_dir=tmp_path, echo=None)
    assert res["object_erased"]["overall"] == 0.0  # the baseline with the object painted over always fails
    for name in ("inpainted", "text_only", "object_erased"):
        assert list(res[name]["per_category"]) == list(INPAINT_CATEGORIES)
        assert sum(res[name]["counts"].values()) == 3
    for item in res["items"]:
        assert 0 < item["regenerated_tokens"] < item["tokens"] == 16
        left, top, right, bottom = item["box"]
        obj = item["masked_object"]
        assert left <= obj["cx"] - obj["size"] / 2 and right >= obj["cx"] + obj["size"] / 2
        assert top <= obj["cy"] - obj["size"] / 2 and bottom >= obj["cy"] + obj["size"] / 2
    saved = json.loads((tmp_path / "inpainting.json").read_text())
    assert saved["settings"]["n_scenes"] == 3 and "text only" in saved["table"]
    assert saved["settings"]["num_iter"] == 2 and saved["settings"]["height"] == world.DEFAULT_SIZE
    assert len(list((tmp_path / "inpainting").glob("*.png"))) == 9
    again = evaluate_inpainting(model, tokenizer, n_scenes=3, seed=9, settings=short, echo=None)
    assert [i["seed"] for i in again["items"]] == [i["seed"] for i in res["items"]]


def test_the_plan_and_the_size_are_checked(tiny):
    for bad, name in ((dict(n_prompts=0), "n_prompts"), (dict(seed=-1), "seed"), (dict(images_per_prompt=0),
                      "images_per_prompt"), (dict(batch_size=0), "batch_size"), (dict(n_scenes=-1), "n_scenes"),
                      (dict(max_new_tokens=0), "max_new_tokens"), (dict(n_prompts=2.5), "n_prompts")):
        with pytest.raises(InputError, match=name):
            ShapesEval(**bad)
    assert ShapesEval(n_prompts=0, generation=False).scenes == 0 and ShapesEval(n_prompts=3).scenes == 3
    with pytest.raises(InputError, match="square"):
        evaluate_model(*tiny, ShapesEval(n_prompts=1), GenerationSettings(height=64, width=128), echo=None)
    with pytest.raises(InputError, match="n_scenes"):
        evaluate_inpainting(*tiny, n_scenes=0, echo=None)


def test_object_tokens_are_the_cells_an_object_mostly_covers():
    from harmon.shapes.context import object_tokens

    pixels = np.full((64, 64, 3), world.BACKGROUND, np.uint8)
    pixels[16:32, 8:28] = world.PALETTE["red"]  # rows 2-3 of 8 px cells; columns 1-2 whole, column 3 half
    cells = object_tokens(Image.fromarray(pixels), 8).reshape(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 1:3] = True
    assert torch.equal(cells, expected)


def test_context_measure_changes_only_what_is_visible(tiny, tmp_path, monkeypatch):
    from harmon.shapes.context import context_use

    model, tokenizer = tiny
    res = context_use(model, tokenizer, n_scenes=6, seed=3, out_dir=tmp_path, batch_size=4, echo=None)
    assert sum(res["counts"].values()) == 6 * res["settings"]["scored_per_scene"]
    assert res["counts"]["background"] > 0 and "visible" in res["table"]
    assert len(set(res["background_loss"])) == 4  # the random decoder reads the visible tokens
    assert res["background_other_prompt_loss"] != res["background_loss"][0]  # ... and its prompt
    assert "other prompt" in res["table"]
    saved = json.loads((tmp_path / "context.json").read_text())
    assert saved["visible_fractions"] == [0.0, 0.3, 0.6, 0.9] and saved["background_loss"] == res["background_loss"]
    again = context_use(model, tokenizer, n_scenes=6, seed=3, batch_size=6, echo=None)  # batching changes nothing
    assert again["background_loss"] == pytest.approx(res["background_loss"], rel=1e-5)
    assert again["object_other_prompt_loss"] == pytest.approx(res["object_other_prompt_loss"], rel=1e-5)
    # a decoder blind to its input gives equal columns: the scored tokens, timesteps and noise are held fixed
    decoder, buffer = model.mar.forward_mae_decoder, model.buffer_size
    monkeypatch.setattr(model.mar, "forward_mae_decoder",
                        lambda x, mask, image_shape: decoder(0 * x[:, :buffer], torch.ones_like(mask), image_shape))
    blind = context_use(model, tokenizer, n_scenes=6, seed=3, batch_size=4, echo=None)
    assert len(set(blind["background_loss"] + [blind["background_other_prompt_loss"]])) == 1
    with pytest.raises(ValueError, match="visible fractions"):
        context_use(model, tokenizer, n_scenes=1, fractions=(0.0, 1.0), echo=None)


def test_eval_cli(tiny, tiny_fixture_dir, tmp_path, capsys):
    from harmon.cli.evaluate import add_parsers as add_eval_parser

    parser = argparse.ArgumentParser(prog="harmon")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    args = parser.parse_args(["eval", "shapes", "--model", str(tiny_fixture_dir), "--n", "2", "--seed", "5", "--out", str(out),
                              "--num-iter", "2", "--num-steps", "2", "--device", "cpu", "--no-understanding",
                              "--context", "2", "-q"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "results.json" in text and "context use" in text
    assert json.loads((out / "context.json").read_text())["settings"]["n_scenes"] == 2
    assert json.loads((out / "results.json").read_text())["settings"]["n_prompts"] == 2
    assert (out / "00001" / "samples" / "0000.png").is_file()
    bad = parser.parse_args(["eval", "shapes", "--model", str(tiny_fixture_dir), "--n", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError):
        bad.func(bad)
    assert parser.parse_args(["eval", "shapes"]).model is None  # the shipped model
