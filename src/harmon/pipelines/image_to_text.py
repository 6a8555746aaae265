"""Image-to-text: questions about images, greedy or sampled, streamed, and multi-turn chat.

Decoding is our own short loop over the LLM's KV cache (instead of
``transformers.generate``) so that sampling draws only from the caller's
``torch.Generator``.
"""
from __future__ import annotations

import secrets
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image
from transformers import DynamicCache

from ..errors import InputError
from ..hub import load_pretrained
from ..models.harmon import Harmon
from ..processing import IMAGE_TOKEN, chat_prompt, check_understanding_size, load_image, understanding_input
from ..settings import DecodingSettings
from ..validation import check_prompt

CHAT_TURN_END = "<|im_end|>\n"


@torch.no_grad()
def decode_tokens(model: Harmon, inputs_embeds: torch.Tensor, stop_ids: set[int],
                  settings: DecodingSettings | None = None, generator: torch.Generator | None = None
                  ) -> Iterator[int]:
    """Yield new token ids after a prompt (1, T, H) until a stop id or ``settings.max_new_tokens`` (greedy by
    default); sampling draws only from ``generator`` (a fresh random seed when None)."""
    settings = settings or DecodingSettings()
    if settings.do_sample and generator is None:  # never the global RNG: a fresh, unpredictable seed instead
        generator = torch.Generator().manual_seed(secrets.randbits(62))
    llm = model.llm
    limit = int(llm.config.max_position_embeddings)
    cache = DynamicCache(config=llm.config)
    out = llm(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
    for _ in range(min(settings.max_new_tokens, limit - inputs_embeds.shape[1])):
        logits = out.logits[0, -1].float()  # (V,)
        token = _choose(logits, settings, generator)
        if token in stop_ids:
            return
        yield token
        out = llm(input_ids=torch.tensor([[token]], device=inputs_embeds.device), cache=cache, use_cache=True)


@torch.no_grad()
def batched_greedy(model: Harmon, prompts: Sequence[torch.Tensor], stop_ids: set[int], max_new_tokens: int
                   ) -> list[list[int]]:
    """Greedy continuations of several prompt embeddings (T_i, H) at once, left-padded into one batch; each row
    ends at a stop id (left out) or after ``max_new_tokens``. The batch's shape changes the numbers by float
    rounding only, so a row's tokens are those :func:`decode_tokens` gives it alone, but for near ties."""
    llm = model.llm
    width = max(p.shape[0] for p in prompts)
    embeds = prompts[0].new_zeros(len(prompts), width, prompts[0].shape[-1])  # (B, T, H)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=embeds.device)  # (B, T)
    for i, p in enumerate(prompts):
        embeds[i, width - p.shape[0]:] = p
        mask[i, width - p.shape[0]:] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=llm.config)
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
              logits_to_keep=1)
    answers: list[list[int]] = [[] for _ in prompts]
    running = torch.ones(len(prompts), dtype=torch.bool)
    limit = int(llm.config.max_position_embeddings)
    for _ in range(min(max_new_tokens, limit - width)):
        tokens = out.logits[:, -1].float().argmax(-1).cpu()  # (B,)
        for i in running.nonzero().flatten().tolist():
            if int(tokens[i]) in stop_ids:
                running[i] = False
            else:
                answers[i].append(int(tokens[i]))
        if not running.any():
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = llm(input_ids=tokens.unsqueeze(1).to(embeds.device), attention_mask=mask, position_ids=positions,
                  cache=cache, use_cache=True)
    return answers


def _choose(logits: torch.Tensor, settings: DecodingSettings, generator: torch.Generator | None) -> int:
    if not settings.do_sample:
        return int(logits.argmax())
    top_p = settings.top_p
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    if generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


