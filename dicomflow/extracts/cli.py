"""`dicomflow-export`: research extracts' bookkeeping from the command line (docs/extracts.md).

One argparse parser with a subcommand per operation; each subcommand is a function
`(args, context) -> int` registered with `command(...)`, so another module adds one with a
few lines (the destinations' `rate`). The settings are built once from the configuration
(`DICOMFLOW_CONFIG` and the environment) and passed down.

Exit status of every command: 0 done, 1 failed or nothing found (the message says why),
2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dicomflow.config import load_config, settings_from_config
from dicomflow.errors import DicomflowError
from dicomflow.extracts.project import ExtractSettings

PROG = "dicomflow-export"
EXIT_CODES = "Exit status: 0 done, 1 failed or nothing found (the message says why), 2 a usage error."


@dataclass
class Context:
    """What every subcommand gets: the configuration and the extracts' settings built from it."""

    config: dict[str, str]
    settings: ExtractSettings

    def redis(self):
        """A Redis client for the pipeline's DICOMFLOW_REDIS_URL (re-running jobs, rate limits)."""
        import redis

        from dicomflow.settings import Settings

        return redis.Redis.from_url(Settings.from_config(self.config).redis_url)


Handler = Callable[[argparse.Namespace, Context], int]
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]] = []


def command(name: str, help_text: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `arguments(parser)` adds its arguments, the decorated function runs it."""
    def register(handler: Handler) -> Handler:
        _COMMANDS.append((name, help_text, arguments, handler))
        return handler
    return register


def _project_study(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project", metavar="PROJECT", help="the project's slug")
    parser.add_argument("study", metavar="STUDY", nargs="?",
                        help="a study: its pseudonymised StudyInstanceUID (as exported) or its original one")


def _project(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("project", metavar="PROJECT", help="the project's slug")


def emit(value: Any) -> None:
    """Print a command's answer as indented JSON (what the API answers too)."""
    print(json.dumps(value, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    """The parser with every registered subcommand."""
    from dicomflow.extracts import commands  # noqa: F401 - registers the bookkeeping subcommands
    from dicomflow.extracts.destinations import ratecmd  # noqa: F401 - registers `rate` (issue 20)

    parser = argparse.ArgumentParser(
        prog=PROG, description="Research extracts: which studies went out for a project, and re-running them.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="the .env-style configuration (default $DICOMFLOW_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, arguments, handler in _COMMANDS:
        one = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES)
        arguments(one)
        one.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit status (0 done, 1 failed or nothing found, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:  # argparse exits 0 for --help, 2 for a usage error
        return int(exc.code or 0)
    try:
        config = load_config(args.config)
        context = Context(config, settings_from_config(ExtractSettings, config, "extracts"))
        return args.handler(args, context)
    except DicomflowError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


__all__ = ["Context", "command", "emit", "main", "_project", "_project_study"]


if __name__ == "__main__":
    raise SystemExit(main())
