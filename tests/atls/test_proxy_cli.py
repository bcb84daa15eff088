"""The real ``cube-attest proxy`` command: arguments, start-up refusal, snippets, signals; openai-python through it."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from attestation.cli import main
from attestation.policy import sim_policy_yaml
from attestation.proxy.command import UsageError, parse_listen
from attestation.proxy.snippets import (CONTINUE_OLLAMA_HEADING, CONTINUE_OPENAI_HEADING, END_HEADING,
                                        OPENCODE_HEADING)

from .proxyrun import make_proxy  # noqa: F401 - fixture
from .test_adversaries import PRODUCTION_POLICY
from .test_openai import enclave  # noqa: F401 - fixture: the real enclave app over a fake Ollama

CUBE_ATTEST = Path(sys.executable).with_name("cube-attest")


@pytest.fixture
def sim_policy_file(sim_provider, tmp_path) -> Path:
    path = tmp_path / "sim-policy.yaml"
    path.write_text(sim_policy_yaml(sim_provider.fingerprint))
    return path


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_help_names_every_option():
    assert CUBE_ATTEST.is_file(), f"{CUBE_ATTEST} missing: the package is not installed in this environment"
    result = subprocess.run([str(CUBE_ATTEST), "proxy", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for option in ("--listen", "--upstream", "--policy", "--pat-file", "--domain", "--allow-non-loopback",
                   "--allow-origin", "--allow-host", "--allow-all-paths"):
        assert option in result.stdout


def test_non_loopback_listen_needs_the_flag_and_warns(sim_policy_file, capsys):
    code = main(["proxy", "--listen", "0.0.0.0:0", "--upstream", "https://127.0.0.1:1", "--policy",
                 str(sim_policy_file)])
    assert code == 2 and "not a loopback address" in capsys.readouterr().err
    with pytest.raises(UsageError):
        parse_listen("192.0.2.7:8080", False, io.StringIO())
    with pytest.raises(UsageError):
        parse_listen("example.com:8080", False, io.StringIO())
    err = io.StringIO()
    assert parse_listen("0.0.0.0:8080", True, err) == ("0.0.0.0", 8080) and "WARNING" in err.getvalue()
    quiet = io.StringIO()
    assert parse_listen("localhost:0", False, quiet) == ("127.0.0.1", 0)
    assert parse_listen("[::1]:9", False, quiet) == ("::1", 9) and quiet.getvalue() == ""


def test_usage_errors_exit_2(sim_policy_file, tmp_path, capsys):
    base = ["proxy", "--listen", "127.0.0.1:0", "--policy", str(sim_policy_file)]
    assert main([*base, "--upstream", "http://127.0.0.1:1"]) == 2
    assert main([*base, "--upstream", "https://127.0.0.1:1/some/path"]) == 2
    loose = tmp_path / "loose.pat"
    loose.write_text("cube_pat_x\n")
    loose.chmod(0o644)
    assert main([*base, "--upstream", "https://127.0.0.1:1", "--pat-file", str(loose)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    placeholder = private_file(tmp_path / "placeholder.pat", "cube_pat_…\n")
    assert main([*base, "--upstream", "https://127.0.0.1:1", "--pat-file", str(placeholder)]) == 2
    assert "placeholder" in capsys.readouterr().err
    unmeasured = tmp_path / "unmeasured.yaml"
    unmeasured.write_text("name: any\nplatforms: [snp]\n")
    assert main(["proxy", "--listen", "127.0.0.1:0", "--policy", str(unmeasured),
                 "--upstream", "https://127.0.0.1:1"]) == 2
    assert "does not pin the whole boot chain" in capsys.readouterr().err


class Running:
    """The cube-attest proxy process, its stdout and stderr (merged) collected line by line by a thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(CUBE_ATTEST), "proxy", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def until(self, marker: str, timeout: float = 30.0) -> list[str]:
        seen, deadline = [], time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            if not line:
                raise AssertionError("cube-attest proxy ended before printing " + repr(marker) + ":\n" + "".join(seen))
            seen.append(line)
            if marker in line:
                return seen

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)


