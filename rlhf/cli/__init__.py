"""`rlhf` command line. Stage commands are built from each stage's config dataclass, so every
config key is also a ``--key value`` option and its help is the field's documentation.

Heavy libraries (torch, transformers, trl, peft) are imported only when a command runs.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import typing

import click

from rlhf.stages import STAGES  # the stage table: strings only, stage modules are imported on use


def _option_help(f: dataclasses.Field, tp) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, list):
        default = ",".join(map(str, default))
    return f"{f.metadata.get('help', '')} [default: {default}]"


class StageCommand(click.Command):
    """A stage: CONFIG.yaml plus ``--key value`` overrides of any config key."""

    def __init__(self, name: str):
        self.spec = STAGES[name]
        short = self.spec.help
        super().__init__(
            name,
            help=f"{short}\n\nCONFIG is a YAML file of config keys; any key can be overridden as --key value, "
            "--key=value or key=value (dashes or underscores; lists comma-separated). Example:\n\n"
            f"    rlhf {name} configs/demo/{name}.yaml --learning-rate 1e-4 --lora-target q_proj,v_proj",
            short_help=short,
            context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
            params=[click.Option(["--help", "-h"], is_flag=True, help="Show every config key and exit.")],
            callback=self.run,
        )

    def format_options(self, ctx, formatter):
        cls = self.spec.config_class()
        hints = typing.get_type_hints(cls)
        rows = [(f"--{f.name.replace('_', '-')}", _option_help(f, hints[f.name])) for f in dataclasses.fields(cls)]
        with formatter.section("Config keys (YAML key or --option)"):
            formatter.write_dl(rows)

    def collect_usage_pieces(self, ctx):
        return ["[CONFIG.yaml]", "[--key value ...]"]

    def run(self, help):
        ctx = click.get_current_context()
        if help:
            click.echo(ctx.get_help())
            ctx.exit()
        from rlhf.config import load_config, parse_overrides
        from rlhf.logging_utils import setup_logging

        setup_logging()  # before the config: its aliases say in the log what they set (rlhf/aliases.py)
        args = list(ctx.args)
        config = args.pop(0) if args and not args[0].startswith("-") and "=" not in args[0] else None
        _run_stage(self.spec, load_config(self.spec.config_class(), config, parse_overrides(args)))


def _run_stage(spec, cfg):
    """Run a stage, its dataset names checked first (no model loads for a misspelt name)."""
    from rlhf.data import check_names
    from rlhf.dist import close_process_group, process_rank
    from rlhf.errors import disk_errors
    from rlhf.logging_utils import setup_logging

    check_names(cfg)
    setup_logging()
    with disk_errors(cfg.output_dir):
        out = spec.load().run(cfg)
    if process_rank() == 0:
        click.echo(f"done: {out}")
    close_process_group()  # under torchrun/accelerate launch, before interpreter exit (see its docstring)


def user_error(e: Exception) -> click.ClickException:
    """The one ``Error:`` line of a user error (exit 2 for a bad config, else 1)."""
    from rlhf.config import ConfigError

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    out = click.ClickException("; ".join(lines) or type(e).__name__)
    out.exit_code = 2 if isinstance(e, ConfigError) else 1
    return out


class LazyGroup(click.Group):
    def invoke(self, ctx):
        """The one place user errors are caught, for every command: one line, no traceback (RLHF_DEBUG=1 shows it).
        Under several processes each meets the same error; the main one says it."""
        from rlhf.dist import process_rank
        from rlhf.errors import RlhfError, disk_error

        try:
            return super().invoke(ctx)
        except (RlhfError, OSError) as e:
            err = e if isinstance(e, (RlhfError, FileNotFoundError)) else disk_error(e)
            if err is None or os.environ.get("RLHF_DEBUG", "") not in ("", "0"):
                raise
            if process_rank() != 0:
                sys.exit(1)
            raise user_error(err) from None

    def list_commands(self, ctx):
        return sorted([*STAGES, *super().list_commands(ctx)])

    def get_command(self, ctx, name):
        if name in STAGES:
            return StageCommand(name)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rlhf")
def cli():
    """RLHF with memory-efficient tuning: sft -> rm -> ppo on one (quantized) base with LoRA adapters.

    An error prints one `Error:` line saying what, where and what to do; RLHF_DEBUG=1 shows its traceback.
    """


@cli.group()
def datasets():
    """The dataset registry: list and show datasets by name."""


@datasets.command("list")
@click.option("--registry-file", default=None, help="Your registry file, merged over the built-in one.")
def datasets_list(registry_file):
    """List registered datasets: name, format, description."""
    from rlhf.data import list_datasets

    rows = list_datasets(registry_file)
    width = max(len(r[0]) for r in rows)
    for name, fmt, desc in rows:
        click.echo(f"{name:<{width}}  {fmt:<12}  {desc}")


@datasets.command("show")
@click.argument("name")
@click.option("--registry-file", default=None, help="Your registry file, merged over the built-in one.")
def datasets_show(name, registry_file):
    """Show one dataset: format, source, columns, license, first rows."""
    from rlhf.data import describe

    click.echo(describe(name, registry_file))


def _register():
    from rlhf.cli.convert import convert_cmd
    from rlhf.cli.estimate import estimate_cmd
    from rlhf.cli.export import export_cmd
    from rlhf.cli.pipeline import inspect_cmd, pipeline_cmd
    from rlhf.cli.use import chat, eval_cmd, generate_cmd, score

    for cmd in (pipeline_cmd, inspect_cmd, export_cmd, chat, generate_cmd, eval_cmd, score, estimate_cmd,
                convert_cmd):
        cli.add_command(cmd)


_register()


def main():
    cli(prog_name="rlhf")


if __name__ == "__main__":
    sys.exit(main())
