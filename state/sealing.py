"""Confidential and secret values encrypted at rest, and stored payloads authenticated by a keyed MAC.

A sealed value is ``{"$sealed": "v1.<key id>.<base64url(nonce | ciphertext | tag)>"}``: AES-256-GCM
(`cryptography`) of the value's canonical JSON, with associated data binding where the value
belongs (run, context, scope, variable, sensitivity): a ciphertext copied to another run, context
or variable, or relabelled public, fails to open.

Keys come from ``RUNCTX_ENCRYPTION_KEYS`` (``id:base64-key,...``, newest first) or, when that is
unset, from a key file runctx makes in its data directory (mode 0600). The newest key seals;
every key opens what it sealed. A stored payload's checksum is an HMAC-SHA256 under a key derived
from the newest key (``<key id>:<hex>``), so whoever can write Redis cannot forge an entry.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from state.errors import ContextCorruption, KeyNotHeld, SettingsError
from state.limits import canonical_json

SEALED = "$sealed"  # the one key of a sealed value's mapping
KEYS_SETTING = "RUNCTX_ENCRYPTION_KEYS"
KEY_FILE = "encryption.key"  # in the data directory, when no keys are configured
_NONCE_BYTES = 12


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(SEALED), str)


def binding(run_id: str, context_id: str, scope: str, name: str, sensitivity: str) -> bytes:
    """The associated data of a value: where it belongs and how sensitive it is."""
    return "\0".join(("runctx/v1", run_id, context_id, scope, name, sensitivity)).encode()


@dataclass(frozen=True)
class Keyring:
    """The encryption keys of a process, newest first. Owns nothing else; immutable."""

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise SettingsError(KEYS_SETTING, "no key given")

    # ---- where keys come from ----------------------------------------------------------------

    @classmethod
    def parse(cls, spec: str, *, source: str = KEYS_SETTING) -> Keyring:
        keys = []
        for number, entry in enumerate(part.strip() for part in spec.split(",") if part.strip()):
            key_id, sep, encoded = entry.partition(":")
            if not sep or not key_id or not key_id.isalnum() or len(key_id) > 32:
                raise SettingsError(source, f"entry {number + 1}: expected <key id>:<base64 key> (id: letters and digits)")
            try:
                key = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise SettingsError(source, f"key {key_id!r}: not base64") from None
            if len(key) != 32:
                raise SettingsError(source, f"key {key_id!r}: {len(key)} bytes, expected 32 (AES-256)")
            keys.append((key_id, key))
        if len({key_id for key_id, _ in keys}) != len(keys):
            raise SettingsError(source, "the same key id twice")
        return cls(tuple(keys))

    @staticmethod
    def new_entry() -> str:
        """A fresh key as one entry of RUNCTX_ENCRYPTION_KEYS (``runctx keys new`` prints one)."""
        return f"k{secrets.token_hex(4)}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        """The keys in a key file, made (mode 0600, one fresh key) if there is none."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first
                pass
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(cls.new_entry() + "\n")
        return cls.parse(path.read_text().strip(), source=str(path))

    # ---- sealing values ------------------------------------------------------------------------

    @property
    def newest(self) -> str:
        return self.keys[0][0]

    def key(self, key_id: str) -> bytes | None:
        return next((key for kid, key in self.keys if kid == key_id), None)

    def seal(self, value: Any, associated: bytes) -> dict[str, str]:
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = AESGCM(self.keys[0][1]).encrypt(nonce, canonical_json(value).encode(), associated)
        return {SEALED: f"v1.{self.newest}.{base64.urlsafe_b64encode(nonce + ciphertext).decode()}"}

    def open(self, sealed: dict[str, str], associated: bytes, *, where: str) -> Any:
        version, _, rest = sealed[SEALED].partition(".")
        key_id, _, blob = rest.partition(".")
        key = self.key(key_id)
        if version != "v1":
            raise ContextCorruption(where, f"a sealed value of unknown format {version[:8]!r}")
        if key is None:
            raise KeyNotHeld(where, key_id)
        try:
            raw = base64.urlsafe_b64decode(blob.encode())
            plain = AESGCM(key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], associated)
        except (InvalidTag, binascii.Error, ValueError):
            raise ContextCorruption(where, "a sealed value does not open here (moved, relabelled or damaged)") from None
        return json.loads(plain)

    def sealed_with(self, sealed: dict[str, str]) -> str:
        """The id of the key a sealed value is sealed with."""
        return sealed[SEALED].split(".", 2)[1]

    # ---- authenticating payloads ---------------------------------------------------------------

    @functools.cached_property
    def _mac_keys(self) -> dict[str, bytes]:
        """Each key's MAC key (derived once: every step's commit and read MACs a payload)."""
        return {key_id: hashlib.sha256(b"runctx/mac/v1\0" + key).digest() for key_id, key in self.keys}

    def mac(self, payload: bytes) -> str:
        key_id = self.keys[0][0]
        return f"{key_id}:{hmac.digest(self._mac_keys[key_id], payload, 'sha256').hex()[:40]}"

    def verify(self, payload: bytes, stored: str, *, where: str = "a stored entry") -> bool:
        """Whether ``stored`` is ``payload``'s MAC; KeyNotHeld if it names a key this keyring lacks."""
        key_id, _, digest = stored.partition(":")
        if not digest:
            return False
        mac_key = self._mac_keys.get(key_id)
        if mac_key is None:
            if key_id.isalnum() and len(key_id) <= 32:
                raise KeyNotHeld(where, key_id)
            return False
        return hmac.compare_digest(hmac.digest(mac_key, payload, "sha256").hex()[:40], digest)
