"""``harmon serve``: the web page and the OpenAI-style HTTP API in front of one model worker."""
from __future__ import annotations

import argparse
import os
import sys

from ..checkpoint import read_config
from ..config import HarmonConfig
from ..errors import InputError
from ..processing import check_understanding_size
from ..settings import GenerationSettings
from .common import add_command, add_compile_argument, add_model_arguments, load, model_folder

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parsers(subparsers) -> None:
    """Add ``serve``."""
    p = add_command(subparsers, "serve", cmd_serve, "web page + OpenAI-style HTTP API for generation and chat",
                    "Serve a web page (text to image with live progress; chat about an uploaded image, streamed) "
                    "and an HTTP JSON API following OpenAI's conventions: POST /v1/images/generations and POST "
                    "/v1/chat/completions (\"stream\": true for server-sent events). One model worker runs requests "
                    "in order, text-to-image requests of equal settings together (--max-batch); requests beyond "
                    "--queue-size waiting ones get 429.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $HARMON_API_KEY, else none)")
    p.add_argument("--queue-size", type=int, default=8, metavar="N", help="requests that may wait for the model")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="images that waiting text-to-image requests of equal settings draw in one sampling loop, each "
                        "bit-identical to its request alone (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, metavar="MS",
                   help="how long the worker waits for more requests to join a batch")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="default image side for generation (default: the model's)")
    p.add_argument("--max-size", type=int, default=1024, metavar="PX", help="largest image side a request may ask")
    p.add_argument("--num-iter", type=int, default=None, metavar="N",
                   help="default MAR iterations (default: the model's)")
    p.add_argument("--num-steps", type=int, default=None, metavar="N",
                   help="default diffusion steps per token (default: the model's)")
    p.add_argument("--max-images", type=int, default=4, metavar="N", help="most images per request")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="understanding: side images are resized to (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N", help="most tokens an answer may have")
    p.add_argument("--max-upload-mb", type=int, default=10, metavar="MB", help="largest uploaded image")
    add_compile_argument(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")


def _server_settings(args: argparse.Namespace, config: HarmonConfig, api_key: str | None):
    """The server's defaults and limits from the options; what the model cannot draw fails before its load."""
    from ..server import ServerSettings
    from ..server.worker import MAX_BATCH, MAX_BATCH_WAIT

    for name in ("queue_size", "max_images", "max_new_tokens", "max_upload_mb", "max_batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_batch > MAX_BATCH:
        raise InputError(f"--max-batch must be in 1..{MAX_BATCH} (1: no batching), got {args.max_batch}")
    if not 0 <= args.batch_wait_ms <= 1000 * MAX_BATCH_WAIT:
        raise InputError(f"--batch-wait-ms must be in 0..{1000 * MAX_BATCH_WAIT:g}, got {args.batch_wait_ms:g}")
    generation = GenerationSettings(num_iter=args.num_iter, num_steps=args.num_steps, height=args.size)
    side = generation.resolve(config).height
    if args.max_size < side or args.max_size % config.mar.vae_stride:
        raise InputError(f"--max-size must be a multiple of {config.mar.vae_stride} and at least the default image "
                         f"side {side}, got {args.max_size}")
    image_size = config.image_size if args.image_size is None else args.image_size
    check_understanding_size(image_size, config.mar.vae_stride, config.mar.buffer_size, config.max_positions)
    return ServerSettings(api_key=api_key, queue_size=args.queue_size, max_batch=args.max_batch,
                          batch_wait=args.batch_wait_ms / 1000, generation=generation, max_size=args.max_size,
                          max_images=args.max_images, image_size=image_size, max_new_tokens=args.max_new_tokens,
                          max_upload_bytes=args.max_upload_mb * 1024 * 1024)


def cmd_serve(args: argparse.Namespace) -> int:
    """Web page + OpenAI-style HTTP API (images/generations, chat/completions) in front of one model worker."""
    try:
        from .. import server
    except ImportError as err:
        raise InputError(f"the server needs extra packages ({err.name} is missing): pip install 'harmon[serve]'")
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("HARMON_API_KEY") or None
    folder = model_folder(args)
    settings = _server_settings(args, read_config(folder), api_key)
    if args.host not in LOOPBACK_HOSTS and not api_key:
        print(f"harmon: warning: serving on {args.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    model, tokenizer = load(args, folder)
    if args.compile:
        model.compile_for_sampling()
    engine = server.Engine(model, tokenizer, folder, image_size=settings.image_size)
    print(f"harmon: serving {model.config.name} on http://{args.host}:{args.port}/ "
          f"(API key {'required' if api_key else 'not required'})", file=sys.stderr, flush=True)
    server.serve(engine, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
