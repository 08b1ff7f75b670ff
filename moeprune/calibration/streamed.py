"""Streamed calibration: statistics of a checkpoint larger than memory, one decoder layer at a time.

The model is built on the meta device (`init_empty_weights` + `from_config`); only the input
embeddings are loaded to run every calibration batch up to the first decoder layer. During that
pass every decoder layer's `forward` is replaced by a recorder that keeps the arguments the model
gives it (rotary position embeddings, position ids, the causal / sliding-window mask of its layer
type) and passes the hidden states through, so nothing is re-derived by hand. Then each decoder
layer is loaded from the shards (`lazy_reader.materialise`, the same key conversions as
`from_pretrained`), the cached hidden states of every batch go through it with the `Observer`'s
hooks attached (they were attached to the meta model once; they fire on the loaded layer), the
layer is sent back to meta, and its outputs become the next layer's inputs. While a layer runs, the
next layer's bytes are read ahead into the page cache (`prefetch.Prefetcher`, one layer ahead,
nothing held in the process), so its load overlaps this layer's compute.

Hidden states live in an `ActivationStore`: in memory up to a budget, spilled to disk beyond it.
With a work directory, each finished layer is committed (`resume.WorkDir`) so a killed run
resumes from the next layer. Results equal `calibrate` on the loaded model: the same modules run
the same batches in the same order. The capture and the layer loop are `moeprune.engine.runner`'s,
shared with sparsify's sequential pass and the streamed sparsify / local router KD.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from moeprune.calibration.observer import Observer
from moeprune.calibration.stats import ExpertStats
from moeprune.nonfinite import check_loaded
from moeprune.engine.runner import LayerRunner, as_batches, capture_calls, decoder_layers
from moeprune.io.lazy_reader import KeyMap, LazyCheckpoint, materialise, release
from moeprune.io.prefetch import Prefetcher
from moeprune.calibration.work_dir import WorkDir, tensor_digest
from moeprune.engine.activations import ActivationStore
from moeprune.io.lazy_load import build_skeleton
from moeprune.engine.skeleton import materialise_prelude, resident_to_device, to_device, to_host
from moeprune.io.sharded_writer import parse_size

logger = logging.getLogger(__name__)


def _fingerprint(path: Path, batches: list[dict], batch_size: int, dense_tokens: int, dtype: torch.dtype, extra: dict) -> dict:
    digest = "-".join(tensor_digest(torch.cat([b["input_ids"].flatten(), b.get("attention_mask", torch.empty(0)).flatten().long()])) for b in batches)
    return {
        "checkpoint": str(path.resolve()),
        "shards": sorted({f"{f.name}:{f.stat().st_size}" for f in LazyCheckpoint(path).shards.values()}),
        "data": tensor_digest(torch.tensor(bytearray(digest.encode()))),
        "batches": len(batches),
        "batch_size": batch_size,
        "dense_tokens": dense_tokens,
        "dtype": str(dtype),
        **extra,
    }


def streamed_calibrate(
    path: str | Path,
    data: torch.Tensor | Iterable[dict[str, torch.Tensor]],
    batch_size: int = 8,
    dense_tokens: int = 0,
    progress: bool = True,
    meta: dict | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    memory_budget: str | int = "4GB",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    on_layer_done: Callable[[int], None] | None = None,
    fingerprint_extra: dict | None = None,
    sample_tokens: int = 0,
    sample_seed: int = 0,
) -> ExpertStats:
    """`calibrate` for checkpoint directory `path` without loading the whole model.

    `memory_budget` bounds the hidden states kept in memory (the rest spill to disk); `work_dir`
    makes the run resumable (`resume=True` continues a killed run); `on_layer_done(i)` is called
    after decoder layer i is committed (a test hook); `sample_tokens`/`sample_seed` as in `calibrate`.
    Layers are computed in `dtype` (default: the checkpoint's own, so bf16 stays bf16; no float32
    upcast) on `device`; the statistics accumulate in float64 on the CPU whatever both are.
    """
    from moeprune.io.loading import resolve_dtype

    path, device = Path(path), torch.device(device)
    dtype = resolve_dtype(dtype, path)
    batches = as_batches(data, batch_size)
    model = build_skeleton(path, dtype)
    resident_to_device(model, device)  # rotary tables and other buffers built outside the shards
    ckpt = LazyCheckpoint(path)
    keymap = KeyMap(model, ckpt.keys())
    prefix, layers = decoder_layers(model)
    budget = parse_size(memory_budget) // 2  # inputs and outputs of a layer share the budget
    scratch = None if work_dir is not None else tempfile.TemporaryDirectory(prefix="moeprune-acts-")
    work = None
    if work_dir is not None:
        extra = {**(fingerprint_extra or {}), **({"sample": [sample_tokens, sample_seed]} if sample_tokens else {})}
        fp = _fingerprint(path, batches, batch_size, dense_tokens, dtype, extra)
        work = WorkDir(work_dir, fp, resume)
    done = work.done() if work is not None else -1
    observer = Observer(model, dense_tokens=dense_tokens, sample_tokens=sample_tokens, sample_seed=sample_seed)
    started = time.perf_counter()
    with observer, torch.no_grad():
        if work is not None and done >= 0:
            loaded = work.load_stats(done)
            for index in observer.stats:
                if index <= done:
                    if index not in loaded:
                        raise FileNotFoundError(f"{work.path}: statistics of finished layer {index} are missing")
                    observer.stats[index] = loaded[index]
            logger.info("resuming after decoder layer %d", done)
        embed_names = materialise_prelude(model, keymap, ckpt, prefix, device, dtype)
        first_dir = work.path / "acts" / "input" if work is not None else Path(scratch.name) / "in"
        first_dir.mkdir(parents=True, exist_ok=True)
        current = ActivationStore(first_dir, budget)
        calls: list[list[tuple[tuple, dict]]] = []
        for b, batch in enumerate(batches):
            hidden, batch_calls = capture_calls(model, layers, batch, device)
            calls.append(batch_calls)
            if done < 0:
                current.put(b, to_host(hidden))
        release(model, embed_names)
        if done >= 0:
            current = ActivationStore.from_directory(work.acts_dir(done), len(batches), budget)

        ahead = Prefetcher(ckpt.shards, {i: keymap.keys_under(f"{prefix}.{i}") for i in range(done + 1, len(layers))})

        def load(index: int) -> None:
            ahead.ready(index)  # layer index's bytes were read ahead while the previous layer ran
            names[:] = materialise(model, keymap, ckpt, f"{prefix}.{index}", dtype)
            check_loaded(model, names)  # NaN/Inf in the layer just read: one line naming tensor and expert
            to_device(model, names, device)

        def new_store(index: int) -> ActivationStore:
            out_dir = work.partial_acts_dir(index) if work is not None else Path(scratch.name) / f"out{index % 2}"
            out_dir.mkdir(parents=True, exist_ok=True)
            for f in out_dir.glob("*.safetensors"):
                f.unlink()
            return ActivationStore(out_dir, budget)

        def after(index: int, outputs: ActivationStore) -> None:
            if work is not None:
                outputs.persist()
                work.commit(index, observer.stats.get(index), outputs.directory)
                outputs.directory = work.acts_dir(index)
            if on_layer_done is not None:
                on_layer_done(index)

        names: list[str] = []
        runner = LayerRunner(layers, calls, device, load=load, release=lambda index: release(model, names),
                             before_batch=lambda b: observer.set_mask(batches[b].get("attention_mask")), host=True)
        try:
            runner.run(current, start=done + 1, new_store=new_store, after=after, progress=progress,
                       desc="calibrating layers")
        finally:
            ahead.close()
        load_s, forward_s = runner.seconds["load"], runner.seconds["forward"]
        if work is not None:
            shutil.rmtree(first_dir, ignore_errors=True)
    if scratch is not None:
        scratch.cleanup()
    ckpt.close()
    logger.info("streamed calibration: %d layers, %.1fs (load %.1fs, forward %.1fs)", len(layers) - done - 1,
                time.perf_counter() - started, load_s, forward_s)
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    seq_len = max((b["input_ids"].shape[1] for b in batches), default=0)
    info = {"sequences": int(sequences), "seq_len": int(seq_len), "dense_tokens": int(dense_tokens),
            "stream_seconds": {"load": round(load_s, 3), "forward": round(forward_s, 3),
                               "total": round(time.perf_counter() - started, 3)}}
    if sample_tokens:
        info.update(sample_tokens=int(sample_tokens), sample_seed=int(sample_seed))
    info.update(meta or {})
    return observer.result(info)


