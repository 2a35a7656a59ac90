"""The `ssmq` command: argument parsing and printing only; all logic lives in the library."""

from __future__ import annotations

import logging
import sys

import click

from ssmq.cli.bench import bench_cmd
from ssmq.cli.calibrate import calibrate_cmd
from ssmq.cli.eval import eval_group
from ssmq.cli.models import generate_cmd, info_cmd
from ssmq.cli.quantize import quantize_cmd
from ssmq.cli.scales import scales_group, sweep_group
from ssmq.errors import SsmqError


class _Group(click.Group):
    """Turns SsmqError into one clear line on stderr and exit code 2 (no traceback for user errors)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SsmqError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def cli(verbose: bool) -> None:
    """ssmq: post-training quantization of Mamba language models, every scale named and visible.

    MODEL is a local checkpoint directory (transformers or mamba_ssm layout), a quantized
    checkpoint written by ssmq, or a built-in name (tiny-mamba1, tiny-mamba2).
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for command in (info_cmd, generate_cmd, calibrate_cmd, quantize_cmd, eval_group, scales_group, sweep_group, bench_cmd):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli()
