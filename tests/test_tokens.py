"""Device tokens: hex(HMAC-SHA256(key=secret, msg=device_id)), both UTF-8."""

from __future__ import annotations

from services.common.tokens import bearer_token, device_token, is_well_formed, token_matches

# Computed with openssl: echo -n "cam-001" | openssl dgst -sha256 -hmac "site-secret"
KNOWN = ("site-secret", "cam-001", "0793a58ced774721402086304c8b6094139a31935f25fe3daaac2a63c91cde6b")
# Non-ASCII key and message are UTF-8: echo -n "kamera-ü" | openssl dgst -sha256 -hmac "sécret"
KNOWN_UTF8 = ("sécret", "kamera-ü", "8a41e2397d29d6538437ff52c7178d55cae48b306a77be418e6fffb22a02543e")


def test_token_is_the_hmac_of_the_device_id() -> None:
    for secret, device, expected in (KNOWN, KNOWN_UTF8):
        assert device_token(secret, device) == expected


def test_token_matches_only_its_device() -> None:
    secret, device, token = KNOWN
    assert token_matches(secret, device, token)
    assert token_matches(secret, device, token.upper())
    assert not token_matches(secret, "cam-002", token)
    assert not token_matches("other-secret", device, token)


def test_token_shape() -> None:
    assert is_well_formed(KNOWN[2])
    assert not is_well_formed(KNOWN[2][:-1])
    assert not is_well_formed("z" * 64)
    assert not is_well_formed(KNOWN[2] + "\n")


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc  ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None
