"""The shapes world of SHAPES.md: scenes, a seeded sampler per prompt family, a renderer, captions and questions.

Everything is a pure function of its arguments: randomness comes only from the
``numpy.random.Generator`` passed in (see :func:`make_rng` for named streams),
never from global state, so the same seed always gives the same scenes,
prompts, images and files.

Coordinates are pixels of the scene's canvas (``Scene.size``, default 64), x to
the right and y downwards; an object's ``size`` is the side of its bounding
box (circle: diameter; square: side; triangle: base and height, pointing up).
A scene can be rendered at any other size: it is scaled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
# well separated in RGB and against the background (the smallest pairwise distance is about 100)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 40),
    "green": (30, 160, 60),
    "blue": (35, 80, 220),
    "yellow": (240, 220, 10),
    "purple": (140, 40, 175),
    "orange": (250, 120, 0),
}
BACKGROUND = (242, 242, 236)
DEFAULT_SIZE = 64

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten"}
QUESTION_TYPES = ("describe", "color", "count", "position", "shape")
# what a scene holds, for splitting the understanding scores (see scene_kind)
SCENE_KINDS = ("one_object", "different_objects", "alike_objects")
DESCRIBE_QUESTION = "Describe the image."

# GenEval's rule for relative positions: centres compared after removing this fraction of both boxes' sizes
POSITION_THRESHOLD = 0.1
# describe() names a relation between two objects when its direction dominates this much
CLEAR_RELATION = 0.75
# yes/no position questions are only asked when the answer is this clear (yes above HIGH, no below LOW)
QUESTION_YES, QUESTION_NO = 0.8, 0.3

# named random streams, so training data, evaluation prompts and evaluation scenes never share draws
STREAMS = {"train": 1, "eval_prompts": 2, "eval_scenes": 3, "eval_seeds": 4, "eval_inpaint": 5, "eval_context": 6}


def make_rng(seed: int, stream: str | int = "train", index: int | None = None) -> np.random.Generator:
    """A numpy Generator for ``seed`` on a named stream (``train``, ``eval_prompts``, ``eval_scenes``, ...),
    optionally for one ``index`` in it (independent per item, so a longer run starts with the shorter one)."""
    if int(seed) < 0:
        raise InputError(f"seeds must be >= 0, got {seed}")
    code = STREAMS[stream] if isinstance(stream, str) else int(stream)
    entropy = [int(seed), code] + ([] if index is None else [int(index)])
    return np.random.default_rng(entropy)


# -- scenes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, bounding-box centre and size in canvas pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def width(self) -> float:
        return self.size

    @property
    def height(self) -> float:
        return self.size

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "cx": self.cx, "cy": self.cy, "size": self.size}


@dataclass(frozen=True)
class Scene:
    """Objects on a canvas of ``size`` pixels, with the family and prompt they were sampled for."""

    objects: tuple[Obj, ...]
    size: int = DEFAULT_SIZE
    category: str = ""
    prompt: str = ""
    include: tuple = ()
    exclude: tuple = ()
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "category": self.category, "prompt": self.prompt,
                "objects": [o.to_dict() for o in self.objects],
                "include": [dict(i) for i in self.include], "exclude": [dict(e) for e in self.exclude]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        objs = tuple(Obj(o["shape"], o["color"], float(o["cx"]), float(o["cy"]), float(o["size"]))
                     for o in data["objects"])
        return cls(objs, int(data.get("size", DEFAULT_SIZE)), data.get("category", ""), data.get("prompt", ""),
                   tuple(data.get("include", ())), tuple(data.get("exclude", ())))

    def geneval_metadata(self) -> dict[str, Any]:
        """The prompt as a GenEval metadata object: tag, include (and exclude), prompt."""
        meta: dict[str, Any] = {"tag": self.category, "include": [dict(i) for i in self.include]}
        if self.exclude:
            meta["exclude"] = [dict(e) for e in self.exclude]
        meta["prompt"] = self.prompt
        return meta


def replace_objects(scene: Scene, objects: Iterable[Obj]) -> Scene:
    """The same scene (prompt, constraints) with other objects: for corrupting scenes in tests."""
    return Scene(tuple(objects), scene.size, scene.category, scene.prompt, scene.include, scene.exclude)


# -- words ----------------------------------------------------------------------------------------
def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def one(color: str, shape: str) -> str:
    """``a red circle``, ``an orange triangle``."""
    return f"{article(color)} {color} {shape}"


def plural(shape: str) -> str:
    return shape + "s"


def number_word(n: int) -> str:
    return NUMBER_WORDS.get(n, str(n))


def many(n: int, color: str, shape: str) -> str:
    """``a red circle`` (n = 1), ``three green circles``."""
    return one(color, shape) if n == 1 else f"{number_word(n)} {color} {plural(shape)}"


def position_phrase(relation: str) -> str:
    """``left of`` -> ``to the left of``; ``above`` / ``below`` unchanged."""
    return f"to the {relation}" if relation in ("left of", "right of") else relation


# -- geometry of relations (GenEval's rule, on boxes) ------------------------------------------------
def relation_vector(a, b) -> tuple[float, float] | None:
    """Direction of ``a`` relative to ``b`` after GenEval's thresholding, or ``None`` when too close.

    ``a`` and ``b`` need ``cx, cy, width, height``. Returns (dx, dy), each in [-1, 1],
    with y downwards; ``dx < -0.5`` means "a left of b" in GenEval.
    """
    off = np.array([a.cx - b.cx, a.cy - b.cy], dtype=np.float64)
    dims = np.array([a.width + b.width, a.height + b.height], dtype=np.float64)
    norm = float(np.hypot(*off))
    if norm == 0:
        return None
    revised = np.maximum(np.abs(off) - POSITION_THRESHOLD * dims, 0) * np.sign(off)
    if np.all(np.abs(revised) < 1e-3):
        return None
    return float(revised[0] / norm), float(revised[1] / norm)


def relation_strength(a, b, relation: str) -> float:
    """How much ``a`` is ``relation`` ``b``: the component of :func:`relation_vector` in that direction."""
    v = relation_vector(a, b)
    if v is None:
        return 0.0
    dx, dy = v
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def relations(a, b, threshold: float = 0.5) -> set[str]:
    """GenEval's relations of ``a`` to ``b``: those whose strength exceeds ``threshold``."""
    return {r for r in RELATIONS if relation_strength(a, b, r) > threshold}


