"""Fixtures of the ChRIS tests (loaded with `pytest_plugins`): a storage root and CUBE doubles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cube_double import CubeDouble


@pytest.fixture()
def files_root(tmp_path: Path) -> Path:
    """An empty CUBE storage root."""
    root = tmp_path / "cube-data"
    root.mkdir()
    return root


@pytest.fixture()
def make_cube(files_root: Path) -> Iterator[Callable[..., CubeDouble]]:
    """Start CUBE doubles on free ports (stopped after the test)."""
    started: list[CubeDouble] = []

    def make(mode: str = "cube5", **kwargs: Any) -> CubeDouble:
        kwargs.setdefault("basic_cost", 0.0)
        double = CubeDouble(files_root, mode=mode, **kwargs).start()
        started.append(double)
        return double

    yield make
    for double in started:
        double.stop()
