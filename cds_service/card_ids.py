"""Card and suggestion uuids this service can recognise as its own without asking the store.

A card's uuid is derived from `hookInstance` and the card's content, so a retried call shows the
same uuid. With a per-deployment secret (`CDS_AUDIT_KEY`) the uuid also carries a signature:

    bytes 0-7   nonce: the first 8 bytes of a SHA-1 over the namespace, hookInstance and content
                (the uuid's version nibble, 4, falls in here)
    bytes 8-15  tag:   HMAC-SHA256(key, nonce), first 8 bytes (the RFC 4122 variant bits overwrite
                the top two, leaving 62 bits)

A suggestion's tag also covers its card's uuid, so "suggestion S belongs to card C" is checked the
same way. Every instance and worker sharing the key recognises every other's cards at once — while
their audit records are still on their way to the database, or while the database is down — so
feedback never has to wait for, or be refused because of, an audit row.

The uuid stays an ordinary RFC 4122 string (version 4 layout), which is what CDS clients expect to
echo back. Forging one takes about 2^61 attempts against the feedback endpoint per accepted guess.
The service always runs with a key: CDS_AUDIT_KEY, or without it a random key made once per run
(under `serve`, in the master, so all its workers share it); then another instance's, or an earlier
run's, cards do not verify and feedback for them is checked against the store instead. `evaluate`
signs as the service does: with CDS_AUDIT_KEY, else with the derived key the last `serve` or `demo` on
its database recorded there (`served_base`); with neither, uuids are plain uuid5 of the same parts.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

_NAMESPACE = uuid.UUID("6f1c1d0e-8a0b-5d53-9a43-6d2f0c3a7e11")
_KEY_LABEL = b"crc-cds card uuid v1"

_key: bytes | None = None


def configure(secret: bytes | None) -> None:
    """Sign the uuids minted from now on in this process with a key derived from `secret` (or stop)."""
    global _key
    _key = None if secret is None else hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def signing() -> bool:
    return _key is not None


def signing_key() -> bytes | None:
    """The key this process signs with. It is derived from the secret, which it does not reveal (the
    same secret keys the audit trail's patient hashes)."""
    return _key


def use_signing_key(key: bytes | None) -> None:
    """Sign with a key `signing_key()` gave in another process: `evaluate` beside a `serve` run that
    has no CDS_AUDIT_KEY mints the uuids that run mints."""
    global _key
    _key = key


_NAMESPACE_BYTES = _NAMESPACE.bytes


def _digest(parts: tuple[str, ...]) -> bytes:
    # Encoded with surrogatepass: chart text may hold a lone UTF-16 surrogate (JSON allows it as a
    # \u escape), and it must still hash instead of failing to encode.
    return hashlib.sha1(_NAMESPACE_BYTES + "|".join(parts).encode("utf-8", "surrogatepass")).digest()


def _tag(key: bytes, nonce: bytes, card: bytes = b"") -> bytes:
    return hmac.digest(key, card + nonce, "sha256")[:8]  # hmac.new(...).digest(), in one C call


def _signed(nonce_source: bytes, key: bytes, card: bytes = b"") -> str:
    nonce = bytearray(nonce_source[:8])
    nonce[6] = (nonce[6] & 0x0F) | 0x40  # version 4
    tag = bytearray(_tag(key, bytes(nonce), card))
    tag[0] = (tag[0] & 0x3F) | 0x80  # RFC 4122 variant
    text = (nonce + tag).hex()  # str(uuid.UUID(bytes=...)) without building the object
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def card_uuid(hook_instance: str, content: str) -> str:
    digest = _digest((hook_instance, content))
    if _key is None:
        return str(uuid.UUID(bytes=digest[:16], version=5))
    return _signed(digest, _key)


def suggestion_uuid(card: str, key: str) -> str:
    digest = _digest((card, key))
    if _key is None:
        return str(uuid.UUID(bytes=digest[:16], version=5))
    return _signed(digest, _key, bytes.fromhex(card.replace("-", "")))  # uuid.UUID(card).bytes, faster


def _verifies(value: str, card: bytes = b"") -> bool:
    if _key is None:
        return False
    try:
        raw = uuid.UUID(value).bytes
    except (ValueError, TypeError, AttributeError):
        return False
    expected = bytearray(_tag(_key, raw[:8], card))
    expected[0] = (expected[0] & 0x3F) | 0x80
    return hmac.compare_digest(bytes(expected), raw[8:])


def is_ours(card: str) -> bool:
    """True when `card` is a card uuid minted with this deployment's key (False without a key)."""
    return _verifies(card)


def belongs_to(suggestion: str, card: str) -> bool:
    """True when `suggestion` was minted with this deployment's key for the card `card`."""
    try:
        card_bytes = uuid.UUID(card).bytes
    except (ValueError, TypeError, AttributeError):
        return False
    return _verifies(suggestion, card_bytes)