# -- captions and questions (work on scene objects and on detected objects alike) ------------------
def _groups(objects: Sequence) -> list[tuple[str, str, list]]:
    """Objects grouped by (colour, shape), groups ordered by their leftmost member (then topmost)."""
    groups: dict[tuple[str, str], list] = {}
    for o in objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    ordered = sorted(groups.items(), key=lambda kv: min((o.cx, o.cy) for o in kv[1]))
    return [(c, s, objs) for (c, s), objs in ordered]


def describe(objects: Sequence) -> str:
    """The canonical caption of a set of objects (the answer to ``Describe the image.``).

    One kind of object: ``a red circle`` / ``three green circles``. Two different
    objects: ``A to the left of B`` (A the left one) or ``A above B`` (A the upper
    one) when that relation is clear, else ``A and B`` (A the left one). More:
    ``a red circle, two blue squares and a yellow triangle``, left to right.
    """
    objects = list(objects)
    if not objects:
        return "nothing"
    groups = _groups(objects)
    if len(groups) == 1:
        c, s, objs = groups[0]
        return many(len(objs), c, s)
    if len(objects) == 2:
        a, b = sorted(objects, key=lambda o: (o.cx, o.cy))
        if relation_strength(a, b, "left of") >= CLEAR_RELATION:
            return f"{one(a.color, a.shape)} to the left of {one(b.color, b.shape)}"
        top, bottom = sorted(objects, key=lambda o: (o.cy, o.cx))
        if relation_strength(top, bottom, "above") >= CLEAR_RELATION:
            return f"{one(top.color, top.shape)} above {one(bottom.color, bottom.shape)}"
        return f"{one(a.color, a.shape)} and {one(b.color, b.shape)}"
    parts = [many(len(objs), c, s) for c, s, objs in groups]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_kind(objects: Sequence) -> str:
    """Which of :data:`SCENE_KINDS` a set of objects is: one object, objects of different colour or
    shape, or several objects alike (of one colour and shape)."""
    objects = list(objects)
    if not objects:
        raise InputError("a scene without objects has no kind")
    if len(objects) == 1:
        return "one_object"
    return "alike_objects" if len({(o.color, o.shape) for o in objects}) == 1 else "different_objects"


