"""What harmon writes loads with transformers 4.45.2, the version of the original code and of the release's
remote code, as well as in our transformers 5.

Runs the other version in its own environment (``scripts/setup_transformers445.sh`` makes
``.venv-transformers445``; ``.ci/run`` does so): tokenizer folders written by
:func:`harmon.tokenizer.save_tokenizer` give the same token ids there, and the release ``config.json`` written
by :func:`harmon.release.release_config` gives there the Qwen2 config and MAR arguments we built from.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import REPO
from harmon.config import PRESETS
from harmon.hub import default_model_folder, load_tokenizer
from harmon.release import MAR_KWARGS, release_config
from harmon.tokenizer import build_byte_tokenizer, build_qwen2_tokenizer, save_tokenizer

PYTHON_445 = REPO / ".venv-transformers445" / "bin" / "python"
pytestmark = pytest.mark.skipif(not PYTHON_445.is_file(),
                                reason="no transformers 4.45.2 environment (bash scripts/setup_transformers445.sh)")
TEXTS = ["<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\n",
         "Generate an image: a red circle to the left of a blue square", "naïve café — 漢字 ✓ 123  spaces",
         "<|endoftext|>"]

# run by transformers 4.45.2: load each tokenizer folder and encode TEXTS; read each config.json as the
# release's remote code does (a PretrainedConfig with llm and mar, the LLM through Qwen2Config.from_dict)
PROBE = r"""
import json, sys
import transformers
from transformers import AutoTokenizer, PretrainedConfig, Qwen2Config
assert transformers.__version__ == "4.45.2", transformers.__version__

class ReleaseConfig(PretrainedConfig):
    model_type = "harmon"
    def __init__(self, llm=None, mar=None, **kwargs):
        super().__init__(**kwargs)
        self.llm, self.mar = llm, mar

texts, tokenizers, configs, resave = json.loads(sys.stdin.read())
out = {"ids": {}, "configs": {}}
for folder in tokenizers:
    tok = AutoTokenizer.from_pretrained(folder)
    out["ids"][folder] = [tok(t).input_ids for t in texts] + [[tok.eos_token, tok.pad_token]]
# a Qwen2.5 tokenizer folder as transformers 4.45 writes it (the release's: class Qwen2Tokenizer, vocab + merges)
source, target = resave
transformers.Qwen2TokenizerFast.from_pretrained(source).save_pretrained(target)
for folder in configs:
    config = ReleaseConfig.from_pretrained(folder)
    llm = Qwen2Config.from_dict(dict(config.llm))  # from_dict adds attn_implementation to the dict it gets
    out["configs"][folder] = {"llm": {k: getattr(llm, k) for k in config.llm if k != "architectures"},
                              "mar": config.mar}
print(json.dumps(out))
"""


def _run_445(tokenizers: list[Path], configs: list[Path], resave: tuple[Path, Path]) -> dict:
    payload = json.dumps([TEXTS, [str(p) for p in tokenizers], [str(p) for p in configs], [str(p) for p in resave]])
    done = subprocess.run([str(PYTHON_445), "-c", PROBE], input=payload, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tokenizers_and_release_configs_load_in_transformers_4_45(tmp_path):
    tokenizers = {"byte": build_byte_tokenizer(), "qwen2.5": build_qwen2_tokenizer(),
                  "shapes": AutoTokenizer.from_pretrained(str(default_model_folder()))}
    folders = []
    for name, tokenizer in tokenizers.items():
        save_tokenizer(tokenizer, tmp_path / name)
        folders.append(tmp_path / name)
    configs = {}
    for preset in ("harmon-0.5b", "harmon-1.5b"):
        configs[preset] = release_config(PRESETS[preset](), "bfloat16")
        (tmp_path / preset).mkdir()
        (tmp_path / preset / "config.json").write_text(json.dumps(configs[preset]))
    seen = _run_445(folders, [tmp_path / p for p in configs], (tmp_path / "qwen2.5", tmp_path / "as-4.45-writes"))

    for folder in folders:
        ours = AutoTokenizer.from_pretrained(str(folder))
        expected = [ours(t).input_ids for t in TEXTS] + [[ours.eos_token, ours.pad_token]]
        assert seen["ids"][str(folder)] == expected, folder.name
    # and the other way: the tokenizer folder 4.45 wrote, read by harmon as the release's is
    written_by_445 = json.loads((tmp_path / "as-4.45-writes" / "tokenizer_config.json").read_text())
    assert written_by_445["tokenizer_class"] == "Qwen2Tokenizer"
    theirs, ours = load_tokenizer(tmp_path / "as-4.45-writes", 151936), tokenizers["qwen2.5"]
    assert [theirs(t).input_ids for t in TEXTS] == [ours(t).input_ids for t in TEXTS]
    assert (theirs.eos_token, theirs.pad_token) == (ours.eos_token, ours.pad_token)
    for preset, written in configs.items():
        there = seen["configs"][str(tmp_path / preset)]
        assert there["mar"] == written["mar"] and set(there["mar"]) == {"type", *MAR_KWARGS}
        for key, value in PRESETS[preset]().llm.items():
            assert there["llm"][key] == value, (preset, key)
