"""The README's ``api_key="cube_pat_…"`` placeholder (and other keys that are no PAT): a readable error up front."""

from __future__ import annotations

import pytest

from attestation.atls.client import async_openai_client, openai_client
from attestation.atls.openai_clients import APIKeyError

from .conftest import PAT

URL = "https://127.0.0.1:1/v1"


@pytest.mark.parametrize("make", [openai_client, async_openai_client], ids=["sync", "async"])
@pytest.mark.parametrize(("key", "says"), [
    ("cube_pat_…", "character 9 is U+2026 (a placeholder such as '…' left in?)"),
    (PAT + "\n", "whitespace (strip the newline?)"),
    ("", "empty string"),
    (None, "got NoneType"),
])
def test_a_key_that_is_no_pat_is_refused_with_a_readable_error(make, key, says, sim_policy):
    with pytest.raises(APIKeyError) as refused:
        make(URL, key, sim_policy)  # before: UnicodeEncodeError from httpx at the first request
    message = str(refused.value)
    assert "PAT (cube_pat_...) printed at bootstrap" in message and says in message
    assert isinstance(refused.value, ValueError)


def test_a_copy_with_a_bad_key_is_refused_and_the_key_is_never_echoed(sim_policy):
    client = openai_client(URL, PAT, sim_policy)
    secret_looking = "cube_pat_s3cr3t value"
    with pytest.raises(APIKeyError, match="character 15 is whitespace") as refused:
        client.copy(api_key=secret_looking)
    assert "s3cr3t" not in str(refused.value)
    assert client.with_options(api_key=PAT + "x").api_key == PAT + "x"
