"""A destination's URL and credentials, read from the project's secrets when a send needs them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dicomflow.config import parse_env_file
from dicomflow.errors import ConfigError
from dicomflow.extracts.destinations.errors import DestinationConfigError
from dicomflow.extracts.project import Endpoint, Project

#: The keys a destination's secrets may hold.
KEYS = ("URL", "USERNAME", "PASSWORD", "TOKEN")
#: The URL schemes each kind of destination takes.
SCHEMES = {"dicomweb": ("http", "https"), "ftps": ("ftps",)}


@dataclass(frozen=True)
class Credentials:
    """Where a destination is and how to log in; the password and token never show in a repr."""

    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    #: The CA file the server's certificate must chain to (None: the system's CAs).
    ca_file: Path | None = None


def read_credentials(project: Project, name: str, endpoint: Endpoint,
                     environ: Mapping[str, str] | None = None) -> Credentials:
    """Read destination `name`'s secrets (environment variables or file) and check them.

    Raises:
        DestinationConfigError: a variable or the file is missing, the URL is missing, of the
            wrong scheme or carries credentials, a password is missing, the CA file is not there.
            Messages name the variable or file, never a secret's value.
    """
    ref = endpoint.secrets
    if ref.env_prefix is not None:
        environ = os.environ if environ is None else environ
        values = {key: (environ.get(f"{ref.env_prefix}_{key}") or "").strip() for key in KEYS}
        where = {key: f"environment variable {ref.env_prefix}_{key}" for key in KEYS}
    else:
        path = project.path(ref.file)
        try:
            parsed = parse_env_file(path.read_text(encoding="utf-8"), str(path))
        except OSError as exc:
            raise DestinationConfigError(name, f"cannot read its secrets file {path}: {exc.strerror}") from exc
        except ConfigError as exc:
            # the message quotes the bad line, which may hold a secret: name the file only
            raise DestinationConfigError(name, f"its secrets file {path} is not KEY=VALUE lines") from exc
        unknown = sorted(set(parsed) - set(KEYS))
        if unknown:
            raise DestinationConfigError(name, f"its secrets file {path} has unknown keys {', '.join(unknown)} "
                                               f"(known: {', '.join(KEYS)})")
        values = {key: parsed.get(key, "").strip() for key in KEYS}
        where = {key: f"{key} in {path}" for key in KEYS}
    url = values["URL"]
    if not url:
        raise DestinationConfigError(name, f"its URL is not set ({where['URL']})")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES[endpoint.type] or not parts.hostname:
        raise DestinationConfigError(name, f"{where['URL']} must be a {' or '.join(SCHEMES[endpoint.type])} "
                                           f"URL with a host, for a {endpoint.type} destination")
    if parts.username or parts.password:
        raise DestinationConfigError(name, f"{where['URL']} carries credentials: give them as USERNAME and "
                                           "PASSWORD instead (a URL ends up in logs)")
    if endpoint.type == "ftps" and not (values["USERNAME"] and values["PASSWORD"]):
        raise DestinationConfigError(name, f"an FTPS destination needs {where['USERNAME']} and {where['PASSWORD']}")
    if values["PASSWORD"] and not values["USERNAME"]:
        raise DestinationConfigError(name, f"{where['PASSWORD']} is set without {where['USERNAME']}")
    ca_file = project.path(endpoint.ca_file) if endpoint.ca_file is not None else None
    if ca_file is not None and not ca_file.is_file():
        raise DestinationConfigError(name, f"its CA file {ca_file} does not exist "
                                           f"(destinations.endpoints.{name}.caFile)")
    return Credentials(url=url, username=values["USERNAME"], password=values["PASSWORD"], token=values["TOKEN"],
                       ca_file=ca_file)
