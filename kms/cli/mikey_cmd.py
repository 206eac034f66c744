"""``kms mikey decode``: the message inspector (issue 2)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:  # argparse._SubParsersAction
    del sub
