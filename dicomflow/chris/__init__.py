"""Storing DICOM instances into ChRIS (CUBE) and registering them, as oxidicom does (cube.md)."""

from dicomflow.chris.progress import recent_series, series_progress
from dicomflow.chris.settings import ChrisSettings, Registration, chris_enabled

__all__ = ["ChrisSettings", "Registration", "chris_enabled", "recent_series", "series_progress"]
