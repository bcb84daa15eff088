"""PAT format: generation, offline checksum validation, keyed hashing; hypothesis on parsing."""

from __future__ import annotations

import math
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave.tokens import (BASE62, CHECKSUM_LENGTH, PAT_PATTERN, PAT_PREFIX, SECRET_LENGTH, TOKEN_LENGTH,
                            ParsedToken, TokenFormatError, checksum, generate_token, parse_token, token_hash)


def test_generated_tokens_parse_and_carry_enough_entropy() -> None:
    tokens = {generate_token() for _ in range(200)}
    assert len(tokens) == 200
    assert SECRET_LENGTH * math.log2(62) >= 160
    for token in tokens:
        parsed = parse_token(token)
        assert parsed.token == token and len(token) == TOKEN_LENGTH
        assert token.startswith(PAT_PREFIX) and PAT_PATTERN.fullmatch(token)
        assert set(parsed.secret) <= set(BASE62) and len(parsed.checksum) == CHECKSUM_LENGTH


def test_every_single_character_typo_is_caught_offline() -> None:
    token = generate_token()
    body_start = len(PAT_PREFIX)
    for i in range(body_start, len(token)):
        for c in "0aZ":
            if token[i] == c:
                continue
            typo = token[:i] + c + token[i + 1:]
            with pytest.raises(TokenFormatError) as err:
                parse_token(typo)
            assert err.value.reason == "bad_checksum"


@pytest.mark.parametrize("text,reason", [
    ("", "malformed"), ("sk-abc", "malformed"), (PAT_PREFIX, "malformed"),
    (PAT_PREFIX + "a" * (SECRET_LENGTH + CHECKSUM_LENGTH - 1), "malformed"),
    (PAT_PREFIX + "a" * (SECRET_LENGTH + CHECKSUM_LENGTH), "bad_checksum"),
    (PAT_PREFIX + "-" * (SECRET_LENGTH + CHECKSUM_LENGTH), "malformed"),
    (PAT_PREFIX + "é" * (SECRET_LENGTH + CHECKSUM_LENGTH), "malformed"),
])
def test_malformed_tokens(text: str, reason: str) -> None:
    with pytest.raises(TokenFormatError) as err:
        parse_token(text)
    assert err.value.reason == reason and str(err.value)


def test_keyed_hash_depends_on_the_server_secret() -> None:
    token = generate_token()
    assert token_hash(b"k" * 32, token) == token_hash(b"k" * 32, token)
    assert token_hash(b"k" * 32, token) != token_hash(b"j" * 32, token)
    assert len(token_hash(b"k" * 32, token)) == 64


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet=string.ascii_letters + string.digits + "_", max_size=60),
                 st.text(alphabet=BASE62, min_size=42, max_size=42).map(lambda s: PAT_PREFIX + s)))
def test_any_string_parses_or_raises_a_typed_error(text: str) -> None:
    try:
        parsed = parse_token(text)
    except TokenFormatError as e:
        assert e.reason in {"malformed", "bad_checksum"}
    else:
        assert isinstance(parsed, ParsedToken)
        assert checksum(PAT_PREFIX + parsed.secret) == parsed.checksum


@given(st.text(alphabet=BASE62, min_size=SECRET_LENGTH, max_size=SECRET_LENGTH))
def test_valid_checksum_always_accepted(secret: str) -> None:
    token = PAT_PREFIX + secret + checksum(PAT_PREFIX + secret)
    assert parse_token(token).secret == secret
