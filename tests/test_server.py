"""`harmon serve`: the JSON API over real HTTP, its limits, queue and API key, the CLI, the load test script,
and the web page driven in a real headless Chromium (Debian's chromium + chromedriver, via selenium)."""
from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from harmon.server import Engine, ServerSettings, create_app  # noqa: E402
from harmon.settings import DecodingSettings, GenerationSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_SETTINGS = GenerationSettings(height=64, num_iter=2, num_steps=2)  # the tiny servers' defaults
TINY = dict(generation=TINY_SETTINGS, image_size=64, max_new_tokens=64)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    from harmon.checkpoint import load_model
    from harmon.hub import load_tokenizer

    model = load_model(tiny_model_dir, dtype=torch.float32)
    return Engine(model, load_tokenizer(tiny_model_dir, int(model.config.llm["vocab_size"])), tiny_model_dir, image_size=64)


class Server:
    """A uvicorn server on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post(self, path: str, body, **kw) -> tuple[int, dict]:
        status, _, raw = self.request("POST", path, body, **kw)
        return status, json.loads(raw) if raw and not raw.startswith(b"event") and not raw.startswith(b"data") \
            else raw

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def default_server():
    """A server with the shipped default model and its own settings (as `harmon serve` without --model)."""
    from harmon.checkpoint import load_model
    from harmon.hub import default_model_folder, load_tokenizer

    folder = default_model_folder()
    model = load_model(folder, dtype=torch.float32)
    engine = Engine(model, load_tokenizer(folder, int(model.config.llm["vocab_size"])), folder)
    s = Server(create_app(engine, ServerSettings(image_size=model.config.image_size)))  # the model's defaults
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server(engine):
    s = Server(create_app(engine, ServerSettings(queue_size=2, max_upload_bytes=200_000,
                                                 max_image_pixels=512 * 512, max_prompt_chars=300, **TINY)))
    yield s
    s.stop()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(url: str, *questions_answers: str, **extra) -> dict:
    """A conversation: question, answer, question, ... with the image in the first question."""
    messages = []
    for k, text in enumerate(questions_answers):
        if k == 0:
            content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant" if k % 2 else "user", "content": text})
    return {"messages": messages, **extra}


def sse_data(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return Image.linear_gradient("L").resize((48, 40)).convert("RGB")


# -- the JSON API -----------------------------------------------------------------------------------
def test_images_generation_matches_the_pipeline(server, engine):
    from harmon.pipelines import TextToImagePipeline

    status, body = server.post("/v1/images/generations", {"prompt": "a red circle", "seed": 7, "n": 2})
    assert status == 200, body
    assert [d["seed"] for d in body["data"]] == [7, 8]
    png = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert png.size == (64, 64)
    assert png.text["prompt"] == "a red circle" and png.text["seed"] == "7" and png.text["num_iter"] == "2"
    assert json.loads(png.text["parameters"])["model"] == "tiny"
    # the image alone: drawn in a batch (here of the request's two images) it is the same to the bit
    expected = TextToImagePipeline(engine.model, engine.tokenizer)(
        "a red circle", GenerationSettings(guidance_scale=3.0, num_iter=2, num_steps=2, height=64, width=64),
        seeds=[7], progress=False).images[0]
    assert png.convert("RGB").tobytes() == expected.tobytes()


def test_images_generation_takes_the_settings_by_name(server, engine):
    """Every generation setting a request may give, under the settings' own names, reaches the pipeline and the
    PNG's metadata (the schema of harmon.outputs, as `harmon generate` writes it)."""
    from harmon.pipelines import TextToImagePipeline

    given = {"guidance_scale": 2.5, "cfg_schedule": "linear", "temperature": 0.9, "num_iter": 3, "num_steps": 4,
             "fast": True, "vae_tile": 2}
    status, body = server.post("/v1/images/generations", {"prompt": "a blue square", "seed": 11, "size": "48x32",
                                                          **given})
    assert status == 200, body
    png = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert png.size == (48, 32) and body["size"] == "48x32"
    parameters = json.loads(png.text["parameters"])
    assert {key: parameters[key] for key in given} == {**given, "num_steps": "4"}  # as resolved: a respacing
    assert png.text["fast"] == "True" and png.text["cfg_schedule"] == "linear" and png.text["vae_tile"] == "2"
    expected = TextToImagePipeline(engine.model, engine.tokenizer)(
        "a blue square", GenerationSettings(**given, height=32, width=48), seeds=[11], progress=False).images[0]
    assert png.convert("RGB").tobytes() == expected.tobytes()


