"""Placeholder: filled in by the gRPC service / endpoint work (issue 5)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:  # argparse._SubParsersAction
    del sub
