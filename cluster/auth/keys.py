"""Ed25519 keys (PyNaCl): nodes sign receipts with them, peers sign requests with them.

Public keys and signatures travel as lowercase hex (64 and 128 characters), so they fit
HTTP headers, JSON and MongoDB documents unchanged.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import SigningKey, VerifyKey

from cluster.core.errors import ConfigError

PUBLIC_KEY_PATTERN = r"^[0-9a-f]{64}$"
SIGNATURE_PATTERN = r"^[0-9a-f]{128}$"
_PUBLIC_KEY = re.compile(PUBLIC_KEY_PATTERN)
_SIGNATURE = re.compile(SIGNATURE_PATTERN)


class KeyFormatError(ConfigError):
    """A key (or a key file) is not what it should be."""


class Ed25519Key:
    """A private ed25519 key. Only ever built from a 32-byte seed, so it can be
    stored as 64 hex characters (a file, a secret) and rebuilt bit for bit."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise KeyFormatError(f"an ed25519 seed is 32 bytes, got {len(seed)}")
        self._key = SigningKey(seed)
        self.public_key = self._key.verify_key.encode().hex()

    @classmethod
    def generate(cls) -> Ed25519Key:
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_hex(cls, seed_hex: str) -> Ed25519Key:
        try:
            seed = bytes.fromhex(seed_hex.strip())
        except ValueError as exc:
            raise KeyFormatError("an ed25519 private key must be 64 hex characters") from exc
        return cls(seed)

    @classmethod
    def from_file(cls, path: str | Path) -> Ed25519Key:
        """A key file holds the seed as 64 hex characters (whitespace ignored)."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise KeyFormatError(f"cannot read the key file {path}: {exc}") from exc
        return cls.from_hex(text)

    @property
    def seed_hex(self) -> str:
        return self._key.encode().hex()

    def sign(self, message: bytes) -> str:
        """The detached signature of ``message``, as hex."""
        return self._key.sign(message).signature.hex()

    def __repr__(self) -> str:  # never print the seed
        return f"Ed25519Key(public_key={self.public_key[:16]}...)"


def is_public_key(value: str) -> bool:
    return bool(_PUBLIC_KEY.fullmatch(value))


def verify_signature(public_key: str, message: bytes, signature: str) -> bool:
    """True when ``signature`` (hex) is ``public_key``'s signature of ``message``.

    Malformed keys or signatures are simply not valid: a caller judging untrusted input
    needs a yes or no, not a parser error.
    """
    if not _PUBLIC_KEY.fullmatch(public_key) or not _SIGNATURE.fullmatch(signature):
        return False
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(message, bytes.fromhex(signature))
    except (BadSignatureError, CryptoError, ValueError):
        return False
    return True
