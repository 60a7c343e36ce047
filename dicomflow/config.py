"""Reading the one `.env`-style configuration file, with environment variables on top."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from dicomflow.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)

#: Environment variables with these prefixes join the configuration even when the
#: file does not name them (so `CHRIS_URL=... run.sh` works).
ENV_PREFIXES = ("DICOMFLOW_", "ORTHANC_", "CHRIS_", "REPACK_", "NATS_", "EXPORT_", "REDIS_STORE_")

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_env_file(text: str, source: str = "<config>") -> dict[str, str]:
    """Parse `KEY=VALUE` lines; `#` comments, blank lines and quotes as in shell.

    Raises:
        ConfigError: a line that is neither blank, a comment nor an assignment.
    """
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"{source}:{number}: expected KEY=VALUE, got {stripped!r}")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


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
            values = parse_env_file(file.read_text(), str(file))
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
