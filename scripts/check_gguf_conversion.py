"""Check that the bundled models convert with llama.cpp's ``convert_hf_to_gguf.py`` and read back.

Why (issue 11): downstream users turn pruned checkpoints into GGUF. The stock converter identifies a
BPE pre-tokenizer by hashing the token ids that the model's *own* tokenizer gives for a fixed probe
text (``get_vocab_base_pre``: ``chkhsh = sha256(str(tokenizer.encode(chktxt)))``, compared with a
table of known models). The ids depend on the vocabulary, so any newly trained vocabulary is "not
recognized", whatever its pre-tokenizer; upstream registers each new model's hash by hand
(``convert_hf_to_gguf_update.py``). Qwen3-MoE has no other vocabulary path (``set_vocab`` ->
``_set_vocab_gpt2``) and the converter has no option naming a pre-tokenizer, so only a change of token
ids (retraining) could make the stock table match; this script shows that and checks the rest.

For each model, on a copy (the input is never touched):

1. the stock converter: exit status, its error and the ``chkhsh`` it reports;
2. the model's pre-tokenizer really is GPT-2's byte-level regex (``tokenizer.json``), and the hash
   this script computes from the converter's own probe text equals the reported one;
3. the converter again with that one hash registered as ``"gpt-2"`` (what an upstream entry would
   do; the converter file is not edited);
4. the GGUF read back with ``gguf.GGUFReader``: architecture, expert counts, token list, merges and
   special ids equal to the checkpoint's, every tensor's name and shape as llama.cpp's Qwen3-MoE
   layout expects, values equal to the safetensors (bit-exact for bf16 output);
5. when the ``llama_cpp_py_sync`` binding (a prebuilt libllama) is importable: llama.cpp itself loads
   the GGUF, its tokenisation of the held-out texts equals the Hugging Face tokenizer's, and its
   next-token logits agree with the transformers model's.

Run it with the interpreter of an environment holding the converter's requirements, e.g.::

    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llcpp   # sdist vendors llama.cpp
    tar xzf /tmp/llcpp/llama_cpp_python-*.tar.gz -C /tmp/llcpp
    python -m venv /tmp/llvenv && /tmp/llvenv/bin/pip install torch==2.13.0   # CPU build first
    /tmp/llvenv/bin/pip install numpy sentencepiece transformers safetensors protobuf \\
        /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp/gguf-py [cffi llama-cpp-py-sync]
    /tmp/llvenv/bin/python scripts/check_gguf_conversion.py \\
        --converter /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py

Exit 0 when every model converts with the registration and reads back equal, 1 when a check fails,
2 for bad input. ``--report FILE`` writes the findings as JSON.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "moeprune" / "assets"
PRE_NAME = "gpt-2"  # llama.cpp's name for GPT-2's byte-level regex split (src/llama-vocab.cpp)

# Runs the converter with one more (hash -> pre-tokenizer) entry; argv: converter, hash, name, args...
SHIM = r"""
import importlib.util, sys
from hashlib import sha256
from pathlib import Path
conv, known, name = sys.argv[1:4]
sys.argv = [conv] + sys.argv[4:]
sys.path.insert(0, str(Path(conv).parent))
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", conv)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
try:
    from conversion.base import TextModel
except ImportError:  # single-file converters
    TextModel = mod.TextModel
stock = TextModel.get_vocab_base_pre
probe = sys.argv.pop()  # the probe text, passed last
def get_vocab_base_pre(self, tokenizer):
    if sha256(str(tokenizer.encode(probe)).encode()).hexdigest() == known:
        return name
    return stock(self, tokenizer)
TextModel.get_vocab_base_pre = get_vocab_base_pre
mod.main()
"""


def probe_text(converter: Path) -> str:
    """The converter's ``chktxt`` (in conversion/base.py for split converters), read without running it."""
    for src in (converter.parent / "conversion" / "base.py", converter):
        if not src.is_file():
            continue
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "get_vocab_base_pre":
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "chktxt":
                        return ast.literal_eval(stmt.value)
    raise SystemExit(f"error: no get_vocab_base_pre/chktxt found near {converter}")


def gpt2_byte_level(tokenizer_json: dict) -> bool:
    """True when tokenizer.json pre-tokenizes exactly as GPT-2: byte-level, its regex, no prefix space."""
    pre, norm = tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("normalizer")
    return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and norm is None and tokenizer_json["model"]["type"] == "BPE")


