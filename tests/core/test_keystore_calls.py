"""How many key-store operations an exchange makes under each long-term key: the initial
message's keys (0x01) and the response's (0x02) come from the sender's PSK in one operation
(RFC 6043 5.1.2), and a forged message costs the same whether its identity is registered."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from hsm.software import SoftwareKeyStore
from kms.endpoint.initiator import DesiredPolicy
from kms.keystore import Digest, Key, KeyRef
from kms.mikey.constants import KeyDataType
from kms.mikey.message import Message
from kms.mikey.payloads import KeyData, KvSpi, Verification
from tests.core.world import ALICE, BOB, DAVE, World


class CountingStore(SoftwareKeyStore):
    """The world's software store, counting PRF operations per long-term key label and
    recording each one's output lengths."""

    def __init__(self, inner: SoftwareKeyStore) -> None:
        self.__dict__.update(inner.__dict__)
        self.prf_calls: Counter[str] = Counter()
        self.lengths: list[tuple[str, tuple[int, ...]]] = []

    def prf_many(
        self, key: Key, requests: Sequence[tuple[bytes, int]], func: Digest
    ) -> list[bytes]:
        if isinstance(key, KeyRef):
            self.prf_calls[key.label] += 1
            self.lengths.append((key.label, tuple(n for _, n in requests)))
        return super().prf_many(key, requests, func)


def counting(world: World) -> CountingStore:
    store = CountingStore(world.kms.deps.keystore)
    world.kms.deps.keystore = store
    return store


def psk_label(who: bytes) -> str:
    return "psk/" + who.hex()


def test_request_and_resolve_use_each_psk_and_the_tpk_once(world: World) -> None:
    store = counting(world)
    grant = world.grant(DesiredPolicy(responders=(BOB,)))
    # Alice's PSK once (V check and response keys), the TPK once (the ticket's keys).
    assert store.prf_calls == {psk_label(ALICE): 1, "tpk/1": 1}
    # 0x01 auth key (SHA-1: 20 bytes) then the 0x02 encr, auth and salt keys (16, 20, 14).
    assert (psk_label(ALICE), (20, 16, 20, 14)) in store.lengths
    store.prf_calls.clear()
    keys_a, call, _ = world.call(grant, BOB)
    assert keys_a[0].key_and_salt == call.srtp[0].key_and_salt
    assert store.prf_calls[psk_label(BOB)] == 1 and store.prf_calls["tpk/1"] == 1


def test_supplied_keys_are_opened_with_keys_from_the_same_operation(world: World) -> None:
    store = counting(world)
    tek = KeyData(
        KeyDataType.TEK_SALT, bytes(range(16)), bytes(range(100, 114)), KvSpi(b"\x00\x00\x00\x07")
    )
    grant = world.grant(DesiredPolicy(responders=(BOB,), supplied_teks=(tek,)))
    assert store.prf_calls[psk_label(ALICE)] == 1
    # The 0x01 keys in full (to open the desired KEMAC), then the 0x02 keys.
    assert (psk_label(ALICE), (16, 20, 14, 16, 20, 14)) in store.lengths
    _, call, _ = world.call(grant, BOB)
    assert call.session_keys == (tek,)


def _forged(world: World, who: bytes) -> bytes:
    ini = world.initiator(who)
    wire, _ = ini.request_ticket(DesiredPolicy(responders=(BOB,)), world.now)
    msg = Message.decode(wire)
    v = msg.payloads[-1]
    assert isinstance(v, Verification)
    bad = replace(v, mac=bytes(len(v.mac)))
    return Message(msg.header, (*msg.payloads[:-1], bad)).encode()


def test_forged_messages_cost_the_same_work_registered_or_not(world: World) -> None:
    store = counting(world)
    reply = world.request(ALICE, _forged(world, ALICE))
    assert not reply.ok
    registered = list(store.lengths)
    store.lengths.clear()
    world.directory.psks.pop(DAVE)  # Dave unregistered: verified against the dummy key
    reply_unknown = world.request(DAVE, _forged(world, DAVE))
    assert not reply_unknown.ok
    assert reply_unknown.data == reply.data
    assert [n for _, n in store.lengths] == [n for _, n in registered] == [(20, 16, 20, 14)]
    assert store.lengths[0][0] != psk_label(DAVE)
