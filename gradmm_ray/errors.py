"""User-facing errors: one base class, one way to print them.

A ``UserError`` is a problem with what the user gave (config, data, model, output directory): its
message is one line naming the field, file, row or value and what was expected. Entry points
print it with ``one_line`` and exit 2; everything else is a bug or a cluster failure.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, reported as one line."""


class ConfigError(UserError):
    """A configuration problem (one or more, each naming the field)."""


class DataError(UserError):
    """A problem with the real data (naming file, column, row, value)."""


class ModelError(UserError):
    """A problem with model.name or the model's files."""


class OutputError(UserError):
    """A problem with the output directory."""


def one_line(prog: str, error: BaseException) -> str:
    """How every entry point prints an error: ``prog: error: message`` on a single line."""
    message = " ".join(str(error).split("\n")).strip() or type(error).__name__
    return f"{prog}: error: {message}"