def question_color(shape: str) -> str:
    return f"What color is the {shape}?"


def question_count(shape: str) -> str:
    return f"How many {plural(shape)} are there?"


def question_position(a_color: str, a_shape: str, relation: str, b_color: str, b_shape: str) -> str:
    return f"Is the {a_color} {a_shape} {position_phrase(relation)} the {b_color} {b_shape}?"


def question_shape(color: str) -> str:
    return f"What shape is the {color} object?"


def questions(objects: Sequence, rng: np.random.Generator | None = None) -> list[dict[str, Any]]:
    """Every unambiguous question about these objects: [{"type", "question", "answer", "params"}, ...].

    describe: always; color: for each shape present exactly once; count: for each
    shape present; shape: for each colour present exactly once; position: for each
    ordered pair of objects that are unique in (colour, shape), one relation (drawn
    from ``rng``, else the first clear one), only when the answer is clearly yes
    (strength >= 0.8) or clearly no (<= 0.3). ``params`` lets :func:`answer` answer
    the same question about other objects (e.g. those detected in an image).
    """
    objects = list(objects)
    asked: list[dict[str, Any]] = [{"type": "describe", "question": DESCRIBE_QUESTION, "params": {}}]
    for shape in SHAPES:
        if sum(o.shape == shape for o in objects) == 1:
            asked.append({"type": "color", "question": question_color(shape), "params": {"shape": shape}})
    for shape in SHAPES:
        if any(o.shape == shape for o in objects):
            asked.append({"type": "count", "question": question_count(shape), "params": {"shape": shape}})
    for color in COLORS:
        if sum(o.color == color for o in objects) == 1:
            asked.append({"type": "shape", "question": question_shape(color), "params": {"color": color}})
    unique = [o for o in objects if sum((p.color, p.shape) == (o.color, o.shape) for p in objects) == 1]
    for a in unique:
        for b in unique:
            if a is b:
                continue
            order = list(RELATIONS) if rng is None else [RELATIONS[i] for i in rng.permutation(len(RELATIONS))]
            for rel in order:
                strength = relation_strength(a, b, rel)
                if strength >= QUESTION_YES or strength <= QUESTION_NO:
                    asked.append({"type": "position",
                                  "question": question_position(a.color, a.shape, rel, b.color, b.shape),
                                  "params": {"a": [a.color, a.shape], "relation": rel, "b": [b.color, b.shape]}})
                    break
    for q in asked:
        q["answer"] = answer(objects, q["type"], q["params"])
    return [{"type": q["type"], "question": q["question"], "answer": q["answer"], "params": q["params"]}
            for q in asked]


