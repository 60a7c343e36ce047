"""dicomflow: shared code of the scheduler, the workers and the built-in services."""

__version__ = "0.1.0"
