"""`get`, `find` and `count`: the three demo scenarios are each one command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dicomflow.redisstore.cli.options import FILTER_HELP, Failure, cli, parse_filters
from dicomflow.redisstore.errors import RedisStoreError
from dicomflow.redisstore.fetch import fetch


@cli.command("get")
@click.argument("sop", required=False)
@click.option("--file", "file_name", metavar="NAME", help="the file name instead of a SOPInstanceUID")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="write to this file (parallel, bounded memory) instead of stdout")
@click.option("-c", "--connections", default=8, show_default=True, help="parallel connections with -o")
@click.pass_obj
def get(ctx, sop: str | None, file_name: str | None, output: Path | None, connections: int) -> None:
    """The bytes of one file, by SOPInstanceUID or --file NAME, SHA-256 verified.

    Exit status 1 when it is not stored (or the name is ambiguous, or the bytes do not verify).
    """
    if (sop is None) == (file_name is None):
        raise click.UsageError("give a SOPInstanceUID or --file NAME (one of them)")
    store = ctx.store()
    try:
        if output is None:
            found = store.get(sop, file_name=file_name)
            sys.stdout.buffer.write(found.data)
            sys.stdout.buffer.flush()
            return
        if sop is None:
            sop = _sop_of(store, file_name)
        result = fetch(ctx.settings.url, sop, str(output), prefix=ctx.settings.prefix, connections=connections)
    except RedisStoreError as exc:
        raise Failure(str(exc)) from exc
    click.echo(f"{output}: {result.size} bytes, SHA-256 verified, {result.mb_per_s:.0f} MB/s", err=True)


def _sop_of(store, file_name: str) -> str:
    total, found = store.find({"file_name": file_name}, documents=False)
    if total == 0:
        raise Failure(f"no stored instance with file name {file_name!r}")
    if total > 1:
        raise Failure(f"{total} stored instances have the file name {file_name!r}: give the SOPInstanceUID")
    return found[0].sop


@cli.command("find", epilog=FILTER_HELP)
@click.argument("filters", nargs=-1)
@click.option("--range", "ranges", multiple=True, metavar="FIELD=FROM-TO",
              help="a date range, YYYY[MM[DD]] on either side (StudyDate, PatientBirthDate); repeatable")
@click.option("--limit", default=0, show_default=True, help="at most this many (0: all)")
@click.option("--with-bytes", "with_bytes", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="also fetch the files (SHA-256 verified) and write them into DIR under their names")
@click.option("--json", "as_json", is_flag=True, help="one JSON document per line")
@click.pass_obj
def find(ctx, filters: tuple[str, ...], ranges: tuple[str, ...], limit: int, with_bytes: Path | None,
         as_json: bool) -> None:
    """The stored instances matching every FILTER and --range, by SOPInstanceUID.

    Prints SOPInstanceUID, file name and size per line (or --json). Exit status 1 when none matches.
    """
    eq, rg = parse_filters(filters, ranges)
    store = ctx.store()
    try:
        total, found = store.find(eq, rg, limit=limit, with_bytes=with_bytes is not None)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except RedisStoreError as exc:
        raise Failure(str(exc)) from exc
    if with_bytes is not None:
        with_bytes.mkdir(parents=True, exist_ok=True)
    for inst in found:
        if with_bytes is not None:
            name = os.path.basename(inst.file_name) or f"{inst.sop}.dcm"
            (with_bytes / name).write_bytes(inst.data)
        if as_json:
            click.echo(json.dumps({"SOPInstanceUID": inst.sop, **inst.doc}, ensure_ascii=False))
        else:
            click.echo(f"{inst.sop}\t{inst.file_name}\t{inst.doc.get('size', '')}")
    click.echo(f"{total} found" + (f", {len(found)} shown" if len(found) < total else ""), err=True)
    if total == 0:
        raise click.exceptions.Exit(1)


@cli.command("count", epilog=FILTER_HELP)
@click.option("--by", "by", required=True, metavar="FIELD", help="the field to group by (any indexed field)")
@click.argument("filters", nargs=-1)
@click.option("--range", "ranges", multiple=True, metavar="FIELD=FROM-TO", help="a date range; repeatable")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_obj
def count(ctx, by: str, filters: tuple[str, ...], ranges: tuple[str, ...], as_json: bool) -> None:
    """How many stored instances have each value of FIELD (among those matching the filters)."""
    eq, rg = parse_filters(filters, ranges)
    try:
        counts = ctx.store().count(by, eq, rg)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(counts, ensure_ascii=False))
        return
    for value, n in counts.items():
        click.echo(f"{n}\t{value}")
