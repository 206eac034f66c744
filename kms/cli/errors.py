"""The CLI's one error type, in a module of its own so that the sub-command modules can
raise it without importing the package that imports them."""

from __future__ import annotations


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""
