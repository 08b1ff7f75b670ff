"""Checks `moeprune calibrate` makes before and right after loading the model (nothing is written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from moeprune.config import PruneRecipe


def calibration_before_load(recipe: PruneRecipe, output: str | Path, overwrite: bool) -> Path:
    """The statistics file may be written (output policy) and the calibration source exists."""
    from moeprune.io.input_checks import check_text_source
    from moeprune.io.loading import resolve_model_path
    from moeprune.io.output_policy import check_output

    from moeprune.io.output_policy import clean_stale

    check_text_source(recipe.calibration.source)
    out = check_output(output, [resolve_model_path(recipe.model)], kind="stats", overwrite=overwrite)
    clean_stale(out)  # a `.partial` file of a killed earlier run
    return out


def calibration_after_load(recipe: PruneRecipe, model: nn.Module) -> dict[str, Any]:
    """Warn on a too long --seq-len, refuse NaN/Inf weights; returns the model's fingerprint."""
    from moeprune.fingerprint import model_fingerprint
    from moeprune.io.input_checks import check_seq_len
    from moeprune.nonfinite import check_weights

    check_seq_len(model.config, recipe.calibration.seq_len)
    check_weights(model, allow=False)
    return model_fingerprint(model)


def prune_before_load(recipe: PruneRecipe, offload: bool | None, resume: bool, work_dir: str | None, overwrite: bool) -> bool | None:
    """`moeprune prune` checks before anything is loaded; returns the offload choice (`--resume`
    implies `--offload`; `--resume --no-offload` and `--work-dir` without offload are refused)."""
    import click

    from moeprune.io.input_checks import check_text_source
    from moeprune.io.loading import check_local_checkpoint, looks_like_local_path, resolve_model_path
    from moeprune.io.output_policy import check_output

    if resume and offload is False:
        raise click.UsageError("--resume continues a killed --offload run; the in-memory path keeps nothing to resume "
                               "from: drop --no-offload (or --resume)")
    if resume:
        offload = True
    if work_dir and offload is False:
        raise click.UsageError("--work-dir is for --offload runs; drop --no-offload (or --work-dir)")
    path = Path(resolve_model_path(recipe.model)).expanduser()
    if path.exists():
        check_local_checkpoint(path)
    elif looks_like_local_path(str(path)):
        raise FileNotFoundError(f"model path {path} does not exist; give an existing checkpoint directory")
    check_text_source(recipe.calibration.source)
    check_output(recipe.output, [path], kind="checkpoint", overwrite=overwrite)
    if work_dir:
        check_output(work_dir, [path, recipe.output], kind="workdir")
    return offload
