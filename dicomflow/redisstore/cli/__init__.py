"""`dicomflow-redis`: the Redis DICOM store from the command line (one click group, a module per concern).

Exit status of every command: 0 done, 1 failed or nothing found (the message says why),
2 a usage error.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from dicomflow.redisstore.cli.options import cli
from dicomflow.redisstore.cli import admin, bench, load, read  # noqa: F401 - registers the subcommands


def main(args: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status."""
    try:
        cli.main(args=list(args) if args is not None else None, prog_name="dicomflow-redis", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    return 0


__all__ = ["cli", "main"]
