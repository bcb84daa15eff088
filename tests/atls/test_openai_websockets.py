"""openai-python's WebSocket features against a MITM whose certificate the process trusts (WebPKI only).

Every WebSocket entry point of the installed openai package is found by walking the client's resources;
against a plain ``openai.OpenAI`` each one hands the PAT to the MITM (the attack is real), through
``openai_client``/``async_openai_client`` (and their copies) each one raises NotAttestedError before a TCP
connection is made. A source scan fails when openai grows a WebSocket path this walk does not reach.
"""

from __future__ import annotations

import ast
import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai._resource import AsyncAPIResource, SyncAPIResource

from attestation.atls.client import NotAttestedError, async_openai_client, openai_client

from .conftest import PAT

# Functions outside a connection manager that open WebSockets: helpers the managers call, or Azure-only.
KNOWN_HELPERS = {
    ("openai._websocket_connection", "_connect_websocket"),
    ("openai._websocket_connection", "_async_connect_websocket"),
    ("openai.lib._websocket", "<module>"),
    ("openai.lib._azure_websocket", "<module>"),
    ("openai.resources.responses.responses", "<module>"),
    ("openai.resources.beta.responses.responses", "<module>"),
}


def websocket_entry_points(client: Any, path: str = "client") -> Iterator[tuple[str, Any]]:
    """(dotted path, bound ``connect``) of every resource reachable from ``client`` that has one."""
    for name in dir(type(client)):
        if name.startswith("with_") or not isinstance(inspect.getattr_static(type(client), name),
                                                      functools.cached_property):
            continue
        resource = getattr(client, name)
        if isinstance(resource, (SyncAPIResource, AsyncAPIResource)):
            if callable(getattr(resource, "connect", None)):
                yield f"{path}.{name}", resource.connect
            yield from websocket_entry_points(resource, f"{path}.{name}")


