"""Self-check: a unified model judges its own drawings.

For a prompt such as ``"two red circles and a blue square"`` :func:`prompt_questions` derives the questions
whose answers a faithful image fixes (``How many circles are there?`` -> ``two``, ``What color is the
square?`` -> ``blue``, ``Is the red circle above the blue square?`` -> ``yes``). :class:`SelfChecker` asks the
model each question about a candidate image and reads the probability it gives the expected answer (teacher
forced, no decoding); a candidate's score is the mean log-probability over the questions, and the best of a
prompt's candidates is kept. Prompts outside this GenEval-like grammar (counts, colours, objects, ``and``,
relations) get one question: ``Does the image show <prompt>?`` -> ``yes``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

from ..models.harmon import Harmon, crop_cache
from ..processing import IMAGE_TOKEN, chat_prompt, tensor_to_pil
from ..rng import derive_seed
from .image_to_text import ImageToTextPipeline

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10}
NUMBER_WORDS = {n: w for w, n in NUMBERS.items() if w not in ("a", "an")}
# the relation phrases of GenEval-like prompts, longest first so that "to the left of" wins over "left of"
RELATIONS = ("to the left of", "to the right of", "on the left of", "on the right of", "left of", "right of",
             "above", "below")
LEADS = ("a photo of ", "an image of ", "a picture of ", "a drawing of ")
# words that make a phrase more than "count, colour, object" (a scene, not a list of objects)
NOT_NOUNS = {"a", "an", "the", "of", "on", "in", "at", "with", "by", "under", "over", "near", "next", "and", "or"}


@dataclass(frozen=True)
class CheckQuestion:
    """A question about an image and the answer a faithful drawing of the prompt gives."""

    question: str
    answer: str


@dataclass(frozen=True)
class _Thing:
    count: int
    color: str | None
    noun: str  # as written: singular for one, plural for several

    @property
    def plural(self) -> str:
        return self.noun if self.count > 1 else pluralize(self.noun)

    @property
    def described(self) -> str:
        return f"{self.color} {self.noun}" if self.color else self.noun


def pluralize(noun: str) -> str:
    """English plural of a (last) noun by the regular rules: circle -> circles, box -> boxes, berry -> berries."""
    if re.search(r"(s|x|z|ch|sh)$", noun):
        return noun + "es"
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + "s"


def _thing(phrase: str) -> _Thing | None:
    """``"two red circles"`` -> _Thing(2, "red", "circles"); None when the phrase has no leading count."""
    words = phrase.split()
    if len(words) < 2 or (words[0] not in NUMBERS and not words[0].isdigit()):
        return None
    count = int(words[0]) if words[0].isdigit() else NUMBERS[words[0]]
    color = words[1] if words[1] in COLORS else None
    noun_words = words[2:] if color else words[1:]
    if not 1 <= len(noun_words) <= 2 or count < 1 or NOT_NOUNS & set(noun_words) \
            or not all(re.fullmatch(r"[a-z][a-z\-]*", w) for w in noun_words):
        return None
    noun = " ".join(noun_words)
    return _Thing(count, color, noun)


def _parse(prompt: str) -> tuple[list[_Thing], tuple[_Thing, str, _Thing] | None] | None:
    """The objects a prompt asks for and its relation (a, phrase, b), or None outside the grammar."""
    text = " ".join(prompt.lower().split()).rstrip(".")
    for lead in LEADS:
        if text.startswith(lead):
            text = text[len(lead):]
    for phrase in RELATIONS:
        a_text, sep, b_text = text.partition(f" {phrase} ")
        if sep:
            a, b = _thing(a_text), _thing(b_text)
            if a is None or b is None:
                return None
            return [a, b], ((a, phrase, b) if a.count == 1 and b.count == 1 else None)
    things = [_thing(part) for part in re.split(r",\s*(?:and\s+)?|\s+and\s+", text)]
    return None if any(t is None for t in things) else (things, None)  # type: ignore[return-value]


def prompt_questions(prompt: str) -> list[CheckQuestion]:
    """The questions a faithful image of ``prompt`` answers: how many of each kind of object, the colour of
    each object asked for once, and the asked relation; ``Does the image show <prompt>?`` outside the grammar."""
    parsed = _parse(prompt)
    if parsed is None:
        return [CheckQuestion(f"Does the image show {' '.join(prompt.split()).rstrip('.')}?", "yes")]
    things, relation = parsed
    totals: dict[str, int] = {}
    for t in things:
        totals[t.plural] = totals.get(t.plural, 0) + t.count
    asked = [CheckQuestion(f"How many {plural} are there?", NUMBER_WORDS.get(n, str(n)))
             for plural, n in totals.items()]
    asked += [CheckQuestion(f"What color is the {t.noun}?", t.color)
              for t in things if t.color and t.count == 1 and totals[t.plural] == 1]
    if relation is not None:
        a, phrase, b = relation
        asked.append(CheckQuestion(f"Is the {a.described} {phrase} the {b.described}?", "yes"))
    return asked


def candidate_seeds(seed: int, count: int) -> list[int]:
    """The seeds of ``count`` candidates for an image of ``seed``: ``seed`` itself first (so one candidate is the
    image drawn without self-check), then seeds derived from (seed, k), each below 2**62."""
    return [int(seed)] + [derive_seed(seed, k) >> 1 for k in range(1, count)]


class SelfChecker:
    """Scores images against prompts with the model's own answers (see the module docstring)."""

    def __init__(self, pipe: ImageToTextPipeline):
        self.pipe = pipe

    def scores(self, images: Sequence[Image.Image], prompt: str) -> list[float]:
        """The mean log-probability of the expected answers to :func:`prompt_questions` for each image (higher is
        a better match); each image is judged alone, so its score does not depend on the others."""
        questions = prompt_questions(prompt)
        return [self.score(image, questions) for image in images]

    @torch.no_grad()
    def score(self, image: Image.Image, questions: Sequence[CheckQuestion]) -> float:
        """Mean over ``questions`` of log P(answer | image, question), the answer in lower case or capitalised
        (whichever the model prefers counts, as their sum)."""
        pipe, llm = self.pipe, self.pipe.model.llm
        head, tail = chat_prompt(f"{IMAGE_TOKEN}\n{{question}}").split("{question}")
        prefix = pipe.prompt_embeds(head, pipe.image_embeds(image))  # (1, P, H): template start and the image
        cache = DynamicCache(config=llm.config)
        llm(inputs_embeds=prefix, cache=cache, use_cache=True, logits_to_keep=1)
        total = 0.0
        for q in questions:
            variants = dict.fromkeys([q.answer, q.answer.capitalize()])
            logps = [self._answer_logprob(cache, prefix.shape[1], q.question + tail, v) for v in variants]
            total += float(torch.logsumexp(torch.tensor(logps, dtype=torch.float64), 0))
        return total / len(questions)

    def _answer_logprob(self, cache: DynamicCache, prefix_len: int, question: str, answer: str) -> float:
        """log P(answer tokens | cached prefix, question) by one pass of the LLM; the cache is cut back after."""
        encode = self.pipe.tokenizer.encode
        asked, answered = encode(question, add_special_tokens=False), encode(answer, add_special_tokens=False)
        ids = torch.tensor([asked + answered], device=self.pipe.model.device)  # (1, Q + A)
        logits = self.pipe.model.llm(input_ids=ids, cache=cache, use_cache=True).logits[0].float()  # (Q + A, V)
        crop_cache(cache, prefix_len)
        predicted = logits[len(asked) - 1:-1].log_softmax(-1)  # (A, V): the answer's tokens' predictions
        return float(predicted.gather(1, ids[0, len(asked):, None]).sum())


