"""Data-parallel calibration with `torch.distributed` (`torchrun`): gloo on CPU, nccl on GPU.

Every rank takes its share of the calibration batches (batch b goes to rank b mod world size, so
each batch is computed exactly as in a single process), calibrates it in memory or streamed
(`--offload`), and the statistics are combined with all-reduce: SUM for sums and counts, MAX for
the maxima (`stats.MAX_FIELDS`). Rank 0 then plans and writes; the others wait at a barrier.

    torchrun --nproc_per_node 2 -m moeprune.distributed MODEL --output stats.safetensors \
        [--offload] [--strategy reap --ratio 0.5 --prune-output pruned/]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moeprune.calibration.stats import MAX_FIELDS, ExpertStats

logger = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_device() -> torch.device:
    """This rank's GPU (`LOCAL_RANK`) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rank_batches(ids: torch.Tensor, batch_size: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's batches: batch b of the single-process split goes to rank b % world."""
    from moeprune.engine.runner import as_batches

    return as_batches(ids, batch_size)[rank::world]


def all_reduce_stats(stats: ExpertStats) -> ExpertStats:
    """Sum (max for maxima) every statistic over the ranks, in place; returns `stats`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for index in sorted(stats.layers):
        tensors = stats.layers[index].tensors
        for name in sorted(tensors):
            t = tensors[name].to(device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX if name in MAX_FIELDS else dist.ReduceOp.SUM)
            tensors[name] = t.cpu()
    sequences = torch.tensor([float(stats.meta.get("sequences", 0))], dtype=torch.float64, device=device)
    dist.all_reduce(sequences)
    stats.meta["sequences"] = int(sequences.item())
    stats.meta["world_size"] = dist.get_world_size()
    return stats


def distributed_calibrate(
    model_path: str,
    ids: torch.Tensor,
    batch_size: int = 8,
    dense_tokens: int = 0,
    offload: bool = False,
    work_dir: str | Path | None = None,
    resume: bool = False,
    memory_budget: str = "4GB",
    progress: bool = True,
    meta: dict | None = None,
) -> ExpertStats:
    """Calibrate this rank's share of `ids` and all-reduce; every rank returns the full statistics.

    `dense_tokens` is a per-rank sample size in data-parallel runs.
    """
    rank, world = init_distributed()
    batches = rank_batches(ids, batch_size, rank, world)
    if offload:
        from moeprune.io.loading import resolve_model_path
        from moeprune.calibration.streamed import streamed_calibrate

        rank_dir = None if work_dir is None else Path(work_dir) / f"rank{rank}-of-{world}"
        stats = streamed_calibrate(
            resolve_model_path(model_path), batches, batch_size, dense_tokens, progress and rank == 0, meta,
            work_dir=rank_dir, resume=resume, memory_budget=memory_budget, device=_rank_device(),
            fingerprint_extra={"rank": rank, "world": world},
        )
    else:
        from moeprune.calibration.observer import calibrate
        from moeprune.io.loading import load_model

        model = load_model(model_path)[0].to(_rank_device())
        stats = calibrate(model, batches, batch_size, dense_tokens, progress and rank == 0, meta)
    return all_reduce_stats(stats)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moeprune.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--ids", help="Calibration token ids saved with torch.save ([n, seq_len] LongTensor).")
    parser.add_argument("--calibration", default="builtin:mixed")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dense-tokens", type=int, default=0)
    parser.add_argument("--offload", action="store_true", help="Stream the checkpoint layer by layer.")
    parser.add_argument("--work-dir", help="Per-rank resumable checkpoints (with --offload).")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--memory-budget", default="4GB")
    parser.add_argument("--output", required=True, help="Statistics file (.safetensors), written by rank 0.")
    parser.add_argument("--strategy")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--prune-output", help="Rank 0 also plans and writes the pruned checkpoint here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace previous moeprune outputs at --output/--prune-output.")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def check_outputs(args: argparse.Namespace) -> None:
    """The output policy, before any calibration: neither output may be, contain or sit inside the
    input, replace foreign content, or have an unusable parent (every rank checks; nothing is written)."""
    from moeprune.io.loading import check_local_checkpoint, looks_like_local_path, resolve_model_path
    from moeprune.io.output_policy import check_output

    model_dir = resolve_model_path(args.model)
    if looks_like_local_path(model_dir) or Path(model_dir).exists():
        check_local_checkpoint(Path(model_dir))  # missing, not a checkpoint, truncated shard: one line
    check_output(args.output, [model_dir], kind="stats", overwrite=args.overwrite)
    if args.prune_output:
        check_output(args.prune_output, [model_dir, args.output], kind="checkpoint", overwrite=args.overwrite)
        if Path(args.prune_output).resolve() == Path(args.output).resolve():
            raise ValueError("--prune-output and --output are the same path; give two different paths")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    try:
        check_outputs(args)
    except (ValueError, OSError) as err:  # one line, exit 2, before any work
        print(f"Error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    rank, world = init_distributed()
    if args.ids:
        ids = torch.load(args.ids)
    else:
        from transformers import AutoTokenizer

        from moeprune.calibration.data import calibration_ids
        from moeprune.io.loading import resolve_model_path

        from moeprune.io.loading import trust_remote_code

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model), trust_remote_code=trust_remote_code())
        ids = calibration_ids(args.calibration, tokenizer, args.samples, args.seq_len, args.seed)
    meta = {"model": args.model, "source": args.ids or args.calibration}
    stats = distributed_calibrate(
        args.model, ids, args.batch_size, args.dense_tokens, args.offload, args.work_dir, args.resume,
        args.memory_budget, not args.quiet, meta,
    )
    if rank == 0:
        stats.save(args.output)
        print(f"rank 0/{world}: wrote {args.output} (hash {stats.digest()})")
        if args.prune_output:  # the same pipeline as `moeprune prune`, with the all-reduced statistics
            from moeprune.config import load_recipe
            from moeprune.pipeline import run

            recipe = load_recipe(None, {
                "model": args.model, "strategy": args.strategy or "reap", "ratio": args.ratio,
                "output": args.prune_output, "calibration.source": args.calibration, "calibration.samples": args.samples,
                "calibration.seq_len": args.seq_len, "calibration.seed": args.seed, "calibration.batch_size": args.batch_size,
                "calibration.dense_tokens": args.dense_tokens,
            })
            out = run(recipe, stats=stats, offload=args.offload, overwrite=args.overwrite, progress=not args.quiet).output
            print(f"rank 0/{world}: wrote {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