class ImageToTextPipeline:
    """``pipe(image, question)`` answers like the original ``image2text.py``: the image padded to a square of
    ``image_size`` px (default: the model's, 512 for the released models)."""

    def __init__(self, model: Harmon, tokenizer, image_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = model.config.image_size if image_size is None else image_size
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
                 if t in tokenizer.get_vocab()]
        self.stop_ids = set(stops) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = torch.float32, image_size: int | None = None,
                        quantize: str | None = None) -> "ImageToTextPipeline":
        """The pipeline of a model folder in any supported layout (ours, the official Hugging Face release, a
        reference fixture), a Hugging Face repo id, or None (the shipped shapes model); ``quantize="int8"``
        for int8 weights; see :func:`harmon.hub.load_pretrained`."""
        return cls(*load_pretrained(name_or_path, device=device, dtype=dtype, quantize=quantize),
                   image_size=image_size)

    # -- inputs ----------------------------------------------------------------------------------
    def image_embeds(self, image: str | Image.Image) -> torch.Tensor:
        """One image -> its visual embeddings (1, (size/16)^2 + buffer, H): image tokens, then the buffer."""
        return self.images_embeds([image])

    @torch.no_grad()
    def images_embeds(self, images: Sequence[str | Image.Image]) -> torch.Tensor:
        """Images -> their visual embeddings (B, (size/16)^2 + buffer, H), in one pass of the VAE and MAR."""
        config = self.model.config
        check_understanding_size(self.image_size, config.mar.vae_stride, config.mar.buffer_size, config.max_positions)
        pixels = torch.cat([understanding_input(load_image(image), self.image_size) for image in images])
        latents = self.model.encode(pixels.to(device=self.model.device, dtype=self.model.dtype))
        return self.model.extract_visual_feature(latents)[1]

    def prompt_embeds(self, conversation: str, image_embeds: torch.Tensor) -> torch.Tensor:
        """Templated text with one ``<image>`` -> input embeddings (1, T, H), the image run expanded in place."""
        if conversation.count(IMAGE_TOKEN) != 1:
            raise InputError(f"the conversation must hold exactly one {IMAGE_TOKEN} placeholder")
        expanded = conversation.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_embeds.shape[1])
        ids = torch.tensor([self.tokenizer.encode(expanded, add_special_tokens=False)], device=self.model.device)
        limit = int(self.model.llm.config.max_position_embeddings)
        if ids.shape[1] >= limit:
            raise InputError(f"the prompt takes {ids.shape[1]} tokens, the LLM has {limit} positions")
        return self.model.multimodal_embeds(ids, image_embeds, self.image_token_id)

    def generate_ids(self, inputs_embeds: torch.Tensor, settings: DecodingSettings | None = None,
                     generator: torch.Generator | None = None) -> Iterator[int]:
        """New token ids for one prompt (1, T, H); see :func:`decode_tokens`."""
        return decode_tokens(self.model, inputs_embeds, self.stop_ids, settings, generator)

    def stream(self, image: str | Image.Image, question: str, settings: DecodingSettings | None = None,
               generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (``settings``: greedy by default)."""
        check_prompt(question, "the question")
        embeds = self.prompt_embeds(chat_prompt(f"{IMAGE_TOKEN}\n{question}"), self.image_embeds(image))
        yield from self.decode_text(self.generate_ids(embeds, settings, generator))

    @torch.no_grad()
    def answer_batch(self, images: Sequence[str | Image.Image], questions: Sequence[str],
                     settings: DecodingSettings | None = None) -> list[str]:
        """Greedy answers to ``questions[i]`` about ``images[i]``, drawn together: the images encoded in one pass,
        the prompts left-padded into one batch of the LLM. Each answer is what ``pipe(images[i], questions[i])``
        gives, up to float rounding (batch-shaped kernels)."""
        settings = settings or DecodingSettings()
        if settings.do_sample:
            raise InputError("answer_batch decodes greedily: give settings with do_sample=False")
        if len(images) != len(questions) or not images:
            raise InputError(f"{len(images)} images for {len(questions)} questions: give one question per image")
        for question in questions:
            check_prompt(question, "the question")
        visual = self.images_embeds(images)  # (B, N, H)
        rows = [self.prompt_embeds(chat_prompt(f"{IMAGE_TOKEN}\n{q}"), visual[i:i + 1])[0]
                for i, q in enumerate(questions)]  # (T_i, H) each
        ids = batched_greedy(self.model, rows, self.stop_ids, settings.max_new_tokens)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def decode_text(self, ids: Iterator[int]) -> Iterator[str]:
        """Token ids -> text pieces as they become printable (a split multi-byte character waits)."""
        tokens: list[int] = []
        emitted = ""
        for token in ids:
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            yield text[len(emitted):]
            emitted = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def __call__(self, image: str | Image.Image | Sequence[str | Image.Image], question: str,
                 settings: DecodingSettings | None = None, generator: torch.Generator | None = None
                 ) -> str | list[str]:
        """Answer ``question`` about one image (a string) or each of a list of images (a list of strings)."""
        if isinstance(image, (list, tuple)):
            return [self(im, question, settings, generator) for im in image]
        return "".join(self.stream(image, question, settings, generator))


class ChatSession:
    """A conversation about one image that keeps its history: ``session.ask("What is this?")``."""

    def __init__(self, pipeline: ImageToTextPipeline, image: str | Image.Image):
        self.pipeline = pipeline
        self.image_embeds = pipeline.image_embeds(image)
        self.history: list[tuple[str, str]] = []

    def conversation(self, question: str) -> str:
        """The whole templated conversation, ending where the next answer starts."""
        text = ""
        for i, (q, a) in enumerate(self.history):
            text += chat_prompt(f"{IMAGE_TOKEN}\n{q}" if i == 0 else q) + a + CHAT_TURN_END
        return text + chat_prompt(f"{IMAGE_TOKEN}\n{question}" if not self.history else question)

    def stream(self, question: str, settings: DecodingSettings | None = None,
               generator: torch.Generator | None = None) -> Iterator[str]:
        """Yield the next answer as text pieces; the turn joins the history when the answer is complete."""
        check_prompt(question, "the question")
        embeds = self.pipeline.prompt_embeds(self.conversation(question), self.image_embeds)
        answer = ""
        for piece in self.pipeline.decode_text(self.pipeline.generate_ids(embeds, settings, generator)):
            answer += piece
            yield piece
        self.history.append((question, answer))

    def ask(self, question: str, settings: DecodingSettings | None = None, generator: torch.Generator | None = None,
            on_text: Callable[[str], None] | None = None) -> str:
        """The next answer, whole; ``on_text`` receives its pieces as they come."""
        pieces = []
        for piece in self.stream(question, settings, generator):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        return "".join(pieces)
