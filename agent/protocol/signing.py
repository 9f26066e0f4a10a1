"""Signed placements (Ed25519): a device holding public keys obeys only documents signed with a
matching private key (the console's `--sign-key`, or `edge-agent place --sign-key`), recently, for a
newer generation. A device may hold a few keys at once (key rotation: the new key is rolled out to
the fleet before the signer switches to it, and the old one is removed afterwards).

Signature: over the document without its `signature` field, serialised canonically
(`json.dumps(sort_keys=True, separators=(",", ":"))`). `signed_at` and `expires_at` are Unix times.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography is imported where keys are made or used: a device that does not require signed
# placements never loads it (about 6 MB of resident memory).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    PublicKeys = Ed25519PublicKey | Sequence[Ed25519PublicKey]
else:
    PublicKeys = Any

MAX_PUBLIC_KEYS = 8  # a rotation needs two; a few more allow several signers (console, break-glass CLI)


class SignatureRefused(Exception):
    """The document is unsigned, forged, tampered with, expired or replayed."""


def canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def generate_keypair(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / "placement-signing.key", folder / "placement-signing.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    private.chmod(0o600)
    public.write_text(public_key_b64(key.public_key()) + "\n")
    return private, public


def public_key_b64(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return base64.b64encode(
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(value: str) -> Ed25519PublicKey:
    """Base64 of the 32 raw bytes (what `edge-agent keygen` writes), or a path to such a file."""
    keys = load_public_keys(value)
    if len(keys) != 1:
        raise ValueError(f"expected one public key, found {len(keys)}")
    return keys[0]


def load_public_keys(value: str | Sequence[str]) -> tuple[Ed25519PublicKey, ...]:
    """One key or several: each item is base64 of 32 raw bytes or a path to a file holding keys, one
    per line (`#` comments and blank lines skipped). At least one key, at most MAX_PUBLIC_KEYS."""
    items = [value] if isinstance(value, str) else list(value)
    texts: list[str] = []
    for item in items:
        text = item.strip()
        if "/" in text and Path(text).is_file():
            lines = Path(text).read_text().splitlines()
            texts += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        else:
            texts.append(text)
    if not texts:
        raise ValueError("no public key given")
    if len(texts) > MAX_PUBLIC_KEYS:
        raise ValueError(f"{len(texts)} public keys: at most {MAX_PUBLIC_KEYS} (retire old keys)")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = []
    for number, text in enumerate(texts, 1):
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True)))
        except ValueError as exc:
            where = f"key {number}: " if len(texts) > 1 else ""
            raise ValueError(f"{where}not an Ed25519 public key (base64 of 32 bytes): {exc}") from exc
    return tuple(keys)


def sign(
    doc: dict[str, Any], key: Ed25519PrivateKey, valid_s: float = 3600.0, now: float | None = None
) -> dict[str, Any]:
    now = time.time() if now is None else now
    signed = {**doc, "signed_at": round(now, 3), "expires_at": round(now + valid_s, 3)}
    signed.pop("signature", None)
    signed["signature"] = base64.b64encode(key.sign(canonical(signed))).decode()
    return signed


def _verifies(keys: PublicKeys, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    for key in (keys,) if isinstance(keys, Ed25519PublicKey) else keys:
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return True
    return False


def verify(doc: dict[str, Any], key: PublicKeys, max_age_s: float, now: float | None = None) -> None:
    """Raise SignatureRefused unless `doc` carries a valid, current signature by `key` (or by any one
    of several keys)."""
    now = time.time() if now is None else now
    signature = doc.get("signature")
    if not isinstance(signature, str) or not signature:
        raise SignatureRefused(
            "unsigned: this device accepts only signed placements ([security] placement_public_key)"
        )
    try:
        valid = _verifies(key, base64.b64decode(signature, validate=True), canonical(doc))
    except ValueError:
        valid = False
    if not valid:
        raise SignatureRefused(
            "forged or altered: the signature does not verify with this device's placement key"
        )
    signed_at, expires_at = doc.get("signed_at"), doc.get("expires_at")
    if not isinstance(signed_at, int | float) or not isinstance(expires_at, int | float):
        raise SignatureRefused("signed document lacks signed_at/expires_at")
    if expires_at < now:
        raise SignatureRefused(f"expired {now - expires_at:.0f}s ago")
    if now - signed_at > max_age_s:
        raise SignatureRefused(f"signed {now - signed_at:.0f}s ago, older than the {max_age_s:.0f}s allowed")
    if signed_at > now + 300:
        raise SignatureRefused("signed_at is in the future (check the clocks)")
