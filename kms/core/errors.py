"""Refusals: a MIKEY error number, the outcome the adapter maps to a status, and a reason.

``detail`` is what the peer sees (one line, no secrets, opaque where detail would help an
attacker); ``reason`` is what the audit log records.
"""

from __future__ import annotations

from kms.core.api import Outcome
from kms.mikey.constants import ErrorNo


class Refusal(Exception):
    def __init__(
        self,
        error_no: ErrorNo,
        outcome: Outcome,
        detail: str,
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.error_no = error_no
        self.outcome = outcome
        self.detail = detail
        self.reason = reason or detail


def malformed(reason: str) -> Refusal:
    return Refusal(ErrorNo.UNSPECIFIED, Outcome.MALFORMED, "malformed MIKEY message", reason)


def auth_failure(reason: str) -> Refusal:
    # Every authentication failure looks the same to the peer (unknown key, bad MAC, bad
    # signature, bad PKE): detail would help an attacker.
    return Refusal(ErrorNo.AUTH_FAILURE, Outcome.UNAUTHENTICATED, "authentication failed", reason)


def denied(error_no: ErrorNo, detail: str, reason: str | None = None) -> Refusal:
    return Refusal(error_no, Outcome.DENIED, detail, reason)


def precondition(error_no: ErrorNo, detail: str, reason: str | None = None) -> Refusal:
    return Refusal(error_no, Outcome.PRECONDITION, detail, reason)

