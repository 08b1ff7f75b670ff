"""Peak RSS of the in-memory prune (`moeprune prune --no-offload`) against the checkpoint's size.

Issue 10's target: in-memory path, peak RSS <= 1.3 x the checkpoint's bytes in its own dtype. A
synthetic bf16 Qwen3-MoE checkpoint (`make_synthetic_checkpoint.py`: Qwen3-30B-A3B tensor shapes,
`--num-experts` per layer, as many layers as fit `--size-gb`) is pruned through the real CLI in a
subprocess; its peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper that runs only that
command) is printed next to an import-only process (python + torch + transformers + the CLI), so
the ratio is given both raw and net of that fixed cost (which dominates below ~2 GB).

    python scripts/bench_memory.py --size-gb 0.5 --num-experts 16 --dir /tmp/moeprune-bench-mem
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = "from moeprune.cli import main; main()"


def measure(cmd: list[str]) -> dict:
    """Run `cmd` in a fresh wrapper process; its wall seconds and peak RSS (MB)."""
    wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=ROOT)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {result['rc']}):\n{proc.stderr[-3000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--dir", default="/tmp/moeprune-bench-mem")
    parser.add_argument("--strategy", default="frequency")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic checkpoint for the next run.")
    args = parser.parse_args()
    root = Path(args.dir)
    ckpt, out = root / f"synthetic-{args.size_gb:g}gb-{args.num_experts}e", root / "pruned-in-memory"
    if not (ckpt / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_synthetic_checkpoint import make_checkpoint

        make_checkpoint(ckpt, args.size_gb, args.num_experts, progress=False)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    calib = root / "calibration.txt"
    calib.write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}" for i in range(400)))
    imp = measure([sys.executable, "-c", "import moeprune.cli, moeprune.api, transformers, torch"])
    tick = time.perf_counter()
    prune = measure([sys.executable, "-c", CLI, "prune", str(ckpt), "--no-offload", "--strategy", args.strategy,
                     "--ratio", str(args.ratio), "--calibration", str(calib), "--samples", str(args.samples),
                     "--seq-len", str(args.seq_len), "--device", args.device, "-o", str(out), "--overwrite"])
    wall = time.perf_counter() - tick
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    config = json.loads((ckpt / "config.json").read_text())
    peak, base = prune["peak_rss_mb"] * 2**20, imp["peak_rss_mb"] * 2**20
    print(json.dumps({"checkpoint_bytes": size, "output_bytes": out_bytes, "prune": prune, "import": imp}))
    print(f"\nsynthetic Qwen3-MoE checkpoint (Qwen3-30B-A3B shapes), {config['num_hidden_layers']} layers x "
          f"{args.num_experts} experts, bf16; {args.strategy} ratio {args.ratio}; calibration {args.samples} x "
          f"{args.seq_len} tokens on {args.device}")
    rows = [
        ("checkpoint size", f"{size / 1e9:.3f} GB ({size / 2**20:.0f} MiB)"),
        ("pruned output", f"{out_bytes / 1e9:.3f} GB"),
        ("in-memory prune wall", f"{wall:.1f} s"),
        ("peak RSS in-memory prune", f"{prune['peak_rss_mb']:.0f} MiB"),
        ("peak RSS import-only process", f"{imp['peak_rss_mb']:.0f} MiB"),
        ("peak RSS / checkpoint bytes", f"{peak / size:.2f} (target <= 1.3: {'met' if peak / size <= 1.3 else 'NOT met'})"),
        ("(peak - import-only) / checkpoint bytes", f"{(peak - base) / size:.2f}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)


if __name__ == "__main__":
    main()