def manager_of(connect: Any) -> Any:
    """Call ``connect`` with a value for each required argument and no reconnect retries (opens nothing yet)."""
    params = inspect.signature(connect).parameters
    kwargs: dict[str, Any] = {name: "x-test" for name, p in params.items()
                              if p.default is inspect.Parameter.empty and p.kind is p.KEYWORD_ONLY
                              or p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    if "max_retries" in params:
        kwargs["max_retries"] = 0
    return connect(**kwargs)


def enter(manager: Any) -> BaseException | None:
    try:
        with manager:
            pass
    except BaseException as exc:  # noqa: BLE001 - what it raised is the result
        return exc
    return None


async def aenter(manager: Any) -> BaseException | None:
    try:
        async with manager:
            pass
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def test_the_attack_is_real_a_plain_openai_client_hands_the_pat_to_a_webpki_mitm(webpki_mitm):
    plain = openai.OpenAI(base_url=f"{webpki_mitm.url}/v1", api_key=PAT, max_retries=0)
    entries = list(websocket_entry_points(plain))
    assert len(entries) >= 7, entries
    for path, connect in entries:
        error = enter(manager_of(connect))
        sent = bytes(webpki_mitm.recorded)
        assert f"Bearer {PAT}".encode() in sent, f"{path}.connect() did not reach the MITM: {error!r}"
        webpki_mitm.recorded.clear()


@pytest.mark.parametrize("variant", ["as_made", "with_options", "copy"])
@pytest.mark.parametrize("make", [openai_client, async_openai_client], ids=["sync", "async"])
async def test_every_websocket_path_fails_closed_before_connecting(webpki_mitm, sim_policy, make, variant):
    client = make(f"{webpki_mitm.url}/v1", PAT, sim_policy)
    client = {"as_made": client, "with_options": client.with_options(timeout=5),
              "copy": client.copy(max_retries=0)}[variant]
    entries = list(websocket_entry_points(client))
    assert len(entries) >= 7
    for path, connect in entries:
        manager = manager_of(connect)
        error = await aenter(manager) if make is async_openai_client else enter(manager)
        assert isinstance(error, NotAttestedError), f"{path}.connect(): {error!r}"
        assert "not attested TLS" in str(error)
    assert webpki_mitm.connections == 0 and not webpki_mitm.recorded  # not even a TCP connection was made


def test_options_that_leave_attested_tls_are_refused(sim_policy):
    url = "https://127.0.0.1:1/v1"
    with pytest.raises(NotAttestedError, match="websocket_base_url"):
        openai_client(url, PAT, sim_policy, websocket_base_url="wss://127.0.0.1:2/v1")
    client = openai_client(url, PAT, sim_policy)
    with pytest.raises(NotAttestedError, match="websocket_base_url"):
        client.copy(websocket_base_url="wss://127.0.0.1:2/v1")
    with pytest.raises(NotAttestedError, match="http_client must be an AttestedClient"):
        client.with_options(http_client=httpx.Client())  # a WebPKI client would carry the PAT
    with pytest.raises(NotAttestedError, match="http_client must be an AsyncAttestedClient"):
        async_openai_client(url, PAT, sim_policy).copy(http_client=httpx.AsyncClient())


def _websocket_openers(root: Path) -> set[tuple[str, str]]:
    """(module, enclosing class.function or <module>) of every place in openai that can open a WebSocket."""
    found: set[tuple[str, str]] = set()
    for file in root.rglob("*.py"):
        module = ".".join(("openai", *file.relative_to(root).with_suffix("").parts))
        stack: list[str] = []

        def opens(node: ast.AST) -> bool:
            if isinstance(node, ast.Import):
                return any(alias.name.split(".")[0] == "websockets" for alias in node.names)
            if isinstance(node, ast.ImportFrom):
                names = {alias.name for alias in node.names}
                return ((node.module or "").startswith("websockets") and "connect" in names
                        or bool(names & {"_WebSocketConnect", "_connect_websocket", "_async_connect_websocket"}))
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                return name in {"_connect_websocket", "_async_connect_websocket", "_WebSocketConnect"}
            return False

        def visit(node: ast.AST) -> None:
            named = isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            if named:
                stack.append(node.name)  # type: ignore[attr-defined]
            if opens(node):
                found.add((module, ".".join(stack) or "<module>"))
            for child in ast.iter_child_nodes(node):
                visit(child)
            if named:
                stack.pop()

        visit(ast.parse(file.read_text(encoding="utf-8")))
    return found


def test_every_websocket_opener_in_the_installed_openai_is_reached_by_the_walk(sim_policy):
    covered = set()
    for client in (openai_client("https://127.0.0.1:1/v1", PAT, sim_policy),
                   async_openai_client("https://127.0.0.1:1/v1", PAT, sim_policy)):
        for _, connect in websocket_entry_points(client):
            manager = type(manager_of(connect))
            covered.add((manager.__module__, manager.__qualname__))
    openers = _websocket_openers(Path(openai.__file__).parent)
    assert openers, "the scan found no WebSocket use at all: it no longer matches openai's code"
    uncovered = {(module, where) for module, where in openers
                 if (module, where.rsplit(".", 1)[0]) not in covered and (module, where) not in KNOWN_HELPERS}
    assert not uncovered, (f"openai {openai.__version__} opens WebSockets where the fail-closed tests do not "
                           f"reach: {sorted(uncovered)}; make sure they fail closed and cover them")


def test_a_websocket_feature_raises_a_readable_error(sim_policy):
    client = openai_client("https://127.0.0.1:1/v1", PAT, sim_policy)
    with pytest.raises(NotAttestedError, match="WebSocket features .* not attested TLS"):
        with client.realtime.connect(model="m"):
            pass


@pytest.mark.parametrize("make", [openai_client, async_openai_client], ids=["sync", "async"])
def test_an_openai_release_without_the_closed_hooks_is_refused(make, sim_policy, monkeypatch):
    from openai._base_client import BaseClient

    monkeypatch.delattr(BaseClient, "_websocket_query_params")  # a release whose WebSockets go another way
    with pytest.raises(NotAttestedError, match="no longer has _websocket_query_params"):
        make("https://127.0.0.1:1/v1", PAT, sim_policy)
