"""Thin command-line layer over the Python API. Each module here adds its sub-commands."""

# Modules that define ``register(subparsers)``; main.py imports those that exist.
COMMAND_MODULES = [
    "data",
    "teacher",
    "bank",
    "sample",
    "generate",
    "analyze",
    "train",
    "evaluate",
    "pipeline",
    "bench",
]