def answer(objects: Sequence, qtype: str, params: dict[str, Any]) -> str | None:
    """The answer to a question (type and params as in :func:`questions`), ``None`` when it has no single answer."""
    objects = list(objects)
    if qtype == "describe":
        return describe(objects)
    if qtype == "color":
        of_shape = [o for o in objects if o.shape == params["shape"]]
        return of_shape[0].color if len(of_shape) == 1 else None
    if qtype == "count":
        return number_word(sum(o.shape == params["shape"] for o in objects))
    if qtype == "shape":
        of_color = [o for o in objects if o.color == params["color"]]
        return of_color[0].shape if len(of_color) == 1 else None
    if qtype == "position":
        a = [o for o in objects if [o.color, o.shape] == list(params["a"])]
        b = [o for o in objects if [o.color, o.shape] == list(params["b"])]
        if len(a) != 1 or len(b) != 1:
            return None
        return "yes" if relation_strength(a[0], b[0], params["relation"]) > 0.5 else "no"
    raise InputError(f"unknown question type {qtype!r}")


def answer_words() -> set[str]:
    """Every word that captions and answers of the world use (to check that a model speaks its language)."""
    words = set(COLORS) | set(SHAPES) | {plural(s) for s in SHAPES} | set(NUMBER_WORDS.values())
    return words | {"a", "an", "and", "yes", "no"} | {w for r in RELATIONS for w in position_phrase(r).split()}


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing periods."""
    text = " ".join(str(text).lower().split())
    return text.rstrip(".").strip()


# -- sampling --------------------------------------------------------------------------------------
def _size_range(canvas: int, count: int) -> tuple[float, float]:
    """Object sizes (bounding-box side, px): at least 14 px at 64 px (enough for 16x VAE downsampling)."""
    lo = 0.22 * canvas
    hi = {1: 0.34, 2: 0.31, 3: 0.28, 4: 0.25}.get(count, 0.24) * canvas
    return lo, hi


def _gap(canvas: int) -> float:
    return max(3.0, 0.05 * canvas)


def _separated(a: Obj, b: Obj, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _round(v: float) -> float:
    return float(round(v, 2))


def _place(rng: np.random.Generator, specs: Sequence[tuple[str, str]], canvas: int,
           accept=None, tries: int = 500) -> tuple[Obj, ...]:
    """Non-overlapping objects for (shape, colour) specs; ``accept(objs)`` filters whole layouts."""
    lo, hi = _size_range(canvas, len(specs))
    margin, gap = max(2.0, 0.03 * canvas), _gap(canvas)
    for _ in range(tries):
        objs: list[Obj] = []
        for shape, color in specs:
            for _attempt in range(100):
                size = _round(rng.uniform(lo, hi))
                half = size / 2
                cx = _round(rng.uniform(margin + half, canvas - margin - half))
                cy = _round(rng.uniform(margin + half, canvas - margin - half))
                cand = Obj(shape, color, cx, cy, size)
                if all(_separated(cand, o, gap) for o in objs):
                    objs.append(cand)
                    break
            else:
                break
        if len(objs) == len(specs) and (accept is None or accept(objs)):
            return tuple(objs)
    raise RuntimeError(f"could not place {len(specs)} objects on a {canvas}px canvas")


def _pick(rng: np.random.Generator, options: Sequence[str], k: int = 1) -> list[str]:
    """k distinct options."""
    idx = rng.choice(len(options), size=k, replace=False)
    return [options[int(i)] for i in idx]


def _not_borderline(objs: Sequence[Obj]) -> bool:
    """Two-object layouts whose canonical caption is not near the clear-relation threshold."""
    a, b = objs
    best = max(relation_strength(a, b, r) for r in RELATIONS)
    return not (0.65 <= best <= 0.85)


def sample_scene(category: str, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> Scene:
    """One scene of a prompt family (a GenEval category), with its prompt and constraints."""
    if category in ("single_object", "colors"):
        shape, color = _pick(rng, SHAPES)[0], _pick(rng, COLORS)[0]
        objs = _place(rng, [(shape, color)], size)
        include = ({"class": shape, "count": 1, "color": color},)
        return Scene(objs, size, category, one(color, shape), include)
    if category == "counting":
        shape, color = _pick(rng, SHAPES)[0], _pick(rng, COLORS)[0]
        n = int(rng.integers(2, 5))
        objs = _place(rng, [(shape, color)] * n, size)
        return Scene(objs, size, category, many(n, color, shape),
                     ({"class": shape, "count": n, "color": color},), ({"class": shape, "count": n + 1},))
    if category in ("two_object", "color_attr"):
        shapes = _pick(rng, SHAPES, 2)
        colors = _pick(rng, COLORS, 2) if category == "color_attr" else [_pick(rng, COLORS)[0] for _ in range(2)]
        objs = _place(rng, list(zip(shapes, colors)), size, accept=_not_borderline)
        prompt = f"{one(colors[0], shapes[0])} and {one(colors[1], shapes[1])}"
        if category == "two_object":  # GenEval: both classes present (colours are checked by color_attr)
            include = tuple({"class": s, "count": 1} for s in shapes)
        else:
            include = tuple({"class": s, "count": 1, "color": c} for s, c in zip(shapes, colors))
        return Scene(objs, size, category, prompt, include)
    if category == "position":
        while True:
            shapes = [_pick(rng, SHAPES)[0] for _ in range(2)]
            colors = [_pick(rng, COLORS)[0] for _ in range(2)]
            if (shapes[0], colors[0]) != (shapes[1], colors[1]):
                break
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        objs = _place(rng, list(zip(shapes, colors)), size,
                      accept=lambda o: relation_strength(o[0], o[1], rel) >= 0.8)
        prompt = f"{one(colors[0], shapes[0])} {position_phrase(rel)} {one(colors[1], shapes[1])}"
        # GenEval layout: the reference object first, the positioned one second, pointing at index 0
        include = ({"class": shapes[1], "count": 1, "color": colors[1]},
                   {"class": shapes[0], "count": 1, "color": colors[0], "position": [rel, 0]})
        return Scene(objs, size, category, prompt, include)
    raise InputError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")


def sample_scenes(n: int, rng: np.random.Generator, size: int = DEFAULT_SIZE,
                  categories: Sequence[str] = CATEGORIES) -> list[Scene]:
    """``n`` scenes, cycling through ``categories`` so that each gets its share."""
    return [sample_scene(categories[i % len(categories)], rng, size) for i in range(n)]


def make_prompts(n: int, seed: int, size: int = DEFAULT_SIZE,
                 categories: Sequence[str] = CATEGORIES) -> list[dict[str, Any]]:
    """``n`` GenEval-style prompts (categories in turn) drawn from the ``eval_prompts`` stream of ``seed``.

    Each: {"prompt", "category", "tag", "include": [{"class", "count", "color"?, "position"?}], "exclude"?}.
    """
    rng = make_rng(seed, "eval_prompts")
    return [prompt_item(scene) for scene in sample_scenes(n, rng, size, categories)]


def prompt_item(scene: Scene) -> dict[str, Any]:
    """The GenEval-style prompt record of a scene: {"prompt", "category", "tag", "include", "exclude"?}."""
    item = {"prompt": scene.prompt, "category": scene.category, "tag": scene.category,
            "include": [dict(i) for i in scene.include]}
    if scene.exclude:
        item["exclude"] = [dict(e) for e in scene.exclude]
    return item


# -- rendering --------------------------------------------------------------------------------------
def render(scene: Scene, size: int | None = None, *, antialias: bool = True, supersample: int = 4,
           background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """The scene as an RGB image of ``size`` px (default the scene's canvas), flat colours on a light background.

    With ``antialias`` the scene is drawn ``supersample`` times larger and reduced with a box filter.
    """
    size = int(size or scene.size)
    k = supersample if antialias else 1
    big = size * k
    scale = big / scene.size
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x0, y0, x1, y1 = (v * scale for v in o.box)
        fill = PALETTE[o.color]
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise InputError(f"unknown shape {o.shape!r}")
    if k > 1:
        image = image.resize((size, size), Image.Resampling.BOX)
    return image
