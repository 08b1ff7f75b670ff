"""Benchmark the streamed (--offload) prune on a synthetic checkpoint: peak memory and wall time.

Side by side in one run, each in its own process so peak RSS is its own:
  1. baseline read: every tensor of the checkpoint read once, shard by shard;
  2. streamed prune: streamed calibration + plan + streamed apply (what `moeprune prune --offload` runs);
  3. baseline write: the pruned checkpoint's bytes written once;
  4. an import-only process (the RSS of python + torch + transformers, for reference).
Printed against the targets of issue 10: peak RSS <= 1 GB + 1.5 x one decoder layer's bytes, and
wall <= 1.5 x (read once + write once + forward compute), where forward compute is the time spent
inside the decoder layers' forwards. Layers are computed in the checkpoint's dtype (bf16) on
`--device` (streamed calibration's default), statistics in float64.

    python scripts/bench_offload.py --size-gb 4 --num-experts 128 --dir /tmp/moeprune-bench
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_read(path: str) -> dict:
    from moeprune.io.lazy_reader import LazyCheckpoint

    start = time.perf_counter()
    ckpt = LazyCheckpoint(path)
    for key in ckpt.keys_by_shard():
        ckpt.get(key).clone()  # safetensors maps the file lazily: copy to really read the bytes
    return {"seconds": time.perf_counter() - start, "bytes": ckpt.bytes_read, "peak_rss_mb": _rss_mb()}


def child_write(path: str, nbytes: int) -> dict:
    import torch

    from moeprune.io.sharded_writer import ShardedWriter

    block = torch.zeros(64 * 2**20, dtype=torch.uint8)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    writer = ShardedWriter(out, "1GB")
    written, i = 0, 0
    while written < nbytes:
        n = min(block.numel(), nbytes - written)
        writer.add(f"t{i}", block[:n])
        written, i = written + n, i + 1
    writer.close()
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "bytes": written, "peak_rss_mb": _rss_mb()}


def child_prune(path: str, out: str, args: argparse.Namespace) -> dict:
    import torch

    from moeprune.strategies import plan
    from moeprune.calibration.streamed import streamed_calibrate
    from moeprune.apply.streamed import streamed_apply

    ids = torch.randint(0, 256, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    stats = streamed_calibrate(path, ids, batch_size=args.batch_size, memory_budget=args.memory_budget,
                               work_dir=Path(out).parent / "bench-work", progress=False, device=args.device)
    cal_s = time.perf_counter() - start
    result = plan(stats, "frequency", args.ratio)
    tick = time.perf_counter()
    streamed_apply(path, result, out, overwrite=True, max_shard_size=args.out_shard_size, progress=False)
    apply_s = time.perf_counter() - tick
    marker = json.loads((Path(out) / "moeprune_complete.json").read_text())
    shutil.rmtree(Path(out).parent / "bench-work", ignore_errors=True)
    return {"seconds": time.perf_counter() - start, "calibrate_s": cal_s, "apply_s": apply_s,
            "timing": stats.meta["stream_seconds"], "bytes_out": marker["bytes"], "bytes_read_apply": marker["bytes_read"],
            "peak_rss_mb": _rss_mb()}


def child_import() -> dict:
    import moeprune.calibration.streamed  # noqa: F401
    import moeprune.apply.streamed  # noqa: F401

    return {"peak_rss_mb": _rss_mb()}


def _run(mode: str, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--num-experts", type=int, default=32)
    parser.add_argument("--shard-size", default="1GB", help="Input shard size of the synthetic checkpoint.")
    parser.add_argument("--out-shard-size", default="1GB")
    parser.add_argument("--dir", default="/tmp/moeprune-bench")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--memory-budget", default="256MB")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoint for the next run.")
    parser.add_argument("--device", default="cpu", help="Device the streamed layers run on (cpu, cuda, cuda:N, auto).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    ckpt, out = root / f"synthetic-{args.size_gb:g}gb-{args.num_experts}e", root / "pruned"
    if args.child:
        fn = {"read": lambda: child_read(str(ckpt)), "write": lambda: child_write(str(root / "write-test"), int(args.child_args[0])),
              "prune": lambda: child_prune(str(ckpt), str(out), args), "import": child_import}[args.child]
        print(json.dumps(fn()))
        return
    if not (ckpt / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_synthetic_checkpoint import make_checkpoint

        make_checkpoint(ckpt, args.size_gb, args.num_experts, shard_size=args.shard_size)
    common = ["--size-gb", str(args.size_gb), "--num-experts", str(args.num_experts), "--dir", args.dir]
    opts = common + ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                     "--ratio", str(args.ratio), "--memory-budget", args.memory_budget, "--out-shard-size", args.out_shard_size,
                     "--device", args.device]
    read = _run("read", *common)
    prune = _run("prune", *opts)
    write = _run("write", *common, "--", str(prune["bytes_out"]))
    imp = _run("import", *common)
    print(json.dumps({"read": read, "prune": prune, "write": write, "import": imp}))  # raw figures first
    size = read["bytes"]
    forward = prune["timing"]["forward"]
    denom = read["seconds"] + write["seconds"] + forward
    config = json.loads((ckpt / "config.json").read_text())
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_synthetic_checkpoint import layer_shapes

    shapes_cfg = {**config, "num_experts": config.get("num_experts") or config.get("num_local_experts")}
    layer_bytes = sum(math.prod(shape) for shape in layer_shapes(shapes_cfg).values()) * 2  # bf16
    rss_target_mb = (1e9 + 1.5 * layer_bytes) / 2**20
    print(f"\nsynthetic Qwen3-30B-A3B-shaped checkpoint: {size / 1e9:.2f} GB, {config['num_hidden_layers']} layers x "
          f"{config.get('num_experts') or config.get('num_local_experts')} experts, bf16; calibration {args.samples}x{args.seq_len} tokens; ratio {args.ratio}")
    rows = [
        ("checkpoint size", f"{size / 1e9:.2f} GB"),
        ("read once (baseline)", f"{read['seconds']:.1f} s"),
        ("write pruned once (baseline)", f"{write['seconds']:.1f} s ({write['bytes'] / 1e9:.2f} GB)"),
        ("forward compute (in layers)", f"{forward:.1f} s"),
        ("streamed calibration", f"{prune['calibrate_s']:.1f} s (layer loading {prune['timing']['load']:.1f} s)"),
        ("streamed apply", f"{prune['apply_s']:.1f} s (read {prune['bytes_read_apply'] / 1e9:.2f} GB)"),
        ("streamed prune wall", f"{prune['seconds']:.1f} s"),
        ("peak RSS streamed prune", f"{prune['peak_rss_mb']:.0f} MB (import-only process: {imp['peak_rss_mb']:.0f} MB)"),
        ("one decoder layer", f"{layer_bytes / 1e9:.3f} GB"),
        ("peak RSS / checkpoint size", f"{prune['peak_rss_mb'] * 2**20 / size:.3f}"),
        ("peak RSS vs 1 GB + 1.5 x layer", f"{prune['peak_rss_mb']:.0f} MB vs {rss_target_mb:.0f} MB "
                                            f"({'met' if prune['peak_rss_mb'] <= rss_target_mb else 'NOT met'})"),
        ("wall / (read + write + forward)", f"{prune['seconds'] / denom:.2f} (target <= 1.5: "
                                             f"{'met' if prune['seconds'] / denom <= 1.5 else 'NOT met'})"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
