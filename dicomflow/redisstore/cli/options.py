"""The command group and the options every subcommand shares (the store's Redis, prefix, chunk size)."""

from __future__ import annotations

from dataclasses import dataclass

import click
import redis

from dicomflow.config import load_config
from dicomflow.errors import DicomflowError
from dicomflow.redisstore import RedisStore, StoreSettings
from dicomflow.redisstore.query import parse_date_range

#: Exit status of a failure the message explains (2, a usage error, is click's).
FAILED = 1


class Failure(click.ClickException):
    """A failure with exit status 1 and a message on stderr."""

    exit_code = FAILED


@dataclass
class Context:
    """The merged configuration; the store is built when a command needs it (so --help needs none)."""

    values: dict[str, str]

    @property
    def settings(self) -> StoreSettings:
        if not str(self.values.get("REDIS_STORE_URL", "")).strip():
            raise click.UsageError("no store: give --url redis://host:port/db or set REDIS_STORE_URL")
        try:
            return StoreSettings.from_config(self.values)
        except DicomflowError as exc:
            raise click.UsageError(str(exc)) from exc

    @property
    def queue_url(self) -> str | None:
        return self.values.get("DICOMFLOW_REDIS_URL") or None

    def store(self) -> RedisStore:
        """The store, after checking it is not the job queue's database (unless allowed)."""
        store = RedisStore.from_settings(self.settings)
        try:
            store.client.ping()
            if self.queue_url and not self.settings.allow_queue_db:
                store.check_not_queue(redis.Redis.from_url(self.queue_url))
        except redis.RedisError as exc:
            raise Failure(f"cannot reach the store's Redis at {_safe(self.settings.url)}: {exc}") from exc
        except DicomflowError as exc:
            raise Failure(str(exc)) from exc
        return store


def _safe(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    return f"{head.split('//')[0]}//…@{tail}" if at else url


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--url", envvar="REDIS_STORE_URL", metavar="URL",
              help="the store's Redis [env REDIS_STORE_URL, else the configuration file's]")
@click.option("--prefix", envvar="REDIS_STORE_PREFIX", help="key prefix [env REDIS_STORE_PREFIX; dicom:]")
@click.option("--chunk-kb", envvar="REDIS_STORE_CHUNK_KB", type=click.IntRange(1, 512 * 1024),
              help="chunk size of new writes, KiB [env REDIS_STORE_CHUNK_KB; 256]")
@click.option("--allow-queue-db", is_flag=True, envvar="REDIS_STORE_ALLOW_QUEUE_DB",
              help="allow the job queue's own Redis database (DICOMFLOW_REDIS_URL) [env REDIS_STORE_ALLOW_QUEUE_DB]")
@click.pass_context
def cli(ctx: click.Context, url: str | None, prefix: str | None, chunk_kb: int | None, allow_queue_db: bool) -> None:
    """DICOM files in Redis: load, get, find, count, delete, stats (docs/redisstore.md).

    Exit status: 0 done, 1 failed or nothing found (the message says why), 2 a usage error.
    """
    try:
        config = load_config()
    except DicomflowError as exc:
        raise Failure(str(exc)) from exc
    given = {"REDIS_STORE_URL": url, "REDIS_STORE_PREFIX": prefix, "REDIS_STORE_CHUNK_KB": chunk_kb,
             "REDIS_STORE_ALLOW_QUEUE_DB": "1" if allow_queue_db else None}
    ctx.obj = Context({**config, **{k: str(v) for k, v in given.items() if v is not None}})


def parse_filters(equal: tuple[str, ...], ranges: tuple[str, ...]) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """``FIELD=VALUE`` arguments and ``--range FIELD=YYYY[MM[DD]][-YYYY[MM[DD]]]`` options."""
    eq, rg = {}, {}
    for text in equal:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise click.UsageError(f"expected FIELD=VALUE, not {text!r}")
        eq[name] = value
    for text in ranges:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise click.UsageError(f"expected --range FIELD=FROM-TO, not {text!r}")
        try:
            rg[name] = parse_date_range(value)
        except ValueError as exc:
            raise click.UsageError(f"--range {text}: {exc}") from exc
    return eq, rg


FILTER_HELP = ("FILTERS are FIELD=VALUE (all must hold; indexed fields: PatientID, Modality, ProtocolName, "
               "StudyInstanceUID, SeriesInstanceUID, PatientSex, SOPClassUID, StudyDate, file_name).")
