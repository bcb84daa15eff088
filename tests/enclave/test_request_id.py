"""`x-request-id` on every response — refusals, unknown paths and inference answers alike — fresh for each request,
never the client's own; on an inference answer it is the id of that request's usage record."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.enclave.inference_support import Service, start_service
from tests.fakes.vllm import FakeVllm, vllm_model

MODEL = "request-id-model"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with FakeVllm(served=[vllm_model(MODEL)]) as fake:
        with start_service(tmp_path_factory.mktemp("request-id"), [({"name": "vllm", "kind": "vllm"}, fake)]) as s:
            yield s


def test_every_response_carries_its_own_request_id(svc: Service) -> None:
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    with svc.http() as c:
        answers = [
            c.get(svc.url("A", "models"), headers={"Authorization": "Bearer not-a-key"}),         # 401
            c.get("/no/such/path"),                                                                # 404
            c.get("/health"),                                                                      # 200
            c.post(svc.url("A", "chat/completions"), content=b"{"),                                # 400
            c.get(svc.url("A", "models"), headers={"x-request-id": "chosen-by-the-client"}),       # 200
            c.post(svc.url("A", "chat/completions"), json=chat),                                   # 200
        ]
    assert [r.status_code for r in answers] == [401, 404, 200, 400, 200, 200], [r.text for r in answers]
    assert all(len(r.headers.get_list("x-request-id")) == 1 for r in answers)
    ids = [r.headers["x-request-id"] for r in answers]
    assert len(set(ids)) == len(ids) and "chosen-by-the-client" not in ids
    assert svc.record(answers[-1]).request_id == ids[-1]
