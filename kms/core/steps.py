"""Blocking token operations the core yields to its caller instead of making them (sans-IO).

Most token calls of an exchange are short (an HMAC, a PRF: microseconds) and the core makes
them where it needs them. One is not: opening a PKE envelope (RFC 3830 4.2.5, RFC 6043 5.1
and 5.3 with PKE) is an RSA private-key decryption in the token, about a millisecond of CPU
in SoftHSM. The core's PK paths therefore run as *steps*: a generator that yields that one
operation as a :class:`TokenIo` and is sent back what it returned. A caller that serves many
calls from one event loop runs the operation in a thread and serves other calls meanwhile;
any other caller runs it at once on its own thread (:func:`drive`).

A :class:`TokenIo` never raises: it returns the operation's result or the exception it
raised, and the core re-raises that exception at the point where it yielded (:func:`token`),
so every error keeps the mapping it has when the core makes the call itself (a PKE that does
not decrypt -> Auth failure, a token that is gone -> UNAVAILABLE, ...).

The core imports no thread or event-loop machinery: where the operation runs is the caller's
decision alone.

A caller that gives up on a call while a yielded operation runs (its client cancelled, its
deadline passed) does not drop the steps: it throws :class:`CallCancelled` into them at the
yield where they wait (:func:`cancel`), and the core answers with the record of a cancelled
call (outcome CANCELLED, one audit record) instead of nothing. Throwing, rather than sending
a marker as the operation's answer, puts the cancellation at the exact point the core
waited, with everything it had noted so far on the stack, and needs no new member in any
answer type: every ``yield`` is a point where the call may end this way, as every ``await``
is for a coroutine.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class TokenIo(Generic[T]):
    """One blocking token operation, ``fn(*args)``, for the caller to run where it likes.
    Calling it returns the result, or the exception the operation raised (never raises one,
    so a thread pool's future or a plain call both hand it back the same way)."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __call__(self) -> T | Exception:
        try:
            return self.fn(*self.args)
        except Exception as exc:  # handed back to the core, which re-raises it where it yielded
            return exc

    def __repr__(self) -> str:  # never the arguments: they are message bytes
        return f"TokenIo({getattr(self.fn, '__name__', type(self.fn).__name__)})"


class CallCancelled(BaseException):
    """Thrown into a call's steps at the yield where they wait when their caller gives up
    on the call (:func:`cancel`). A BaseException, as asyncio's CancelledError and
    GeneratorExit are: no ``except Exception`` between the yield and the core's conversion
    point may turn it into a refusal of the message (an Auth failure of a PKE, ...)."""


# Steps of the core: they yield token operations, are sent back what each returned, and
# return ``R``.
Steps = Generator[TokenIo[Any], object, R]


def token(fn: Callable[..., T], *args: Any) -> Generator[TokenIo[Any], object, T]:
    """``fn(*args)`` as a step: ``x = yield from token(ks.rsa_decrypt, key, data, pad)``
    yields the operation and gives its result, or raises what the operation raised."""
    result = yield TokenIo(fn, *args)
    if isinstance(result, Exception):
        raise result
    return cast(T, result)


Y = TypeVar("Y")


def run_with(steps: Generator[Y, Any, R], run: Callable[[Y], object]) -> R:
    """Run ``steps`` to the end on this thread, each yielded operation made by ``run`` and
    its answer sent back."""
    try:
        io = next(steps)
        while True:
            io = steps.send(run(io))
    except StopIteration as done:
        return cast(R, done.value)


def cancel(steps: Generator[Any, Any, R]) -> R:
    """Tell ``steps``, suspended at a yield, that their call was cancelled: throws
    :class:`CallCancelled` there and returns what the steps then return (the core's reply
    with outcome CANCELLED). Steps that have already returned cannot be cancelled (the
    CallCancelled comes straight back: their record is written); steps that yield again
    instead of returning are closed, and RuntimeError says so."""
    try:
        steps.throw(CallCancelled())
    except StopIteration as done:
        return cast(R, done.value)
    steps.close()
    raise RuntimeError("steps went on after their call was cancelled")


def drive(steps: Generator[TokenIo[Any], object, R]) -> R:
    """Run ``steps`` to the end on this thread, each yielded operation at once."""
    return run_with(steps, TokenIo.__call__)


__all__ = ["CallCancelled", "Steps", "TokenIo", "cancel", "drive", "run_with", "token"]
