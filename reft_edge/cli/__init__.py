"""The ``reft-edge`` command: the ``main`` group and its error handling; one module per stage holds
that stage's commands (train.py: train, train-many, import; export.py: export; run.py: run, chat,
inspect, convert; eval.py: eval; serve.py: serve, serve-web; common.py: what they share).

Example::

    from reft_edge.cli import main
    main(["inspect", "alice.reft"])          # as `reft-edge inspect alice.reft`; also python -m reft_edge.cli

Each command imports its stage only when it runs, so ``reft-edge run`` never imports torch, and
``reft-edge --help`` works with only click installed (no command module imports numpy at module
level; tests/test_cli.py checks it).

Errors the user can cause print one line (what, where, fix) and exit 2; anything
unexpected prints a short message and where the full traceback was written (exit 1);
``--verbose`` shows tracebacks.
"""

from __future__ import annotations

import tempfile
import traceback

import click

from reft_edge import __version__
from reft_edge.cli.common import parse_layers, printable
from reft_edge.cli.eval import eval_command
from reft_edge.cli.export import export_command
from reft_edge.cli.run import chat_command, convert_command, inspect_command, run_command
from reft_edge.cli.serve import serve_command, serve_web_command
from reft_edge.cli.train import import_command, train_command, train_many_command
from reft_edge.errors import ReftEdgeError

__all__ = ["main", "parse_layers", "printable"]


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except ReftEdgeError as exc:
            if ctx.meta.get("verbose"):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except OSError as exc:
            if exc.filename is None or not exc.strerror:
                _internal_error(ctx, exc)
            # a full disk, a folder made read-only meanwhile: the system's fault or the user's, never ours
            if ctx.meta.get("verbose"):
                traceback.print_exc()
            click.echo(
                f"error: {exc.filename}: {exc.strerror}; free space or fix the permissions there, "
                "or choose another path",
                err=True,
            )
            ctx.exit(2)
        except Exception as exc:
            _internal_error(ctx, exc)


def _internal_error(ctx: click.Context, exc: Exception) -> None:
    """An internal error: keep the terminal readable, keep the details; exit 1."""
    if ctx.meta.get("verbose"):
        traceback.print_exc()
    else:
        with tempfile.NamedTemporaryFile("w", prefix="reft-edge-crash-", suffix=".txt", delete=False) as log:
            traceback.print_exc(file=log)
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (traceback in {log.name}; --verbose prints it)", err=True
        )
    ctx.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="reft-edge")
@click.option("--verbose", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Personalise one frozen language model with kilobyte LoReFT patches."""
    ctx.meta["verbose"] = verbose


for _command in (
    train_command,
    train_many_command,
    import_command,
    export_command,
    run_command,
    chat_command,
    inspect_command,
    convert_command,
    eval_command,
    serve_command,
    serve_web_command,
):
    main.add_command(_command)
