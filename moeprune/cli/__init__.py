"""The `moeprune` command: calibrate | plan | apply | prune | inspect | eval."""

from __future__ import annotations

import logging

import click

from moeprune._version import __version__
from moeprune.cli.inspect_cmd import inspect_command
from moeprune.cli.pipeline_cmds import apply_command, calibrate_command, plan_command, prune_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moeprune")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Make Mixture-of-Experts language models smaller."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)


main.add_command(inspect_command, "inspect")
main.add_command(calibrate_command, "calibrate")
main.add_command(plan_command, "plan")
main.add_command(apply_command, "apply")
main.add_command(prune_command, "prune")

from moeprune.cli.patterns_cmd import patterns_command  # noqa: E402  (PreMoE task patterns)

main.add_command(patterns_command, "patterns")

try:
    from moeprune.cli.eval_cmd import eval_command

    main.add_command(eval_command, "eval")
except ImportError:  # evaluation extras missing
    pass
