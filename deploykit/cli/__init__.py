"""The command line: `deploykit export | bench | profile | report | audit | models`.

The top layer. It parses options, reads defaults and choices from the library's registries (`options`: each
option defined once), calls the library per command (`app`), and turns the library's errors into one
line and an exit code. It may import every layer below; nothing imports it.
"""

from deploykit.cli.app import main

__all__ = ["main"]
