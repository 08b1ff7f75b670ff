"""`moeprune calibrate | plan | apply | prune`: the three phases, separately or together."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moeprune.calibration.data import calibration_ids
from moeprune.calibration.observer import calibrate
from moeprune.calibration.stats import ExpertStats
from moeprune.cli.errors import user_errors
from moeprune.config import load_recipe
from moeprune.io.checkpoint import save_pruned
from moeprune.io.loading import BUNDLED, load_model
from moeprune.cli.device_options import device_option
from moeprune.click_groups import stack_options
from moeprune.devices import move_model, resolve_device
from moeprune.plan import Plan
from moeprune.strategies import available_strategies, get_strategy, plan
from moeprune.apply.surgery import apply_plan
from moeprune.sparsify.cli_options import sparsify_options
from moeprune.cli.method_options import naee_options
from moeprune.slimming.cli_options import slim_options
from moeprune.cli.load_options import load_options
from moeprune.auto.cli_options import auto_options
from moeprune.recover.cli_options import router_kd_options


def _calibration_options(fn):
    options = [
        click.option("--calibration", help="builtin:code | builtin:prose | builtin:mixed | FILE.txt/.jsonl | HF dataset name."),
        click.option("--samples", type=int, help="Calibration sequences."),
        click.option("--seq-len", type=int, help="Tokens per calibration sequence."),
        click.option("--seed", type=int, help="Seed for sampling calibration documents."),
        click.option("--batch-size", type=int, help="Sequences per forward pass."),
    ]
    return stack_options(fn, options)


def _strategy_options(fn):
    options = [
        click.option("--strategy", type=click.Choice(available_strategies() + ["auto"]),
                     help="Planning strategy; auto compares candidates by KL to the dense model (prune only)."),
        click.option("--ratio", type=float, help="Share of experts removed, in [0, 1)."),
        click.option("--budget", type=click.Choice(["layer", "global"]), help="Uniform per layer, or one global budget."),
        click.option("--protect-super/--no-protect-super", default=None, help="Never drop super experts (default on for REAP)."),
    ]
    return stack_options(fn, options)


@click.command()
@click.argument("model", default=BUNDLED)
@_calibration_options
@click.option("--dense-tokens", type=int, default=0, help="Also evaluate every expert on this many tokens per layer (HC-SMoE).")
@click.option("--sample-tokens", type=int, default=0,
              help="Also keep a seeded token sample per layer with expert-output Grams (NAEE; 2048 is its default).")
@click.option("--output", "-o", required=True, type=click.Path(), help="Statistics file (.safetensors).")
@click.option("--overwrite", is_flag=True, help="Replace an existing moeprune statistics file.")
@load_options()
@device_option()
@user_errors
def calibrate_command(model, calibration, samples, seq_len, seed, batch_size, dense_tokens, sample_tokens, output, overwrite,
                      load_overrides, device) -> None:
    """Collect routing and expert statistics in one pass."""
    from moeprune.cli.guards import calibration_after_load, calibration_before_load

    recipe = load_recipe(None, {"model": model, "calibration.source": calibration, "calibration.samples": samples,
                                "calibration.seq_len": seq_len, "calibration.seed": seed, "calibration.batch_size": batch_size,
                                **load_overrides, "device": device})
    out = calibration_before_load(recipe, output, overwrite)  # output and source: checked before loading
    where = resolve_device(recipe.device)  # a missing GPU fails before loading
    loaded, tokenizer, _ = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    move_model(loaded, where)
    cal = recipe.calibration
    fingerprint = calibration_after_load(recipe, loaded)  # seq-len warning, NaN/Inf weights, fingerprint
    ids = calibration_ids(cal.source, tokenizer, cal.samples, cal.seq_len, cal.seed)
    meta = {"model": recipe.model, "source": cal.source, "seed": cal.seed,
            "num_hidden_layers": loaded.config.get_text_config().num_hidden_layers, "fingerprint": fingerprint}
    stats = calibrate(loaded, ids, batch_size=cal.batch_size, dense_tokens=dense_tokens, meta=meta,
                      sample_tokens=sample_tokens, sample_seed=cal.seed)
    from moeprune.nonfinite import check_stats

    check_stats(stats)
    stats.save(out)
    click.echo(f"wrote {output} ({ids.numel()} tokens, {len(stats.layers)} MoE layers, hash {stats.digest()})")


@click.command()
@click.argument("stats_path")
@_strategy_options
@click.option("--model", "model_path", help="Checkpoint, for strategies that read expert weights.")
@click.option("--output", "-o", required=True, type=click.Path(), help="Plan file (.json).")
@click.option("--overwrite", is_flag=True, help="Replace an existing moeprune plan file.")
@load_options()
@user_errors
def plan_command(stats_path, strategy, ratio, budget, protect_super, model_path, output, overwrite, load_overrides) -> None:
    """Decide which experts to keep, from saved statistics (STATS_PATH), or from a checkpoint's
    expert weights alone for calibration-free strategies (`moeprune plan MODEL --strategy aimer`)."""
    strategy = strategy or "reap"
    spec = get_strategy(strategy)
    params = spec.common_params(budget or "layer", protect_super)  # checked before any model is loaded
    if not spec.needs_calibration and not Path(stats_path).is_file():  # aimer: MODEL, streamed expert weights only
        from moeprune.cli.plan_free import plan_data_free

        plan_data_free(model_path or stats_path, strategy, ratio, params, output, overwrite, load_overrides["dtype"])
        return
    if not Path(stats_path).is_file():
        raise click.UsageError(f"statistics file {stats_path} not found (run `moeprune calibrate` first)")
    if spec.needs_weights and not model_path:
        raise click.UsageError(f"strategy {strategy} reads expert weights: pass --model CHECKPOINT")
    from moeprune.io.output_policy import check_output
    from moeprune.nonfinite import check_stats

    out = check_output(output, [stats_path, model_path], kind="plan", overwrite=overwrite)
    stats = ExpertStats.load(stats_path)
    check_stats(stats)
    model = load_model(model_path, dtype=load_overrides["dtype"] or "auto")[0] if spec.needs_weights else None
    result = plan(stats, strategy, 0.5 if ratio is None else ratio, model=model, **params)
    if result.non_uniform_note():
        click.echo(f"warning: {result.non_uniform_note()}", err=True)
    result.save(out)
    click.echo(f"wrote {output}: experts per layer {result.experts_per_layer}")


@click.command()
@click.argument("model")
@click.argument("plan_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(), help="Output checkpoint directory.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--force", is_flag=True, help="Apply the plan even if it was made for another model (warns).")
@load_options()
@user_errors
def apply_command(model, plan_path, output, overwrite, force, load_overrides) -> None:
    """Apply a plan to a checkpoint and write the pruned checkpoint."""
    from moeprune.io.loading import resolve_model_path
    from moeprune.io.output_policy import check_output

    result = Plan.load(plan_path)  # plan and output are checked before the model is loaded
    check_output(output, [resolve_model_path(model), plan_path], kind="checkpoint", overwrite=overwrite)
    loaded, tokenizer, path = load_model(model, dtype=load_overrides["dtype"] or "auto")
    apply_plan(loaded, result, force=force)
    if result.non_uniform_note():
        click.echo(f"warning: {result.non_uniform_note()}", err=True)
    out = save_pruned(loaded, output, plan=result, tokenizer=tokenizer, input_dir=path, overwrite=overwrite)
    click.echo(f"wrote {out}")


@click.command()
@click.argument("model", required=False)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML recipe (configs/).")
@_strategy_options
@_calibration_options
@click.option("--output", "-o", type=click.Path(), help="Output checkpoint directory.")
@click.option("--eval/--no-eval", "evaluate", default=None, help="Print dense vs pruned held-out perplexity.")
@sparsify_options
@naee_options
@slim_options
@router_kd_options
@auto_options
@click.option("--offload/--no-offload", default=None,
              help="Stream the checkpoint layer by layer (default: automatic when it does not fit in memory).")
@click.option("--resume", is_flag=True, help="With --offload: continue a killed run from its last finished layer.")
@click.option("--memory-budget", default="4GB", show_default=True, help="With --offload: activations kept in memory.")
@click.option("--work-dir", type=click.Path(), help="With --offload: resumable per-layer checkpoints (default next to --output).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory (atomically, when complete).")
@load_options(allow_nonfinite=True)
@device_option()
@user_errors
def prune_command(model, config_path, strategy, ratio, budget, protect_super, calibration, samples, seq_len, seed,
                  batch_size, output, evaluate, sparsify_overrides, router_kd_overrides, auto_overrides, offload, resume, memory_budget, work_dir,
                  overwrite, load_overrides, device) -> None:
    """Calibrate, plan, apply and save in one go."""
    recipe = load_recipe(config_path, {
        "model": model, "strategy": strategy, "ratio": ratio, "budget": budget, "protect_super": protect_super,
        "calibration.source": calibration, "calibration.samples": samples, "calibration.seq_len": seq_len,
        "calibration.seed": seed, "calibration.batch_size": batch_size, "output": output, "evaluate": evaluate,
        **sparsify_overrides, **router_kd_overrides, **auto_overrides, **load_overrides, "device": device,
    })
    if not recipe.output:
        raise click.UsageError("--output is required (or `output:` in the recipe)")
    from moeprune.cli.guards import prune_before_load

    offload = prune_before_load(recipe, offload, resume, work_dir, overwrite)  # output and inputs: before any work
    if offload is None and recipe.evaluate:
        offload = False  # --eval measures the dense model in memory first unless --offload is asked for
    from moeprune.pipeline import run
    from moeprune.pipeline.entry import check_offloadable, choose_offload

    if choose_offload(recipe, offload):
        try:
            check_offloadable(recipe)
        except ValueError as err:
            raise click.UsageError(str(err)) from None
        result = run(recipe, offload=True, work_dir=work_dir, resume=resume, memory_budget=memory_budget,
                     overwrite=overwrite)
        click.echo(f"strategy {recipe.strategy}, ratio {recipe.ratio}: experts per layer {result.plan.experts_per_layer}")
        _describe_methods(result.plan.params)
        click.echo(f"wrote {result.output} (streamed)")
        if recipe.evaluate:  # both checkpoints streamed layer by layer (moeprune.evaluation.streamed_perplexity)
            from moeprune.cli.prune_eval import report_streamed_eval

            report_streamed_eval(recipe, result.output, memory_budget, click.echo)
        return
    dense_ppl = None
    if recipe.evaluate:
        from moeprune.cli.prune_eval import heldout_perplexities

        loaded, tokenizer, _ = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
        move_model(loaded, resolve_device(recipe.device))
        dense_ppl = heldout_perplexities(loaded, tokenizer, recipe.eval_max_tokens)
        result = run(recipe, loaded, tokenizer, overwrite=overwrite)
    else:
        result = run(recipe, overwrite=overwrite)
    click.echo(f"strategy {recipe.strategy}, ratio {recipe.ratio}: experts per layer {result.plan.experts_per_layer}")
    _describe_methods(result.plan.params)
    if result.report is not None:
        from moeprune.auto.select import format_report

        click.echo(format_report(result.report))
    click.echo(f"wrote {result.output}")
    if dense_ppl is not None:
        from moeprune.cli.prune_eval import heldout_perplexities

        pruned_ppl = heldout_perplexities(result.model, result.tokenizer, recipe.eval_max_tokens)
        click.echo("held-out perplexity   dense     pruned")
        for domain in dense_ppl:
            click.echo(f"  {domain:<18} {dense_ppl[domain]:>8.2f}  {pruned_ppl[domain]:>9.2f}")
        (Path(result.output) / "moeprune_eval.json").write_text(json.dumps({"dense": dense_ppl, "pruned": pruned_ppl}, indent=1))


def _describe_methods(params: dict) -> None:
    """One line each for sparsify, channel slimming, a matched task pattern and router KD, in memory or streamed."""
    if "sparsity" in params:  # intra-expert sparsity (moeprune.sparsify)
        done = params["sparsity"]
        click.echo(f"intra-expert {done['method']}: expert sparsity {done['expert_sparsity']:.3f}, "
                   f"total with expert removal {done['total_sparsity']:.3f}")
    if "slim" in params:  # channel slimming (moeprune.slimming)
        done = params["slim"]
        click.echo(f"channel slimming {done['method']}/{done['mode']}: {done['removed_share']:.3f} of expert channels removed, "
                   f"stored width {done['storage']['width']}")
    if "task" in params:  # PreMoE task patterns (moeprune.patterns)
        click.echo(f"query matched task {params['task']!r} (L2 distance {params['query_distance']:.4f})")
    if "router_kd" in params:  # router calibration (moeprune.recover)
        from moeprune.recover.cli_options import describe_report

        click.echo(describe_report(params["router_kd"]))