def run_converter(cmd: list[str], log: Path) -> tuple[int, str, str | None]:
    """Exit status, last error line and the reported chkhsh of one converter run (log kept)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = proc.stdout + proc.stderr
    log.write_text(text)
    errors = [ln for ln in text.splitlines() if re.match(r"^\w+(Error|Exception|NotImplementedError)\b", ln)]
    found = re.search(r"chkhsh:\s+([0-9a-f]{64})", text)
    return proc.returncode, (errors[-1] if errors else ""), (found.group(1) if found else None)


def n_experts(cfg: dict) -> int:
    return cfg.get("num_experts", cfg.get("num_local_experts"))


def expected_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """llama.cpp Qwen3-MoE tensor names -> values from the safetensors (experts stacked)."""
    from safetensors.torch import load_file

    sd = load_file(str(model_dir / "model.safetensors"))
    cfg = json.loads((model_dir / "config.json").read_text())
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp"}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.get("tie_word_embeddings"):
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in names.items():
            out[f"blk.{i}.{gg}.weight"] = sd[f"model.layers.{i}.{hf}.weight"]
        for proj in ("gate", "up", "down"):
            out[f"blk.{i}.ffn_{proj}_exps.weight"] = torch.stack(
                [sd[f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"] for e in range(n_experts(cfg))])
    return out


def read_back(gguf_path: Path, model_dir: Path, pre: str) -> list[str]:
    """Problems found comparing the GGUF with the checkpoint (empty = equal)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    field = lambda key: reader.get_field(key).contents() if reader.get_field(key) is not None else None  # noqa: E731
    want = {"general.architecture": "qwen3moe", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": [t for t, _ in vocab], "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": cfg["bos_token_id"], "tokenizer.ggml.eos_token_id": cfg["eos_token_id"],
            "qwen3moe.block_count": cfg["num_hidden_layers"], "qwen3moe.expert_count": n_experts(cfg),
            "qwen3moe.expert_used_count": cfg["num_experts_per_tok"],
            "qwen3moe.expert_feed_forward_length": cfg["moe_intermediate_size"]}
    problems = [f"{k}: {str(field(k))[:60]} != {str(v)[:60]}" for k, v in want.items() if field(k) != v]
    expected = expected_tensors(model_dir)
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(expected):
        problems.append(f"tensor names differ: missing {sorted(set(expected) - set(got))[:5]}, "
                        f"extra {sorted(set(got) - set(expected))[:5]}")
    for name in sorted(set(got) & set(expected)):
        t, ref = got[name], expected[name]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF stores ggml order
        if shape != tuple(ref.shape):
            problems.append(f"{name}: shape {shape} != {tuple(ref.shape)}")
            continue
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        raw = np.asarray(t.data)
        if kind == "BF16":  # the reader hands bf16 over as raw bytes
            data = raw.view(np.uint16).reshape(shape)
            same = np.array_equal(data, ref.view(torch.int16).numpy().view(np.uint16))
        elif kind == "F32":
            same = np.array_equal(raw.reshape(shape), ref.float().numpy())
        elif kind == "F16":
            same = np.array_equal(raw.reshape(shape), ref.float().numpy().astype(np.float16))
        else:
            same = True  # quantised output: only names and shapes are checked
        if not same:
            problems.append(f"{name}: values differ ({kind})")
    return problems


