"""`delete` and `stats`."""

from __future__ import annotations

import json

import click

from dicomflow.redisstore.cli.options import Failure, cli


@cli.command("delete")
@click.argument("sops", nargs=-1)
@click.option("--file", "file_names", multiple=True, metavar="NAME", help="a file name instead; repeatable")
@click.pass_obj
def delete(ctx, sops: tuple[str, ...], file_names: tuple[str, ...]) -> None:
    """Remove instances (document, chunks, index entries). Exit status 1 if one was not stored."""
    if not sops and not file_names:
        raise click.UsageError("give SOPInstanceUIDs or --file NAME")
    store = ctx.store()
    missing = []
    targets = list(sops)
    for name in file_names:
        total, found = store.find({"file_name": name}, documents=False)
        if total == 0:
            missing.append(f"file name {name!r}")
        targets += [f.sop for f in found]
    for sop in targets:
        if store.delete(sop):
            click.echo(f"deleted {sop}")
        else:
            missing.append(sop)
    if missing:
        raise Failure("not stored: " + ", ".join(missing))


@cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_obj
def stats(ctx, as_json: bool) -> None:
    """Instances and bytes stored, and the store Redis's memory (used, per instance, limit)."""
    figures = ctx.store().stats()
    if as_json:
        click.echo(json.dumps(figures))
        return
    for key, value in figures.items():
        click.echo(f"{key}: {value}")
