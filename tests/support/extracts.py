"""Helpers of the deid service's tests (tests/test_extracts_*.py): the service's packages loaded from
services/, a study folder of sag-anon files, a projects folder and its files, the configuration the
service reads, and a throwaway PostgreSQL database for the export records."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.postgres import throwaway_database

REPO = Path(__file__).resolve().parents[2]
#: The deid service's worker package and its registry package (the callback).
DEID_MODULE = REPO / "services" / "modules" / "deid"
DEID_REGISTRY = REPO / "services" / "registry" / "deid"


def load_package(path: Path, name: str) -> ModuleType:
    """The package at `path` (its ``__init__.py``), imported under `name` (one name per test module,
    so that each has its own copy)."""
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def copy_study(sag_anon: Path, folder: Path, count: int) -> Path:
    """The first `count` files of sag-anon (one MR series) copied into `folder` (made here)."""
    folder.mkdir()
    for source in sorted(sag_anon.glob("*.dcm"))[:count]:
        shutil.copy(source, folder / source.name)
    return folder


def project_folder(root: Path, files: Mapping[str, str]) -> Path:
    """``<root>/projects`` with one ``<slug>.yaml`` of each text of `files` (by slug)."""
    folder = root / "projects"
    folder.mkdir()
    for slug, text in files.items():
        (folder / f"{slug}.yaml").write_text(text)
    return folder


def pacs_project(endpoint: str, env_prefix: str, secret_env: str) -> str:
    """The text of project ``pacs``: every study, to the one DICOMweb destination `endpoint`, whose URL is
    ``<env_prefix>_URL``; its secret in `secret_env`."""
    return (f"slug: pacs\nstudies: {{all: true}}\nsecret: {{env: {secret_env}}}\n"
            f"destinations:\n  dicom: [{endpoint}]\n  endpoints:\n"
            f"    {endpoint}: {{type: dicomweb, secrets: {{envPrefix: {env_prefix}}}}}\n")


def extracts_config(projects: Path, tmp_path: Path, db_url: str | None = None, **extra: str) -> dict[str, str]:
    """The configuration of the deid service: `projects`, the extracts and the state under `tmp_path`,
    the records in `db_url` (default: SQLite in the state folder), and the `extra` keys."""
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_EXTRACTS_DIR": str(tmp_path / "extracts"),
              "DICOMFLOW_HOME": str(tmp_path / "home"), **extra}
    if db_url:
        config["DICOMFLOW_DB_URL"] = db_url
    return config


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for the export records, per test module (import it by name)."""
    with throwaway_database() as url:
        yield url
