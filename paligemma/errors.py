"""The base of every error this library raises for bad input, files or settings.

    try:
        paligemma.load_model(path)
    except paligemma.PaliGemmaError as err:  # ConfigError, CheckpointError, TokenizerError, ImageError, ...
        print(err)

Each concrete error also derives from the built-in class it has always been (mostly ValueError),
so code that catches those keeps working. Anything else that escapes is a bug. The command line
prints a PaliGemmaError as one `error: ...` line and exits 2 (docs/cli.md).
"""

from __future__ import annotations


class PaliGemmaError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""


class UsageError(PaliGemmaError, ValueError):
    """An argument, option or setting that cannot be used: out of range, inconsistent with another,
    or needing an optional package that is not installed. The message names it."""
