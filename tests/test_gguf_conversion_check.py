"""scripts/check_gguf_conversion.py: the parts that run without llama.cpp.

The full check needs llama.cpp's converter (not a dependency); here: the pre-tokenizer test that
decides whether registering the vocabulary as GPT-2's is right, reading the probe text out of a
converter, and the registration shim run against a stand-in converter (matching hash -> the name;
any other vocabulary still hits the converter's own refusal).
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
check = load_script("check_gguf_conversion")

FAKE_BASE = '''
class TextModel:
    def get_vocab_base_pre(self, tokenizer):
        chktxt = 'a b\\n  c'
        raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
'''
FAKE_CONVERTER = '''
import sys
from conversion.base import TextModel
class Tok:
    def __init__(self, ids): self.ids = ids
    def encode(self, text): return self.ids
def main():
    ids = [int(x) for x in sys.argv[1].split(",")]
    print("PRE=" + TextModel().get_vocab_base_pre(Tok(ids)))
'''


def _fake_converter(tmp_path: Path) -> Path:
    (tmp_path / "conversion").mkdir()
    (tmp_path / "conversion" / "__init__.py").write_text("")
    (tmp_path / "conversion" / "base.py").write_text(FAKE_BASE)
    conv = tmp_path / "convert_hf_to_gguf.py"
    conv.write_text(FAKE_CONVERTER)
    return conv


def test_bundled_tokenizers_split_like_gpt2() -> None:
    for name in ("tiny-moe", "tiny-moe-64"):
        tok = json.loads((ROOT / "moeprune" / "assets" / name / "tokenizer.json").read_text())
        assert check.gpt2_byte_level(tok)
        for path, value in ((("pre_tokenizer", "add_prefix_space"), True), (("pre_tokenizer", "use_regex"), False),
                            (("pre_tokenizer", "type"), "Metaspace"), (("normalizer",), {"type": "NFC"})):
            other = copy.deepcopy(tok)
            target = other
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
            assert not check.gpt2_byte_level(other), path


def test_probe_text_read_from_split_and_single_file_converters(tmp_path: Path) -> None:
    assert check.probe_text(_fake_converter(tmp_path)) == "a b\n  c"
    single = tmp_path / "single" / "convert_hf_to_gguf.py"
    single.parent.mkdir()
    single.write_text(FAKE_BASE)
    assert check.probe_text(single) == "a b\n  c"
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "convert_hf_to_gguf.py").write_text("x = 1\n")
    with pytest.raises(SystemExit):
        check.probe_text(tmp_path / "none" / "convert_hf_to_gguf.py")


def test_shim_registers_only_the_given_hash(tmp_path: Path) -> None:
    conv = _fake_converter(tmp_path)
    ids = [5, 7, 11]
    known = hashlib.sha256(str(ids).encode()).hexdigest()

    def run(token_ids: list[int]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", check.SHIM, str(conv), known, "gpt-2",
                               ",".join(map(str, token_ids)), "a b\n  c"], capture_output=True, text=True)

    hit = run(ids)
    assert hit.returncode == 0 and "PRE=gpt-2" in hit.stdout, hit.stderr
    miss = run([5, 7, 12])
    assert miss.returncode != 0 and "was not recognized" in miss.stderr