def sections(lines: list[str]) -> dict[str, str]:
    """The printed snippets by heading (the heading line's text up to its closing ``---``)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith("--- "):
            current = found.setdefault(line.split(" ---")[0] + " ---", [])
        elif current is not None:
            current.append(line)
    return {heading: "".join(body) for heading, body in found.items()}


def test_the_real_command_verifies_prints_snippets_relays_and_stops_on_sigterm(enclave, sim_policy_file, tmp_path):
    server, domain, token = enclave
    pat_file = private_file(tmp_path / "cube.pat", token + "\n")
    running = Running("--listen", "127.0.0.1:0", "--upstream", server.url, "--policy", str(sim_policy_file),
                      "--pat-file", str(pat_file))
    try:
        lines = running.until("listening on http://127.0.0.1:")
        text = "".join(lines)
        assert "ACCEPTED" in text and server.tls.current.spki_sha256 in text
        assert token not in text
        url = lines[-1].split("listening on ", 1)[1].split(" ", 1)[0]
        found = sections(lines)
        assert {CONTINUE_OPENAI_HEADING, CONTINUE_OLLAMA_HEADING, OPENCODE_HEADING, END_HEADING} <= set(found)
        with httpx.Client(trust_env=False, timeout=10) as client:
            listed = client.get(f"{url}/proxy/{domain}/v1/models").json()
        ids = [m["id"] for m in listed["data"]]
        assert ids  # the domain came from the PAT (no --domain), the ids from the enclave
        as_openai = yaml.safe_load(found[CONTINUE_OPENAI_HEADING])
        assert as_openai["schema"] == "v1" and [m["model"] for m in as_openai["models"]] == ids
        for entry in as_openai["models"]:
            assert entry["provider"] == "openai" and entry["apiBase"] == f"{url}/proxy/{domain}/v1"
            assert entry["roles"] == ["chat", "edit", "apply", "autocomplete", "embed"] and "apiKey" not in entry
        as_ollama = yaml.safe_load(found[CONTINUE_OLLAMA_HEADING])
        assert {(m["provider"], m["apiBase"]) for m in as_ollama["models"]} == {("ollama", f"{url}/proxy/{domain}")}
        opencode = json.loads(found[OPENCODE_HEADING])["provider"]["cube"]
        assert opencode["npm"] == "@ai-sdk/openai-compatible"
        assert opencode["options"] == {"baseURL": f"{url}/proxy/{domain}/v1"} and sorted(opencode["models"]) == \
            sorted(ids)
    finally:
        code = running.stop()
    assert code == 0
    rest = running.until("stopped")
    assert not any(token in line for line in rest)


def test_the_command_refuses_to_start_when_the_enclave_is_refused(make_server, tmp_path):
    server = make_server()
    policy = tmp_path / "production.yaml"
    policy.write_text(yaml.safe_dump(PRODUCTION_POLICY.model_dump(mode="json", exclude_none=True)))
    running = Running("--listen", "127.0.0.1:0", "--upstream", server.url, "--policy", str(policy))
    try:
        text = "".join(running.until("not starting"))
    finally:
        code = running.proc.wait(timeout=30)
    assert code == 1 and "REFUSED" in text and "certificate_appraisal" in text
    assert server.app.state.seen_authorization == []


def test_openai_python_lists_models_through_the_proxy(enclave, make_proxy, sim_policy):
    server, domain, token = enclave
    proxy = make_proxy(server.url, sim_policy, pat=token)
    with httpx.Client(trust_env=False) as http:
        client = openai.OpenAI(base_url=f"{proxy.url}/proxy/{domain}/v1", api_key="not-the-pat", http_client=http)
        ids = [m.id for m in client.models.list()]
        assert ids and client.models.retrieve(ids[0]).id == ids[0]
    assert proxy.attestor.last_report.ok and proxy.attestor.pinned == server.tls.current.spki_sha256