def test_images_generation_streams_progress(server):
    status, raw = server.post("/v1/images/generations", {"prompt": "a cat", "seed": 1, "size": "32x48",
                                                         "num_iter": 3, "stream": True})
    assert status == 200
    events = [json.loads(d) for d in sse_data(raw)]
    kinds = [e["type"] for e in events]
    assert kinds == ["image_generation.queued"] + ["image_generation.progress"] * 3 + ["image_generation.completed"]
    assert [e["step"] for e in events[1:4]] == [1, 2, 3] and events[1]["total"] == 3
    image = Image.open(io.BytesIO(base64.b64decode(events[-1]["b64_json"])))
    assert image.size == (32, 48) and image.text["seed"] == "1"


def test_chat_completions_answers_streams_and_keeps_the_conversation(server, engine, picture):
    url = data_url(picture)
    status, body = server.post("/v1/chat/completions", chat_body(url, "What is in the image?", max_tokens=6))
    assert status == 200, body
    answer = body["choices"][0]["message"]["content"]
    expected = "".join(engine.image_to_text.stream(picture, "What is in the image?",
                                                   DecodingSettings(max_new_tokens=6)))
    assert answer == expected
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["finish_reason"] == "length"

    status, raw = server.post("/v1/chat/completions", chat_body(url, "What is in the image?", max_tokens=6,
                                                                stream=True))
    data = sse_data(raw)
    assert status == 200 and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    status, second = server.post("/v1/chat/completions",
                                 chat_body(url, "What is in the image?", answer, "And its colour?", max_tokens=4))
    assert status == 200 and second["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]
    from harmon.pipelines import ChatSession

    session = ChatSession(engine.image_to_text, picture)
    session.ask("What is in the image?", DecodingSettings(max_new_tokens=6))
    assert second["choices"][0]["message"]["content"] == session.ask("And its colour?",
                                                                     DecodingSettings(max_new_tokens=4))


def test_chat_sampling_follows_the_seed(server, engine, picture):
    """A temperature above 0 samples (DecodingSettings(do_sample=True)) from a generator of the request's seed."""
    body = chat_body(data_url(picture), "What is in the image?", max_tokens=5, temperature=0.8, top_p=0.9, seed=5)
    status, answer = server.post("/v1/chat/completions", body)
    assert status == 200, answer
    settings = DecodingSettings(max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.9)
    expected = "".join(engine.image_to_text.stream(picture, "What is in the image?", settings,
                                                   torch.Generator().manual_seed(5)))
    assert answer["choices"][0]["message"]["content"] == expected
    assert server.post("/v1/chat/completions", body)[1]["choices"] == answer["choices"]


def test_page_is_static_and_filled_from_json(server, engine):
    """The page is package data served as it is; its values come from /page.json."""
    status, headers, page = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert page == (Path(create_app.__code__.co_filename).parent / "static" / "index.html").read_bytes()
    for name, kind in (("page.js", "javascript"), ("page.css", "text/css")):
        status, headers, _ = server.request("GET", f"/static/{name}")
        assert status == 200 and kind in headers["content-type"]
    assert server.request("GET", "/static/missing.js")[0] == 404
    status, _, raw = server.request("GET", "/page.json")
    values = json.loads(raw)
    assert status == 200 and values["model"] == engine.name and values["auth"] is False
    assert (values["width"], values["height"], values["num_iter"], values["num_steps"]) == (64, 64, 2, 2)
    assert values["stride"] == 16 and values["max_prompt_chars"] == 300 and values["guidance_scale"] == 3.0


BAD_REQUESTS = [
    ("/v1/images/generations", b"{not json", 400, "invalid_json"),
    ("/v1/images/generations", b"[1, 2]", 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": 5}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "   "}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x" * 301}, 400, "prompt_too_long"),
    ("/v1/images/generations", {"prompt": "x", "size": "65x64"}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "size": "4096x4096"}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "n": 50}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "num_iter": 100000}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "num_steps": 0}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": 0.5}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "guidance_scale": "high"}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "seed": -1}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "temperature": 0}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "temperature": 11}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "num_steps": 2000}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "fast": "sometimes"}, 400, "invalid_value"),
    ("/v1/images/generations", {"prompt": "x", "vae_tile": 0}, 400, "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "no image"}]}, 400, "image_required"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    ("/v1/chat/completions", chat_body("https://example.com/a.png", "q"), 400, "unsupported_image_url"),
    ("/v1/chat/completions", chat_body("data:image/png;base64,!!!!", "q"), 400, "invalid_image"),
    ("/v1/chat/completions", chat_body("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "q"),
     400, "invalid_image"),
    ("/v1/chat/completions", chat_body("data:image/png;base64," + "A" * 300_000, "q"), 413, "image_too_large"),
    ("/v1/chat/completions", chat_body(data_url(Image.new("RGB", (600, 600))), "q"), 400, "image_too_large"),
    ("/v1/chat/completions", chat_body(data_url(Image.new("RGB", (8, 8))), "q", max_tokens=100000), 400,
     "invalid_value"),
    ("/v1/chat/completions", chat_body(data_url(Image.new("RGB", (8, 8))), "q", "a"), 400, None),
    ("/v1/chat/completions", chat_body(data_url(Image.new("RGB", (8, 8))), "q", temperature=-1), 400,
     "invalid_value"),
    ("/v1/chat/completions", chat_body(data_url(Image.new("RGB", (8, 8))), "q", top_p=0), 400, "invalid_value"),
    ("/v1/chat/completions", chat_body(data_url(Image.new("RGB", (8, 8))), " "), 400, None),
    ("/v1/chat/completions", b"x" * 3_000_000, 413, "request_too_large"),
]


@pytest.mark.parametrize("path,body,status,code", BAD_REQUESTS, ids=[f"{k}-{c}" for k, (_, _, _, c) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_clear_json_errors(server, path, body, status, code):
    got, answer = server.post(path, body)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"
    if code:
        assert answer["error"]["code"] == code
    assert server.request("GET", "/health")[0] == 200


# -- image edits ------------------------------------------------------------------------------------
EDIT_PROMPT = "a red square"
EDIT_CASES = [("inpaint", {"box": [8, 8, 40, 24]}, (48, 32)),  # the 48x40 picture is cut to multiples of 16
              ("outpaint", {"extend": [16, 0, 16, 16]}, (80, 48)),
              ("variation", {"strength": 0.5}, (48, 32))]


def edit_body(image: Image.Image, mode: str, **extra) -> dict:
    return {"image": data_url(image), "prompt": EDIT_PROMPT, "mode": mode, "seed": 3, **extra}


@pytest.mark.parametrize("mode,extra,size", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_image_edits_match_the_pipeline(server, engine, picture, mode, extra, size):
    from harmon.outputs import EDIT_KEYS, edit_details
    from harmon.pipelines import EditPipeline, inpaint_region, outpaint_region, variation_region

    status, body = server.post("/v1/images/edits", edit_body(picture, mode, **extra))
    assert status == 200, body
    assert body["size"] == f"{size[0]}x{size[1]}" and isinstance(body["created"], int)
    item = body["data"][0]
    assert item["seed"] == 3 and item["metadata"]["edit_mode"] == mode
    png = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    assert png.size == size
    assert png.text["prompt"] == EDIT_PROMPT and png.text["seed"] == "3" and png.text["edit_mode"] == mode
    assert png.text["num_iter"] == "2" and png.text["num_steps"] == "2" and png.text["guidance_scale"] == "3.0"
    region = {"inpaint": lambda: inpaint_region(picture, tuple(extra["box"])),
              "outpaint": lambda: outpaint_region(picture, *extra["extend"]),
              "variation": lambda: variation_region(picture, 0.5, torch.Generator().manual_seed(3))}[mode]()
    parameters = json.loads(png.text["parameters"])
    assert {key: parameters[key] for key in EDIT_KEYS} == edit_details(mode, region)  # kept and drawn tokens
    assert parameters["model"] == "tiny" and parameters["width"] == size[0] and parameters["height"] == size[1]
    expected = EditPipeline(engine.model, engine.tokenizer)(
        region, EDIT_PROMPT, GenerationSettings(guidance_scale=3.0, num_iter=2, num_steps=2), seed=3).images[0]
    assert png.convert("RGB").tobytes() == expected.tobytes()
    if mode == "inpaint":  # a mask image selecting the same box gives the same edit
        mask = Image.new("L", picture.size, 0)
        mask.paste(255, tuple(extra["box"]))
        status, masked = server.post("/v1/images/edits", edit_body(picture, mode, mask=data_url(mask)))
        assert status == 200, masked
        again = Image.open(io.BytesIO(base64.b64decode(masked["data"][0]["b64_json"])))
        assert again.convert("RGB").tobytes() == expected.tobytes()


BAD_EDITS = [  # (changes to a good inpaint request, status, code, words in the message)
    ({"image": None}, 400, "image_required", "image is required"),
    ({"mode": "paint"}, 400, "invalid_value", "mode must be one of inpaint, outpaint, variation"),
    ({"box": [0, 0, 100, 16]}, 400, "invalid_value", "is not inside the 48x40 image"),
    ({"box": None}, 400, "invalid_value", "inpaint needs a mask"),
    ({"box": [0, 0, 16]}, 400, "invalid_value", "box must be four integers"),
    ({"mode": "outpaint", "extend": [10, 0, 0, 0]}, 400, "invalid_value", "left margin must be a non-negative "
     "multiple of 16"),
    ({"mode": "outpaint", "extend": [0, 0, 0, 0]}, 400, "invalid_value", "at least one margin"),
    ({"mode": "outpaint", "extend": [0, 0, 2048, 0]}, 400, "invalid_value", "width would be 2096 pixels, at most 1024"),
    ({"mode": "variation", "strength": 1.5}, 400, "invalid_value", "strength must be in (0, 1]"),
    ({"mode": "variation", "strength": 0}, 400, "invalid_value", "strength must be in (0, 1]"),
    ({"mode": "variation"}, 400, "invalid_value", "variation needs strength"),
    ({"prompt": "  "}, 400, "invalid_value", "prompt is empty"),
    ({"prompt": "x" * 301}, 400, "prompt_too_long", "at most 300"),
    ({"guidance_scale": 0.5}, 400, "invalid_value", "guidance_scale must be >= 1"),
    ({"guidance_scale": 25}, 400, "invalid_value", "guidance_scale must be at most 20.0"),
    ({"num_iter": 0}, 400, "invalid_value", "num_iter must be >= 1"),
    ({"num_iter": 300}, 400, "invalid_value", "num_iter must be at most 256"),
    ({"cfg_schedule": "wild"}, 400, "invalid_value", "cfg_schedule must be one of 'constant', 'linear'"),
    ({"vae_tile": 1}, 400, "invalid_value", "vae_tile must be None or at least 2"),
    ({"seed": -1}, 400, "invalid_value", "seed must be in"),
    ({"image": "https://example.com/a.png"}, 400, "unsupported_image_url", "not fetched"),
    ({"image": "data:image/png;base64," + "A" * 300_000}, 413, "image_too_large", "larger than"),
    ({"image": data_url(Image.new("RGB", (600, 600)))}, 400, "image_too_large", "more than the 262144"),
    ({"mask": "data:image/png;base64,!!!!", "box": None}, 400, "invalid_image", "malformed"),
    ({"stream": True}, 400, "invalid_value", "stream is not supported"),
    # a lone surrogate is valid JSON syntax but no text: the JSON parser refuses it before any handler
    ({"prompt": "a \ud800 square"}, 400, "invalid_json", "not valid JSON"),
]


def test_png_metadata_is_one_schema_from_every_writer(server, tiny_model_dir, picture, tmp_path, capsys):
    """`harmon generate`, `edit`, `batch` and the server's generations and edits write their PNG text chunks
    with harmon.outputs.image_metadata: the same keys, and for the same request the same values (the edit's
    source file name aside, which a server request does not have)."""
    from harmon.cli import main
    from harmon.outputs import BATCH_KEYS, EDIT_KEYS

    def text_of(png_bytes: bytes) -> dict:
        with Image.open(io.BytesIO(png_bytes)) as im:
            return json.loads(im.text["parameters"])

    tiny = ["--model", str(tiny_model_dir), "--seed", "7", "--num-iter", "2", "--num-steps", "2"]
    source = tmp_path / "source.png"
    picture.crop((0, 0, 48, 32)).save(source)
    assert main(["generate", "a red circle", "--size", "64", "--out", str(tmp_path / "g.png"), "-q", *tiny]) == 0
    assert main(["edit", str(source), "a red square", "--box", "8,8,40,24", "--out", str(tmp_path / "e.png"),
                 *tiny]) == 0
    (tmp_path / "prompts.json").write_text('["a red circle"]')
    assert main(["batch", str(tmp_path / "prompts.json"), "--size", "64", "--out-dir", str(tmp_path / "b"), "-q",
                 *tiny]) == 0
    capsys.readouterr()
    cli = {name: text_of((tmp_path / path).read_bytes())
           for name, path in (("generate", "g.png"), ("edit", "e.png"), ("batch", "b/00000_00.png"))}
    status, generated = server.post("/v1/images/generations", {"prompt": "a red circle", "seed": 7})
    assert status == 200, generated
    status, edited = server.post("/v1/images/edits", edit_body(picture.crop((0, 0, 48, 32)), "inpaint",
                                                             box=[8, 8, 40, 24], seed=7))
    assert status == 200, edited
    served = {name: text_of(base64.b64decode(body["data"][0]["b64_json"]))
              for name, body in (("generate", generated), ("edit", edited))}

    assert served["generate"] == cli["generate"]
    assert set(cli["edit"]) == set(cli["generate"]) | set(EDIT_KEYS)
    assert set(cli["batch"]) == set(cli["generate"]) | set(BATCH_KEYS)
    assert cli["edit"].pop("source_image") == str(source) and served["edit"].pop("source_image") is None
    assert served["edit"] == cli["edit"]


def test_self_check_is_one_setting_from_every_door(server, tiny_model_dir, tmp_path, capsys):
    """`--self-check 2` of `harmon generate` and `batch` and ``"self_check": 2`` of the server draw the same image
    and write the same metadata, with the chosen candidate and its scores; above the server's limit: a 400."""
    from harmon.cli import main
    from harmon.outputs import BATCH_KEYS, SELF_CHECK_KEYS

    tiny = ["--model", str(tiny_model_dir), "--seed", "7", "--num-iter", "2", "--num-steps", "2", "--self-check", "2"]
    assert main(["generate", "a red circle", "--size", "64", "--out", str(tmp_path / "g.png"), "-q", *tiny]) == 0
    (tmp_path / "prompts.json").write_text('["a red circle"]')
    assert main(["batch", str(tmp_path / "prompts.json"), "--size", "64", "--out-dir", str(tmp_path / "b"), "-q",
                 *tiny]) == 0
    capsys.readouterr()
    status, served = server.post("/v1/images/generations", {"prompt": "a red circle", "seed": 7, "self_check": 2})
    assert status == 200, served
    pngs = {"generate": (tmp_path / "g.png").read_bytes(), "batch": (tmp_path / "b/00000_00.png").read_bytes(),
            "server": base64.b64decode(served["data"][0]["b64_json"])}
    texts, pixels = {}, {}
    for name, data in pngs.items():
        with Image.open(io.BytesIO(data)) as im:
            texts[name], pixels[name] = json.loads(im.text["parameters"]), np.asarray(im.convert("RGB"))
    meta = texts["generate"]
    assert meta["self_check"] == 2 and meta["chosen_candidate"] in (0, 1) and len(meta["self_check_scores"]) == 2
    assert set(SELF_CHECK_KEYS) <= set(meta) and texts["server"] == meta
    assert {k: v for k, v in texts["batch"].items() if k not in BATCH_KEYS} == meta
    assert np.array_equal(pixels["generate"], pixels["server"]) and np.array_equal(pixels["generate"], pixels["batch"])
    status, refused = server.post("/v1/images/generations", {"prompt": "a red circle", "self_check": 9})
    assert status == 400 and refused["error"]["param"] == "self_check", refused


@pytest.mark.parametrize("change,status,code,words", BAD_EDITS, ids=[f"{k}-{c}" for k, (_, _, c, _) in
                                                                     enumerate(BAD_EDITS)])
def test_bad_edits_get_clear_json_errors(server, picture, change, status, code, words):
    body = {k: v for k, v in {**edit_body(picture, "inpaint", box=[0, 0, 16, 16]), **change}.items() if v is not None}
    got, answer = server.post("/v1/images/edits", body)
    assert got == status, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["code"] == code
    assert words in answer["error"]["message"], answer["error"]["message"]


def test_truncated_image_and_unknown_routes(server, picture):
    truncated = data_url(picture)[:-200]
    assert server.post("/v1/chat/completions", chat_body(truncated, "q"))[0] == 400
    status, _, raw = server.request("GET", "/no/such/page")
    assert status == 404 and json.loads(raw)["error"]["type"] == "not_found_error"
    assert server.request("GET", "/v1/chat/completions")[0] == 405
    assert server.post("/v1/images/generations", {"prompt": "still fine", "seed": 0})[0] == 200


def test_full_queue_answers_429_at_once(server):
    worker = server.app.state.worker
    gate, running, loop = threading.Event(), threading.Event(), asyncio.new_event_loop()
    try:
        worker.submit(lambda job: running.set() or gate.wait(30), loop)
        assert running.wait(10)
        for _ in range(worker.queue_size):
            worker.submit(lambda job: gate.wait(30), loop)
        start = time.monotonic()
        status, headers, raw = server.request("POST", "/v1/images/generations", {"prompt": "x"})
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(raw)["error"]["code"] == "queue_full"
        status, _, raw = server.request("POST", "/v1/images/edits", {"image": data_url(Image.new("RGB", (16, 16))),
                                                                     "prompt": "x", "mode": "variation",
                                                                     "strength": 1})
        assert status == 429 and json.loads(raw)["error"]["code"] == "queue_full"
        assert time.monotonic() - start < 5
        assert server.request("GET", "/health")[0] == 200
    finally:
        gate.set()
        loop.close()
    deadline = time.monotonic() + 10
    while worker.busy or worker.waiting:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert server.post("/v1/images/generations", {"prompt": "x", "seed": 1})[0] == 200


def test_api_key(engine, picture):
    s = Server(create_app(engine, ServerSettings(api_key="sekrit", **TINY)))
    try:
        assert s.request("GET", "/health")[0] == 200
        status, _, page = s.request("GET", "/page.json")  # no key needed: it tells the page to ask for one
        assert status == 200 and json.loads(page)["auth"] is True
        status, headers, raw = s.request("POST", "/v1/images/generations", {"prompt": "x"})
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer nope"}
        assert s.request("POST", "/v1/images/generations", {"prompt": "x"}, wrong)[0] == 401
        good = {"Authorization": "Bearer sekrit"}
        assert s.request("POST", "/v1/images/generations", {"prompt": "x"}, good)[0] == 200
        edit = {"image": data_url(picture), "prompt": "x", "mode": "outpaint", "extend": [0, 16, 0, 0]}
        assert s.request("POST", "/v1/images/edits", edit)[0] == 401
        assert s.request("POST", "/v1/images/edits", edit, good)[0] == 200
        assert s.request("GET", "/v1/models", None, good)[0] == 200
        assert s.request("GET", "/v1/models")[0] == 401
    finally:
        s.stop()


# -- command line and load test ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_refuses_a_missing_model_and_bad_options(tmp_path):
    from harmon.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--port", "0"]) == 2  # checked before the (default) model is loaded


def test_cli_serve_compile_compiles_the_served_model(tiny_model_dir, monkeypatch):
    import harmon.server
    from harmon.cli import main

    served = []
    monkeypatch.setattr(harmon.server, "serve", lambda engine, settings, **kw: served.append(engine.model))
    assert main(["serve", "--model", str(tiny_model_dir), "--compile"]) == 0
    blocks = (*served[0].mar.encoder_blocks, *served[0].mar.decoder_blocks, served[0].mar.diffloss.net)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert main(["serve", "--model", str(tiny_model_dir)]) == 0
    assert all(block._compiled_call_impl is None for block in served[1].mar.decoder_blocks)


def test_cli_serve_runs_and_stops(tiny_model_dir):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "harmon.cli", "serve", "--model", str(tiny_model_dir),
                                "--port", str(port), "--size", "64", "--num-iter", "2", "--num-steps", "2",
                                "--image-size", "64", "--device", "cpu", "--log-level", "warning"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "harmon serve did not answer"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/")
                response = conn.getresponse()
                page = response.read()
                break
            except OSError:
                time.sleep(0.2)
        assert response.status == 200 and b"Harmon" in page
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/page.json")
        values = json.loads(conn.getresponse().read())
        assert (values["width"], values["height"], values["num_iter"], values["num_steps"]) == (64, 64, 2, 2)
    finally:
        process.terminate()
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    assert b"serving tiny on http://127.0.0.1:" in process.stderr.read()


def test_load_test_script(server):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/load_test.py"), "--url",
                             f"http://127.0.0.1:{server.port}", "--clients", "6", "--duration", "4", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == 0 and report["completed"] > 0 and report["answers_after"]
    assert report["rejected_429"] > 0  # 6 clients against a queue of 2
    assert set(report["latency_ms"]) == {"p50", "p90", "p95", "p99"} and report["images_per_s"] >= 0
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks/load_test.py"), "--url",
                              "http://192.0.2.1:80", "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "loopback" in refused.stderr


# -- the web page in a real browser -----------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def open_page(driver, server: Server) -> None:
    """Load the page and wait until it has filled in the server's values (from /page.json)."""
    driver.get(f"http://127.0.0.1:{server.port}/")
    _wait(driver, lambda drv: drv.execute_script("return document.body.dataset.ready") == "1", 30)


def test_web_page_generates_and_chats(default_server, browser, tmp_path):
    """The shipped model behind the page: it draws the prompt and answers about an uploaded scene."""
    from selenium.webdriver.common.by import By

    from harmon.shapes import detect
    from harmon.shapes import world

    server, prompt = default_server, "a red circle to the left of a blue square"
    d = browser
    open_page(d, server)
    assert "Harmon" in d.title and "shapes" in d.title and "shapes" in d.find_element(By.ID, "model-name").text
    d.find_element(By.ID, "prompt").send_keys(prompt)
    d.find_element(By.ID, "seed").send_keys("42")
    assert d.find_element(By.ID, "num-iter").get_attribute("value") == "16"  # the model's default
    d.find_element(By.ID, "generate").click()
    _wait(d, lambda drv: drv.find_element(By.ID, "gen-gallery").get_attribute("data-done") == "1")
    assert d.find_element(By.ID, "gen-status").text == "Done: 1 image(s)."
    assert d.execute_script("return [document.getElementById('gen-progress').value, "
                            "document.getElementById('gen-progress').max]") == [16, 16]
    image = d.find_element(By.CSS_SELECTOR, "img.gen-image")
    _wait(d, lambda drv: drv.execute_script("return arguments[0].naturalWidth", image) == 64)
    link = d.find_element(By.CSS_SELECTOR, "a.gen-download")
    assert link.get_attribute("download") == "harmon_42.png"
    downloaded = d.execute_async_script(  # the bytes behind the download link, as base64
        "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => "
        "done(btoa(String.fromCharCode(...new Uint8Array(b)))))", link.get_attribute("href"))
    png = Image.open(io.BytesIO(base64.b64decode(downloaded)))
    assert png.text["prompt"] == prompt and png.text["seed"] == "42" and png.text["num_iter"] == "16"
    assert detect.analyze(png.convert("RGB")), "the shipped model drew nothing"
    d.save_screenshot(str(tmp_path / "t2i.png"))

    picture = world.render(world.Scene((world.Obj("triangle", "green", 20, 40, 18),
                                        world.Obj("circle", "orange", 46, 22, 16)), 64))
    picture_file = tmp_path / "picture.png"
    picture.save(picture_file)
    d.find_element(By.ID, "tab-chat").click()
    d.find_element(By.ID, "chat-image").send_keys(str(picture_file))
    _wait(d, lambda drv: drv.find_element(By.ID, "chat-preview").is_displayed())
    answers = []
    for question in ("What color is the triangle?", "How many circles are there?"):
        d.find_element(By.ID, "chat-question").send_keys(question)
        d.find_element(By.ID, "chat-send").click()
        _wait(d, lambda drv: len(drv.find_elements(By.CSS_SELECTOR, ".bubble.assistant[data-done='1']"))
              == len(answers) + 1)
        bubble = d.find_elements(By.CSS_SELECTOR, ".bubble.assistant")[-1]
        assert "error" not in bubble.get_attribute("class"), d.find_element(By.ID, "chat-status").text
        answers.append(d.execute_script("return arguments[0].textContent", bubble))
    d.save_screenshot(str(tmp_path / "chat.png"))
    assert [b.text for b in d.find_elements(By.CSS_SELECTOR, ".bubble.user")] == \
        ["What color is the triangle?", "How many circles are there?"]
    assert all(answers) and set(" ".join(answers).split()) <= world.answer_words(), answers
    # the page's streamed answers are the API's answers to the same conversation
    url = data_url(picture)
    first = server.post("/v1/chat/completions", chat_body(url, "What color is the triangle?"))[1]
    assert answers[0] == first["choices"][0]["message"]["content"]
    second = server.post("/v1/chat/completions",
                         chat_body(url, "What color is the triangle?", answers[0], "How many circles are there?"))[1]
    assert answers[1] == second["choices"][0]["message"]["content"]


def test_web_page_edits(server, browser, picture, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    open_page(d, server)
    d.find_element(By.ID, "tab-edit").click()
    assert d.find_element(By.ID, "edit").is_displayed() and not d.find_element(By.ID, "t2i").is_displayed()
    picture_file = tmp_path / "picture.png"
    picture.save(picture_file)
    d.find_element(By.ID, "edit-image").send_keys(str(picture_file))
    _wait(d, lambda drv: drv.find_element(By.ID, "edit-preview").get_attribute("data-loaded") == "1")
    assert d.find_element(By.ID, "edit-box-right").get_attribute("value") == "36"  # default: the middle
    Select(d.find_element(By.ID, "edit-mode")).select_by_value("outpaint")
    assert d.find_element(By.ID, "edit-outpaint-opts").is_displayed()
    assert not d.find_element(By.ID, "edit-inpaint-opts").is_displayed()
    Select(d.find_element(By.ID, "edit-mode")).select_by_value("inpaint")
    for name, value in zip(("left", "top", "right", "bottom"), EDIT_CASES[0][1]["box"]):
        d.find_element(By.ID, f"edit-box-{name}").clear()
        d.find_element(By.ID, f"edit-box-{name}").send_keys(str(value))
    d.find_element(By.ID, "edit-prompt").send_keys(EDIT_PROMPT)
    d.find_element(By.ID, "edit-seed").send_keys("3")
    d.find_element(By.ID, "edit-run").click()
    _wait(d, lambda drv: drv.find_element(By.ID, "edit-result").get_attribute("data-done") in ("1", "error"))
    assert d.find_element(By.ID, "edit-result").get_attribute("data-done") == "1", \
        d.find_element(By.ID, "edit-status").text
    image = d.find_element(By.ID, "edit-result-image")
    _wait(d, lambda drv: drv.execute_script("return arguments[0].naturalWidth", image) == 48)
    assert d.execute_script("return arguments[0].naturalHeight", image) == 32
    link = d.find_element(By.ID, "edit-download")
    assert link.get_attribute("download") == "harmon_inpaint_3.png"
    downloaded = d.execute_async_script(
        "const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => "
        "done(btoa(String.fromCharCode(...new Uint8Array(b)))))", link.get_attribute("href"))
    png = Image.open(io.BytesIO(base64.b64decode(downloaded)))
    assert png.text["edit_mode"] == "inpaint" and png.text["seed"] == "3" and png.text["prompt"] == EDIT_PROMPT
    d.save_screenshot(str(tmp_path / "edit.png"))
    api = server.post("/v1/images/edits", edit_body(picture, "inpaint", **EDIT_CASES[0][1]))[1]
    expected = Image.open(io.BytesIO(base64.b64decode(api["data"][0]["b64_json"])))
    assert png.convert("RGB").tobytes() == expected.convert("RGB").tobytes()
    # a bad request shows the server's message
    d.find_element(By.ID, "edit-box-right").clear()
    d.find_element(By.ID, "edit-box-right").send_keys("100")
    d.find_element(By.ID, "edit-run").click()
    _wait(d, lambda drv: drv.find_element(By.ID, "edit-result").get_attribute("data-done") == "error")
    assert "not inside the 48x40 image" in d.find_element(By.ID, "edit-status").text
