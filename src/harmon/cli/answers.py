"""``harmon describe`` and ``harmon chat``: answers about an image, streamed to stdout."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from PIL import Image

from ..checkpoint import read_config
from ..pipelines import ChatSession, ImageToTextPipeline
from ..processing import check_understanding_size, load_image
from ..validation import check_prompt
from .common import (add_command, add_decoding_arguments, add_model_arguments, decoding_generator,
                     decoding_settings, load, model_folder)

DEFAULT_QUESTION = "Describe the image."  # the shipped shapes model was trained on exactly this question


def add_parsers(subparsers) -> None:
    """Add ``describe`` and ``chat``."""
    p = add_command(subparsers, "describe", cmd_describe, "answer a question about an image (streamed)",
                    "Answer QUESTION about IMAGE, streaming the answer to stdout.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("question", metavar="QUESTION", nargs="?", default=DEFAULT_QUESTION,
                   help=f'the question (default: "{DEFAULT_QUESTION}")')
    add_model_arguments(p)
    add_decoding_arguments(p)

    p = add_command(subparsers, "chat", cmd_chat, "talk about an image, one question per line from stdin",
                    "Multi-turn conversation about IMAGE: questions are read from stdin, answers streamed to "
                    "stdout; an empty line, /quit or end of input ends.")
    p.add_argument("image", metavar="IMAGE", help="image file")
    add_model_arguments(p)
    add_decoding_arguments(p)


def _pipeline(args: argparse.Namespace, folder: Path) -> tuple[ImageToTextPipeline, Image.Image]:
    """The model's pipeline and the opened image; the image and ``--image-size`` are checked before the (slow)
    model load."""
    image = load_image(args.image)
    config = read_config(folder)
    image_size = config.image_size if args.image_size is None else args.image_size
    check_understanding_size(image_size, config.mar.vae_stride, config.mar.buffer_size, config.max_positions)
    model, tokenizer = load(args, folder)
    return ImageToTextPipeline(model, tokenizer, image_size=image_size), image


def _print_stream(pieces: Iterator[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_describe(args: argparse.Namespace) -> int:
    """Answer one question about an image, streaming the answer to stdout."""
    question = check_prompt(args.question, "the question")
    settings, generator = decoding_settings(args), decoding_generator(args)
    pipe, image = _pipeline(args, model_folder(args))
    _print_stream(pipe.stream(image, question, settings, generator))
    return 0


def _questions() -> Iterator[str]:
    """Lines of stdin until an empty one, /quit, /exit or the end; prompts on stderr when interactive."""
    # bytes that are not UTF-8 reach the question check (one clear error) instead of failing the read
    if hasattr(sys.stdin, "reconfigure"):  # a real text stream (tests may give a StringIO)
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask about the image; an empty line, /quit or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        question = sys.stdin.readline().strip()
        if not question or question in ("/quit", "/exit"):
            return
        yield question


def cmd_chat(args: argparse.Namespace) -> int:
    """Multi-turn conversation about one image: questions from stdin, answers streamed to stdout."""
    settings, generator = decoding_settings(args), decoding_generator(args)
    pipe, image = _pipeline(args, model_folder(args))
    session = ChatSession(pipe, image)
    for question in _questions():
        _print_stream(session.stream(question, settings, generator))
    return 0
