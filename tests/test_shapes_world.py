"""The shapes world: sampling, captions, questions, rendering and the dataset writers (SHAPES.md)."""
from __future__ import annotations

import hashlib
import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

from harmon.shapes import world
from harmon.shapes.datasets import write_datasets
from harmon.shapes.world import Obj, Scene

PROMPT_FORMS = {
    "single_object": r"^an? (\w+) (circle|square|triangle)$",
    "colors": r"^an? (\w+) (circle|square|triangle)$",
    "counting": r"^(two|three|four) (\w+) (circles|squares|triangles)$",
    "two_object": r"^an? \w+ (circle|square|triangle) and an? \w+ (circle|square|triangle)$",
    "color_attr": r"^an? \w+ (circle|square|triangle) and an? \w+ (circle|square|triangle)$",
    "position": r"^an? \w+ (circle|square|triangle) (to the left of|to the right of|above|below) "
                r"an? \w+ (circle|square|triangle)$",
}


def scenes(n_per_category, seed=0, size=world.DEFAULT_SIZE):
    rng = world.make_rng(seed)
    return [world.sample_scene(c, rng, size) for c in world.CATEGORIES for _ in range(n_per_category)]


def test_palette_is_well_separated():
    colors = {k: np.array(v, dtype=float) for k, v in world.PALETTE.items()}
    assert set(colors) == set(world.COLORS)
    for a, b in itertools.combinations(colors, 2):
        assert np.linalg.norm(colors[a] - colors[b]) > 95, (a, b)
    bg = np.array(world.BACKGROUND, dtype=float)
    assert bg.min() > 200  # light background
    for name, c in colors.items():
        assert np.linalg.norm(c - bg) > 150, name


def test_words_match_the_spec_examples():
    assert world.one("red", "circle") == "a red circle"
    assert world.one("orange", "triangle") == "an orange triangle"
    assert world.many(3, "green", "circle") == "three green circles"
    assert world.many(1, "blue", "square") == "a blue square"
    assert world.question_color("triangle") == "What color is the triangle?"
    assert world.question_count("circle") == "How many circles are there?"
    assert world.question_position("red", "circle", "left of", "blue", "square") == \
        "Is the red circle to the left of the blue square?"
    assert world.question_shape("green") == "What shape is the green object?"
    left = Obj("circle", "red", 14, 32, 16)
    right = Obj("square", "blue", 50, 30, 16)
    assert world.describe([right, left]) == "a red circle to the left of a blue square"
    top = Obj("triangle", "yellow", 32, 12, 16)
    bottom = Obj("square", "purple", 30, 50, 16)
    assert world.describe([bottom, top]) == "a yellow triangle above a purple square"
    diagonal = [Obj("square", "blue", 14, 14, 16), Obj("triangle", "yellow", 46, 46, 16)]
    assert world.describe(diagonal) == "a blue square and a yellow triangle"
    three = [Obj("circle", "green", x, 32, 14) for x in (10, 32, 54)]
    assert world.describe(three) == "three green circles"


def test_sampler_is_deterministic_and_seed_dependent():
    a = [s.to_dict() for s in scenes(5, seed=11)]
    b = [s.to_dict() for s in scenes(5, seed=11)]
    c = [s.to_dict() for s in scenes(5, seed=12)]
    assert a == b
    assert a != c
    assert world.make_prompts(30, 5) == world.make_prompts(30, 5)
    assert world.make_prompts(30, 5) != world.make_prompts(30, 6)
    # evaluation prompts come from another stream than training scenes of the same seed
    train = [s.prompt for s in world.sample_scenes(30, world.make_rng(5, "train"))]
    assert [p["prompt"] for p in world.make_prompts(30, 5)] != train


@pytest.mark.parametrize("size", [64, 256])
def test_scenes_are_valid_for_every_family(size):
    for scene in scenes(60, seed=3, size=size):
        objs = scene.objects
        assert re.match(PROMPT_FORMS[scene.category], scene.prompt), scene.prompt
        for o in objs:
            assert o.shape in world.SHAPES and o.color in world.COLORS
            assert o.size >= 0.22 * size - 1e-6  # >= 14 px at 64 px: survives 16x downsampling
            x0, y0, x1, y1 = o.box
            assert x0 >= 0 and y0 >= 0 and x1 <= size and y1 <= size
        for a, b in itertools.combinations(objs, 2):
            assert world._separated(a, b, 2.0), scene.prompt
        n = len(objs)
        if scene.category in ("single_object", "colors"):
            assert n == 1 and scene.prompt == world.one(objs[0].color, objs[0].shape)
        elif scene.category == "counting":
            assert 2 <= n <= 4 and len({(o.shape, o.color) for o in objs}) == 1
            assert scene.include[0]["count"] == n and scene.exclude[0]["count"] == n + 1
        elif scene.category in ("two_object", "color_attr"):
            assert n == 2 and objs[0].shape != objs[1].shape
            if scene.category == "color_attr":
                assert objs[0].color != objs[1].color
                assert all("color" in item for item in scene.include)
        elif scene.category == "position":
            relation = scene.include[1]["position"][0]
            assert scene.include[1]["position"][1] == 0
            assert relation in world.relations(objs[0], objs[1])
            assert world.relation_strength(objs[0], objs[1], relation) >= 0.8


def test_make_prompts_structure():
    prompts = world.make_prompts(12, 1)
    assert [p["category"] for p in prompts] == list(world.CATEGORIES) * 2
    for p in prompts:
        assert p["tag"] == p["category"]
        assert re.match(PROMPT_FORMS[p["category"]], p["prompt"])
        for item in p["include"]:
            assert item["class"] in world.SHAPES and item["count"] >= 1
            assert item.get("color", "red") in world.COLORS
        json.dumps(p)  # serialisable as GenEval metadata


