"""Operator commands (init, endpoint, group, keys, tpk): filled in by issue 3."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:  # argparse._SubParsersAction
    del sub


__all__ = ["argparse", "register"]
