"""`dicomflow-export rate DEST [N|default]`: show or change a destination's rate at run time."""

from __future__ import annotations

import argparse

from dicomflow.extracts.cli import Context, command, emit
from dicomflow.extracts.destinations import rates
from dicomflow.ratelimit import RateLimitError


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("destination", metavar="DEST", help="a destination's name (destinations.endpoints)")
    parser.add_argument("rate", metavar="N|default", nargs="?",
                        help="instances per second for every worker together (0: no limit); `default`: back to "
                             "the project file's rate; none: show the rate in force")


def _value(text: str) -> float | None:
    if text.strip().lower() == "default":
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise RateLimitError(f"N is a number of instances per second >= 0, or `default`; not {text!r}") from exc


@command("rate", "Show or change a destination's rate at run time, for every worker, without a restart.", _arguments)
def rate(args: argparse.Namespace, context: Context) -> int:
    projects_dir = context.settings.projects_dir
    connection = context.redis()
    if args.rate is None:
        emit(rates.destination_rate(connection, projects_dir, args.destination))
    else:
        emit(rates.change_rate(connection, projects_dir, args.destination, _value(args.rate)))
    return 0