def test_questions_have_one_right_answer():
    rng = world.make_rng(2)
    seen = set()
    for scene in scenes(40, seed=4):
        qs = world.questions(scene.objects, rng)
        assert qs[0] == {"type": "describe", "question": "Describe the image.",
                         "answer": world.describe(scene.objects), "params": {}}
        texts = [q["question"] for q in qs]
        assert len(texts) == len(set(texts))
        for q in qs:
            seen.add(q["type"])
            assert q["answer"] is not None
            assert q["answer"] == world.answer(scene.objects, q["type"], q["params"])
            if q["type"] == "color":  # only asked when that shape is there exactly once
                shape = q["params"]["shape"]
                assert sum(o.shape == shape for o in scene.objects) == 1
            if q["type"] == "shape":
                assert sum(o.color == q["params"]["color"] for o in scene.objects) == 1
            if q["type"] == "position":
                assert q["answer"] in ("yes", "no")
                a = next(o for o in scene.objects if [o.color, o.shape] == q["params"]["a"])
                b = next(o for o in scene.objects if [o.color, o.shape] == q["params"]["b"])
                strength = world.relation_strength(a, b, q["params"]["relation"])
                assert strength >= 0.8 if q["answer"] == "yes" else strength <= 0.3
    assert seen == set(world.QUESTION_TYPES)
    # ambiguous questions are not asked: two circles -> no "What color is the circle?"
    two = [Obj("circle", "red", 14, 32, 16), Obj("circle", "blue", 50, 32, 16)]
    qs = {q["question"]: q["answer"] for q in world.questions(two)}
    assert "What color is the circle?" not in qs
    assert qs["How many circles are there?"] == "two"
    assert qs["What shape is the red object?"] == "circle"
    assert qs["Is the red circle to the left of the blue circle?"] == "yes"
    assert qs["Is the blue circle to the left of the red circle?"] == "no"


def test_normalize_answer():
    assert world.normalize_answer("  A Red   circle. ") == "a red circle"
    assert world.normalize_answer("Yes.") == "yes"
    assert world.normalize_answer("no") != world.normalize_answer("yes")


def test_render_is_deterministic_and_draws_the_objects():
    scene = Scene((Obj("square", "red", 20, 20, 16), Obj("circle", "blue", 44, 44, 16)), 64)
    for antialias in (True, False):
        a, b = world.render(scene, antialias=antialias), world.render(scene, antialias=antialias)
        assert a.size == (64, 64) and a.mode == "RGB"
        assert a.tobytes() == b.tobytes()
        px = np.asarray(a)
        assert tuple(px[0, 0]) == world.BACKGROUND
        assert tuple(px[20, 20]) == world.PALETTE["red"]
        assert tuple(px[44, 44]) == world.PALETTE["blue"]
    big = np.asarray(world.render(scene, 256))
    assert big.shape == (256, 256, 3) and tuple(big[80, 80]) == world.PALETTE["red"]


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_writers_are_reproducible_and_parse(tmp_path):
    n = 30
    a = write_datasets(tmp_path / "a", n, seed=9)
    write_datasets(tmp_path / "b", n, seed=9)
    write_datasets(tmp_path / "c", n, seed=10)
    da, db, dc = (_tree_digest(tmp_path / x) for x in "abc")
    assert da == db
    assert da != dc
    assert len([k for k in da if k.endswith(".png")]) == n

    root = tmp_path / "a"
    info = json.loads(a["data_info"].read_text())
    assert len(info) == n
    t2i = [json.loads(line) for line in a["t2i"].read_text().splitlines()]
    llava = json.loads(a["llava"].read_text())
    records = [json.loads(line) for line in a["scenes"].read_text().splitlines()]
    assert len(t2i) == len(llava) == len(records) == n
    assert json.loads(a["manifest"].read_text())["seed"] == 9
    first_types = set()
    for i, (entry, line, conv, rec) in enumerate(zip(info, t2i, llava, records)):
        assert entry["image"] == f"000000/{i:07d}.png" and entry["annotation"] == f"000000/{i:07d}.json"
        caption = json.loads((root / "annotations" / entry["annotation"]).read_text())["caption"]
        with Image.open(root / "images" / entry["image"]) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
        assert line == {"image": "images/" + entry["image"], "caption": caption}
        assert caption == rec["prompt"] and re.match(PROMPT_FORMS[rec["category"]], caption)
        assert conv["id"] == f"{i:07d}" and conv["image"] == line["image"]
        turns = conv["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        scene = Scene.from_dict(rec)
        asked = [t["value"].removeprefix("<image>\n") for t in turns[0::2]]
        assert asked == [q["question"] for q in rec["questions"]]
        assert sorted(q["type"] for q in rec["questions"]) == sorted(q["type"] for q in world.questions(scene.objects))
        assert turns[asked.index("Describe the image.") * 2 + 1]["value"] == world.describe(scene.objects)
        first_types.add(rec["questions"][0]["type"])
        assert [t["value"] for t in turns[1::2]] == [q["answer"] for q in rec["questions"]]
        # the saved image is exactly the scene's rendering
        with Image.open(root / "images" / entry["image"]) as im:
            assert im.convert("RGB").tobytes() == world.render(scene).tobytes()
    assert len(first_types) > 1  # conversations do not all open with the same question type
    # a longer run starts with the same scenes
    longer = write_datasets(tmp_path / "d", n + 5, seed=9)
    assert [json.loads(x) for x in longer["t2i"].read_text().splitlines()][:n] == t2i


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_datasets(tmp_path, 0, seed=1)
    with pytest.raises(ValueError):
        write_datasets(tmp_path, 3, seed=1, categories=("nonsense",))
