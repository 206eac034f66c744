"""Errors of the KMS home."""

from __future__ import annotations


class HomeError(Exception):
    """A user-facing problem with the KMS home; one line, never a secret."""


class HomeNotInitialised(HomeError):
    """The folder has no kms.toml."""


class HomeExists(HomeError):
    """init was asked to overwrite an initialised home."""