def heldout_texts() -> dict[str, list[str]]:
    """Built-in held-out documents, via moeprune's stdlib-only corpus module (no moeprune deps needed)."""
    path = ROOT / "moeprune" / "calibration" / "builtin_corpus.py"
    spec = importlib.util.spec_from_file_location("_moeprune_builtin_corpus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return {d: mod.builtin_documents(d, "heldout") for d in ("code", "prose")}


def llama_cpp_check(gguf_path: Path, model_dir: Path, texts: dict[str, list[str]], windows: int) -> dict[str, Any]:
    """llama.cpp's own tokenisation and logits against transformers (skipped without the binding)."""
    try:
        from llama_cpp_py_sync import Llama, __llama_cpp_tag__
    except ImportError:
        return {"skipped": "llama_cpp_py_sync not importable"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    try:
        llm = Llama(str(gguf_path), n_ctx=256, n_batch=256, n_threads=1, verbose=False)
    except (OSError, RuntimeError) as exc:  # e.g. a prebuilt libllama needing a newer glibc
        why = re.search(r"version `[^']+' not found", str(exc))
        return {"skipped": f"libllama did not load: {why.group(0) if why else str(exc)[:160]}"}
    result: dict[str, Any] = {"llama_cpp": __llama_cpp_tag__}
    hf_ids: dict[str, list[int]] = {}
    for dom, docs in texts.items():
        mismatched = [i for i, d in enumerate(docs) if llm.tokenize(d, add_special=False) != tok.encode(d)]
        hf_ids[dom] = [t for d in docs for t in tok.encode(d)]
        result[f"{dom}: documents with different ids"] = f"{len(mismatched)} of {len(docs)}"
        result[f"{dom}: tokens"] = len(hf_ids[dom])
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    agree, worst = 0, 0.0
    for k in range(windows):
        ids = hf_ids["code" if k % 2 == 0 else "prose"][k * 256: k * 256 + 128]
        llm._clear_context_state()
        llm._eval_tokens(ids, 0)
        ptr = llm._lib.llama_get_logits_ith(llm._ctx, -1)
        cpp = torch.tensor(llm._ffi.unpack(ptr, llm.n_vocab))
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1]
        agree += int(cpp.argmax() == ref.argmax())
        worst = max(worst, float((cpp - ref).abs().max()))
    llm.close()
    result["next-token top-1 agreement"] = f"{agree} of {windows} windows of 128 tokens"
    result["max |logit difference|"] = round(worst, 4)
    result["ok"] = all(v.startswith("0 of") for k, v in result.items() if "different ids" in k) and agree == windows
    return result


def check_model(model_dir: Path, args: argparse.Namespace, work: Path, texts: dict[str, list[str]]) -> dict[str, Any]:
    copy = work / model_dir.name
    shutil.copytree(model_dir, copy)
    out: dict[str, Any] = {"model": model_dir.name}
    conv = [args.python, str(args.converter)]
    rc, err, reported = run_converter(conv + [str(copy), "--outfile", str(work / "stock.gguf"),
                                              "--outtype", args.outtype], work / f"{model_dir.name}-stock.log")
    out["stock converter"] = {"exit": rc, "error": err, "reported chkhsh": reported}
    tok_json = json.loads((copy / "tokenizer.json").read_text())
    if not gpt2_byte_level(tok_json):
        out["ok"] = False
        out["problem"] = "pre-tokenizer is not GPT-2's byte-level regex; no registration can be right"
        return out
    from transformers import AutoTokenizer

    probe = probe_text(args.converter)
    ours = hashlib.sha256(str(AutoTokenizer.from_pretrained(copy).encode(probe)).encode()).hexdigest()
    sources = [p.read_text() for p in (args.converter, args.converter.parent / "conversion" / "base.py") if p.is_file()]
    out["chkhsh"] = {"computed": ours, "equals reported": ours == reported,
                     "in converter's table": any(ours in s for s in sources)}
    target = work / f"{model_dir.name}.gguf"
    rc2, err2, _ = run_converter([args.python, "-c", SHIM, str(args.converter), ours, PRE_NAME, str(copy),
                                  "--outfile", str(target), "--outtype", args.outtype, probe],
                                 work / f"{model_dir.name}-registered.log")
    out["registered as gpt-2"] = {"exit": rc2, "error": err2}
    if rc2 != 0:
        out["ok"] = False
        return out
    problems = read_back(target, copy, PRE_NAME)
    out["read back"] = problems or "equal (metadata, tokens, merges, tensor names, shapes, values)"
    out["llama.cpp"] = llama_cpp_check(target, copy, texts, args.windows)
    out["ok"] = not problems and out["llama.cpp"].get("ok", True)
    if args.keep:
        shutil.copy2(target, args.keep / target.name)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--converter", type=Path, required=True, help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--model", type=Path, action="append", help="checkpoint dir (default: both bundled models)")
    ap.add_argument("--outtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the converter")
    ap.add_argument("--windows", type=int, default=8, help="logit comparisons per model (llama.cpp step)")
    ap.add_argument("--keep", type=Path, help="copy the GGUF files here")
    ap.add_argument("--report", type=Path, help="write the findings as JSON")
    args = ap.parse_args()
    models = args.model or [ASSETS / "tiny-moe", ASSETS / "tiny-moe-64"]
    for path in [args.converter, *models]:
        if not path.exists():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    texts = heldout_texts()
    results = []
    with tempfile.TemporaryDirectory(prefix="gguf-check-") as tmp:
        for m in models:
            work = Path(tmp) / m.name
            work.mkdir()
            results.append(check_model(m.resolve(), args, work, texts))
            print(json.dumps(results[-1], indent=1), flush=True)
    info = {"converter": str(args.converter),
            "converter sha256": hashlib.sha256(args.converter.read_bytes()).hexdigest()[:16],
            "gguf": importlib.metadata.version("gguf"), "transformers": importlib.metadata.version("transformers"),
            "results": results}
    if args.report:
        tmp_report = args.report.with_suffix(".tmp")
        tmp_report.write_text(json.dumps(info, indent=1) + "\n")
        tmp_report.replace(args.report)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
