"""Device tokens: ``hex(HMAC-SHA256(key=device secret, msg=device_id))``, both UTF-8.

Tokens are stateless: the gateway holds no list of devices, so a token is checked
against the device_id the request claims. A well-formed token that is not that
device's token is a token for another device (or a forged one); the gateway
answers it with 403, and a missing or malformed token with 401.

A site rotates its secret without a flag day: the gateway accepts tokens of the
previous secret alongside the current one until the operator removes it, and
counts the requests that still use it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

TOKEN_PATTERN = re.compile(r"[0-9a-fA-F]{64}")


def device_token(secret: str, device_id: str) -> str:
    """Return the bearer token that authorises ``device_id``."""
    return hmac.new(secret.encode(), device_id.encode(), hashlib.sha256).hexdigest()


def is_well_formed(token: str) -> bool:
    """Tell whether ``token`` has the shape of a device token (64 hex digits)."""
    return TOKEN_PATTERN.fullmatch(token) is not None


def token_matches(secret: str, device_id: str, token: str) -> bool:
    """Compare in constant time, so timing does not reveal how much of a token is right."""
    return hmac.compare_digest(device_token(secret, device_id), token.lower())


def matching_secret(secrets: Sequence[str], device_id: str, token: str) -> int | None:
    """The index of the first of ``secrets`` whose token for ``device_id`` is ``token``, or None."""
    for index, secret in enumerate(secrets):
        if token_matches(secret, device_id, token):
            return index
    return None


def bearer_token(authorization: str | None) -> str | None:
    """Return the credential of an ``Authorization: Bearer ...`` header, or None."""
    if not authorization:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip() or None
