"""Chat requests -> what the engine answers: one image, the earlier turns, the new question and
:class:`~harmon.settings.DecodingSettings`.

The body is OpenAI's chat completion: ``messages`` (one image, as a ``data:`` URL, in the first user
message), ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (absent or 0: greedy, as OpenAI's
temperature 0 and the original's default), ``top_p`` and ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

from ..settings import DecodingSettings
from ..validation import check_prompt
from .errors import ApiError
from .inputs import Body, ServerSettings, check_limit, check_seed, decode_image_url


class ImageURL(Body):
    url: str


class ContentPart(Body):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(Body):
    """``POST /v1/chat/completions``: messages with one image in the first user message."""

    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False


@dataclass
class ChatParams:
    """A checked chat request: the image, earlier (question, answer) turns, the new question, how to decode
    and the seed of sampling (None: a fresh one)."""

    image: Image.Image
    history: list[tuple[str, str]]
    question: str
    settings: DecodingSettings
    seed: int | None


def _text_of(content: str | list[ContentPart] | None, where: str) -> tuple[str, list[str]]:
    """The text of a message and the image URLs in it."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, urls = [], []
    for part in content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url":
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if not url:
                raise ApiError(400, f"{where}: image_url part without a url", param="messages")
            urls.append(url)
        else:
            raise ApiError.invalid(f"{where}: unsupported content part type {part.type!r} (use text or image_url)",
                                   param="messages")
    return "\n".join(t for t in texts if t), urls


def _turns(req: ChatRequest, s: ServerSettings) -> list[Message]:
    """The user and assistant messages (system messages are ignored), alternating from and to the user."""
    if req.n != 1:
        raise ApiError.invalid("n must be 1", param="n")
    turns = [m for m in req.messages if m.role in ("user", "assistant")]
    if not turns:
        raise ApiError(400, "messages must hold at least one user message", param="messages")
    if len(req.messages) > s.max_messages:
        raise ApiError(400, f"at most {s.max_messages} messages are allowed, got {len(req.messages)}",
                       param="messages")
    if turns[-1].role != "user":
        raise ApiError(400, "the last message must be the user's question", param="messages")
    if any(m.role != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
        raise ApiError(400, "messages must alternate user and assistant, starting and ending with user",
                       param="messages")
    return turns


def chat_messages(req: ChatRequest, s: ServerSettings) -> tuple[str, list[tuple[str, str]], str]:
    """The image URL, earlier turns and the new question of a conversation."""
    image_url, texts = None, []
    for i, message in enumerate(_turns(req, s)):
        text, urls = _text_of(message.content, f"message {i}")
        if urls and (i != 0 or len(urls) > 1):
            raise ApiError(400, "exactly one image is allowed, in the first user message", param="messages")
        image_url = urls[0] if urls else image_url
        if len(text) > s.max_prompt_chars:
            raise ApiError.invalid(f"message {i} is {len(text)} characters, at most {s.max_prompt_chars} are "
                                   "allowed", param="messages", code="prompt_too_long")
        if message.role == "user":
            check_prompt(text, f"message {i}: the question")
        texts.append(text)
    if image_url is None:
        raise ApiError.invalid("the first user message must hold an image (an image_url content part with a "
                               "data: URL)", param="messages", code="image_required")
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    return image_url, history, texts[-1]


def decoding_settings(req: ChatRequest, s: ServerSettings) -> DecodingSettings:
    """The request's decoding within the server's limits: greedy unless it gives a temperature above 0."""
    max_tokens = next((v for v in (req.max_completion_tokens, req.max_tokens) if v is not None), s.max_new_tokens)
    check_limit("max_tokens", max_tokens, s.max_new_tokens, low=1)
    check_limit("temperature", req.temperature, s.max_temperature)
    sampled = {"do_sample": True, "temperature": req.temperature} if req.temperature else {}
    top_p = {} if req.top_p is None else {"top_p": req.top_p}
    return DecodingSettings(max_new_tokens=max_tokens, **sampled, **top_p)


def chat_params(req: ChatRequest, s: ServerSettings) -> ChatParams:
    """Check a chat request and decode its image (call it off the event loop: decoding takes time)."""
    image_url, history, question = chat_messages(req, s)
    settings = decoding_settings(req, s)
    check_seed(req.seed)
    return ChatParams(decode_image_url(image_url, s), history, question, settings, req.seed)