@dataclass(frozen=True)
class SelfCheckResult:
    """How one image was chosen: its candidates' seeds and scores (in drawing order) and the kept one's index."""

    chosen: int
    seeds: list[int]
    scores: list[float]

    def metadata(self) -> dict[str, object]:
        """The image metadata's self-check keys (:data:`harmon.outputs.SELF_CHECK_KEYS`)."""
        return {"chosen_candidate": self.chosen, "candidate_seed": self.seeds[self.chosen],
                "self_check_scores": [round(s, 4) for s in self.scores]}

    @classmethod
    def of(cls, seeds: Sequence[int], scores: Sequence[float]) -> "SelfCheckResult":
        """The result of judged candidates: the first of the best scores is kept."""
        return cls(int(np.argmax(scores)), list(seeds), list(scores))


def judge_candidates(model: Harmon, tokenizer, images: torch.Tensor, prompts: Sequence[str],
                     seeds: Sequence[int]) -> list[SelfCheckResult]:
    """Score the candidates of each image with the model's own answers and choose one per image.

    ``images`` (N * k, 3, H, W) in [-1, 1]: image i's k candidates at rows i*k .. i*k+k-1, drawn with
    ``candidate_seeds(seeds[i], k)`` for ``prompts[i]``."""
    k = images.shape[0] // len(prompts)
    checker = SelfChecker(ImageToTextPipeline(model, tokenizer))
    pictures = tensor_to_pil(images)
    return [SelfCheckResult.of(candidate_seeds(seed, k), checker.scores(pictures[i * k:(i + 1) * k], prompt))
            for i, (prompt, seed) in enumerate(zip(prompts, seeds))]
