"""`moeprune plan MODEL --strategy aimer`: a plan from expert weights alone, no statistics file.

Calibration-free strategies (`needs_calibration=False`) read only the routed-expert weights,
streamed one MoE layer at a time from the shards (`pipeline.offloaded.plan_from_weights`),
so the checkpoint is never loaded whole and no calibration runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def plan_data_free(model: str, strategy: str, ratio: float | None, params: dict[str, Any], output: str,
                   overwrite: bool, dtype: str | None, echo: Callable[[str], None] | None = None) -> Path:
    """Plan `strategy` for checkpoint `model` (a local directory or the bundled name) and save it to `output`."""
    import click

    from moeprune.io.loading import check_local_checkpoint, resolve_model_path
    from moeprune.io.output_policy import check_output
    from moeprune.pipeline.offloaded import plan_from_weights

    path = Path(resolve_model_path(model))
    if not path.is_dir():
        raise FileNotFoundError(f"{model} is neither a statistics file nor a local checkpoint directory")
    check_local_checkpoint(path)
    out = check_output(output, [path], kind="plan", overwrite=overwrite)
    result = plan_from_weights(path, strategy, 0.5 if ratio is None else ratio, dtype or "auto", **params)
    if result.non_uniform_note():
        click.echo(f"warning: {result.non_uniform_note()}", err=True)
    result.save(out)
    (echo or click.echo)(f"wrote {output}: experts per layer {result.experts_per_layer} (from expert weights, no statistics)")
    return out
