"""The attested transports replace httpx's private connection pool; what if that ever stops taking effect?

Simulated here as an httpx release that keeps its pool under another name (and an httpcore one that renames
the pool's backend): construction must refuse, and even with that check gone, the pool httpx built itself
must not complete a handshake with a server the process trusts, so no byte of the request leaves. An
httpx Client that ignored ``transport=`` is refused at construction too.
"""

from __future__ import annotations

import copy

import httpcore
import httpx
import pytest

from attestation.atls import client as atls_client
from attestation.atls.client import AsyncAttestedClient, AttestedClient, NotAttestedError

from .conftest import PAT


def rename_after_init(monkeypatch: pytest.MonkeyPatch, classes: tuple[type, ...], old: str, new: str) -> None:
    """Make ``classes`` keep what their __init__ stores as ``old`` under ``new`` (a simulated upstream rename)."""
    for cls in classes:
        original_init = cls.__init__

        def init(self, *args, _original=original_init, **kwargs):  # type: ignore[no-untyped-def]
            _original(self, *args, **kwargs)
            setattr(self, new, self.__dict__.pop(old))

        monkeypatch.setattr(cls, "__init__", init)


@pytest.fixture
def httpx_renamed_its_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx transports that build and use ``_renamed_pool``: our assignment to ``_pool`` is then ignored."""
    rename_after_init(monkeypatch, (httpx.HTTPTransport, httpx.AsyncHTTPTransport), "_pool", "_renamed_pool")
    sync_handle, async_handle = httpx.HTTPTransport.handle_request, httpx.AsyncHTTPTransport.handle_async_request

    def using_renamed(transport):  # type: ignore[no-untyped-def]
        shadow = copy.copy(transport)
        shadow._pool = transport._renamed_pool
        return shadow

    async def handle_async(self, request):  # type: ignore[no-untyped-def]
        return await async_handle(using_renamed(self), request)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", lambda self, request: sync_handle(
        using_renamed(self), request))
    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", handle_async)


@pytest.fixture
def httpcore_renamed_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    rename_after_init(monkeypatch, (httpcore.ConnectionPool, httpcore.AsyncConnectionPool), "_network_backend",
                      "_backend")


async def get_secret(client_class: type, url: str, sim_policy) -> None:  # type: ignore[no-untyped-def]
    client = client_class(url, policy=sim_policy)
    headers = {"Authorization": f"Bearer {PAT}"}
    if client_class is AsyncAttestedClient:
        async with client:
            await client.get("/v1/secret", headers=headers)
    else:
        with client:
            client.get("/v1/secret", headers=headers)


CLIENTS = pytest.mark.parametrize("client_class", [AttestedClient, AsyncAttestedClient], ids=["sync", "async"])


@CLIENTS
def test_the_pool_in_use_is_ours_with_the_attesting_backend(client_class, sim_policy):
    client = client_class("https://127.0.0.1:1", policy=sim_policy)
    pool = client._transport._inner._pool
    assert isinstance(pool._network_backend, (atls_client._SyncAttestingBackend, atls_client._AsyncAttestingBackend))
    refusing = atls_client.refusing_ssl_context()
    assert refusing.verify_mode.name == "CERT_REQUIRED" and refusing.check_hostname and not refusing.get_ca_certs()


@CLIENTS
@pytest.mark.parametrize("change", ["httpx_renamed_its_pool", "httpcore_renamed_the_backend"])
def test_construction_refuses_when_the_swap_does_not_take(client_class, change, sim_policy, request):
    request.getfixturevalue(change)
    with pytest.raises(NotAttestedError, match="did not take effect"):
        client_class("https://127.0.0.1:1", policy=sim_policy)


@pytest.fixture
def httpcore_ignores_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pools that keep our backend as ``_network_backend`` but open connections with httpcore's default one."""
    for module, name in ((httpcore._sync.connection_pool, "HTTPConnection"),
                         (httpcore._async.connection_pool, "AsyncHTTPConnection")):
        connection = getattr(module, name)
        monkeypatch.setattr(module, name, lambda _c=connection, **kwargs: _c(**{**kwargs, "network_backend": None}))


@CLIENTS
@pytest.mark.parametrize("change", ["httpx_renamed_its_pool", "httpcore_ignores_the_backend"])
async def test_an_unattested_path_cannot_handshake_so_no_request_byte_leaves(client_class, change, webpki_mitm,
                                                                             sim_policy, monkeypatch, request):
    request.getfixturevalue(change)
    monkeypatch.setattr(atls_client, "_check_pool", lambda transport, pool: None)  # the construction guard gone
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await get_secret(client_class, webpki_mitm.url, sim_policy)
    assert webpki_mitm.connections == 1 and webpki_mitm.handshakes == 0 and not webpki_mitm.recorded

    # Control: the context the pools were built with before (CERT_NONE) hands the MITM the PAT.
    monkeypatch.setattr(atls_client, "refusing_ssl_context", atls_client.client_ssl_context)
    await get_secret(client_class, webpki_mitm.url, sim_policy)  # answered (503) by the MITM, unattested
    assert f"Bearer {PAT}".encode() in webpki_mitm.recorded


@CLIENTS
def test_construction_refuses_when_httpx_ignores_the_attested_transport(client_class, sim_policy, monkeypatch):
    base = httpx.Client if client_class is AttestedClient else httpx.AsyncClient
    default = httpx.HTTPTransport if client_class is AttestedClient else httpx.AsyncHTTPTransport
    monkeypatch.setattr(base, "_init_transport", lambda self, **kwargs: default())  # transport= not honoured
    with pytest.raises(NotAttestedError, match="did not route https://127.0.0.1:1 through the attested"):
        client_class("https://127.0.0.1:1", policy=sim_policy)
