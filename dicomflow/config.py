"""Reading the one `.env`-style configuration file, with environment variables on top."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from dotenv.parser import parse_stream
from pydantic import BaseModel, ValidationError

from dicomflow.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)

#: Environment variables with these prefixes join the configuration even when the
#: file does not name them (so `CHRIS_URL=... run.sh` works).
ENV_PREFIXES = ("DICOMFLOW_", "ORTHANC_", "CHRIS_", "REPACK_", "NATS_", "EXPORT_", "REDIS_STORE_")


def parse_env_file(text: str, source: str = "<config>", *, for_compose: bool = False) -> dict[str, str]:
    """Parse `KEY=VALUE` lines by python-dotenv's rules: `export` prefix, `#` comments, spaces
    around `=` and the value trimmed, `=` inside values, quotes, values over several lines in quotes.

    Args:
        for_compose: the file Docker Compose reads too (run.sh's configuration file): refuse
            what Compose reads differently, or differently from one of its versions to the
            next, so that the file means the same to both (docs/configuration.md).

    Raises:
        ConfigError: a line that is neither blank, a comment nor an assignment, or (with
            `for_compose`) a value written in one of those ways; the message names its line
            and says how to write it, never the value.
    """
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        line, raw = binding.original.line, binding.original.string.strip()
        if binding.error or (binding.key is not None and binding.value is None):
            raise ConfigError(f"{source}:{line}: expected KEY=VALUE, got {raw!r}")
        if binding.key is None:  # blank or comment
            continue
        if for_compose:
            problem = _read_differently_by_compose(raw.partition("=")[2].lstrip(), binding.value)
            if problem:
                raise ConfigError(f"{source}:{line}: {binding.key}: {problem}")
        values[binding.key] = binding.value
    return values


def _read_differently_by_compose(written: str, value: str) -> str | None:
    """Why Docker Compose would read `value` (`written` so after the `=`) differently, or None."""
    quote = written[:1]
    if "$" in value and quote != "'":
        return ("Docker Compose expands the '$' in this value and dicomflow would not; "
                "write the value in single quotes ('...')")
    if "#" in value and quote not in ("'", '"'):
        return "Docker Compose cuts this value at its '#' (some versions); write the value in quotes"
    if "\\" in written and quote in ("'", '"'):
        return ("Docker Compose versions differ on backslashes in quotes; write the value without "
                "quotes (a backslash is then kept as it is)")
    return None


def load_config(path: str | os.PathLike | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The configuration as one flat mapping of strings.

    Args:
        path: the `.env`-style file; default `$DICOMFLOW_CONFIG`, else none.
        environ: the environment (default `os.environ`); its values override the file's.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("DICOMFLOW_CONFIG")
    values: dict[str, str] = {}
    if path:
        file = Path(path)
        try:
            values = parse_env_file(file.read_text(), str(file), for_compose=True)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {file} does not exist") from exc
    for key, value in environ.items():
        if key in values or key.startswith(ENV_PREFIXES):
            values[key] = value
    return values


def settings_from_config(model: type[Model], values: Mapping[str, str], what: str, **extra: Any) -> Model:
    """Validate the configuration `values` that `model` names (its field aliases) into a `model`.

    Empty values count as unset (the field's default applies). `extra` is passed as is.

    Raises:
        ConfigError: a value is missing or has the wrong form; the message names the key.
    """
    known = {f.alias for f in model.model_fields.values() if f.alias}
    given = {k: v for k, v in values.items() if k in known and str(v).strip() != ""}
    try:
        return model.model_validate({**given, **extra})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid {what} configuration: {problems}") from exc


def _main(argv: list[str] | None = None) -> int:
    """`python -m dicomflow.config --shell`: the merged configuration as shell assignments."""
    import argparse
    import shlex
    import sys

    parser = argparse.ArgumentParser(description="print the dicomflow configuration")
    parser.add_argument("--config", default=None, help="the .env-style file (default $DICOMFLOW_CONFIG)")
    parser.add_argument("--shell", action="store_true", help="print KEY='value' lines for eval in bash")
    args = parser.parse_args(argv)
    try:
        values = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key in sorted(values):
        if args.shell:
            print(f"{key}={shlex.quote(values[key])}")
        else:
            print(f"{key}={values[key]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
