"""Run the real OpenCode and Continue CLIs headless against an OpenAI-compatible base URL.

Each run gets its own HOME and XDG directories (nothing read from or left in the user's), no internet, and
a deadline. What "no internet" takes, found by running both under a private network namespace with a
logging resolver:

- OpenCode 1.18 installs its plugin package (``@opencode-ai/plugin``) with npm into its config directory
  on every start that lacks it, and fetches models.dev unless told not to: ``npm_config_offline=true``
  makes the install fail at once from the empty cache (OpenCode goes on without it), and
  ``OPENCODE_DISABLE_MODELS_FETCH`` / ``_AUTOUPDATE`` / ``_LSP_DOWNLOAD`` / ``_SHARE`` stop the rest. The
  ``@ai-sdk/openai-compatible`` provider is bundled in its binary: nothing is downloaded for it.
- Continue CLI 1.5 asks api.continue.dev for its latest version on every start, headless included, with no
  setting to stop it: ``offline_guard.cjs`` is preloaded into its Node process and refuses any connection
  that is not to loopback (the refused hosts are reported in ``ClientRun.refused_hosts``). Telemetry is
  off through ``CONTINUE_CLI_ENABLE_TELEMETRY=0`` / ``CONTINUE_METRICS_ENABLED=0``.

The binaries come from the project-local npm prefix that ``./dev test`` fills (``.tools/node``, or
``$CUBE_NODE_TOOLS``); when they are missing the run fails with the command that installs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OFFLINE_GUARD = HERE / "offline_guard.cjs"
DEFAULT_TIMEOUT = 120.0
PROVIDER_ID = "cube"  # OpenCode model ids are "<provider>/<model>"


@dataclass(frozen=True)
class ClientRun:
    exit_code: int
    stdout: str
    stderr: str
    refused_hosts: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """For assertion messages: the exit code and the tail of both streams."""
        return f"exit {self.exit_code}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def node_tools() -> Path:
    return Path(os.environ.get("CUBE_NODE_TOOLS", ROOT / ".tools" / "node"))


def client_binary(name: str) -> Path:
    """``opencode`` or ``cn`` from the project-local prefix; a loud failure saying how to get it."""
    path = node_tools() / "node_modules" / ".bin" / name
    if not path.exists():
        pytest.fail(
            f"{name} not found at {path}: run ./dev test (it installs the pinned OpenCode and Continue CLIs "
            "with npm from tests/clients/package.json into .tools/node)"
        )
    return path


def _isolated_env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    """A minimal environment: PATH (for node/npm/git), locale, a private HOME and XDG tree."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "TMPDIR": str(home / "tmp"),
        "NO_COLOR": "1",
        "CI": "true",
    }
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env.update(extra)
    return env


def _run(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Run in a new session so a timeout kills the CLI and every process it started."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[0]} did not finish within {timeout:.0f} s\n--- stdout\n{stdout[-3000:]}\n"
                    f"--- stderr\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr


def opencode_config(base_url: str, model: str, api_key: str) -> dict[str, Any]:
    """opencode.json: one provider ``cube`` on ``@ai-sdk/openai-compatible`` serving ``model``."""
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Cube AI",
                "options": {"baseURL": base_url, "apiKey": api_key},
                "models": {model: {"name": model}},
            }
        },
        "autoupdate": False,
        "share": "disabled",
    }


OPENCODE_OFFLINE_ENV = {
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "npm_config_offline": "true",
    "npm_config_update_notifier": "false",
}


def run_opencode(
    base_url: str, model: str, prompt: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT
) -> ClientRun:
    """``opencode run PROMPT -m cube/MODEL`` with ``base_url`` (…/v1) as the provider's baseURL."""
    binary = client_binary("opencode")
    with tempfile.TemporaryDirectory(prefix="cube-opencode-") as scratch:
        home, work = Path(scratch) / "home", Path(scratch) / "work"
        work.mkdir(parents=True)
        (work / "opencode.json").write_text(json.dumps(opencode_config(base_url, model, api_key), indent=2))
        env = _isolated_env(home, OPENCODE_OFFLINE_ENV)
        command = [str(binary), "run", prompt, "-m", f"{PROVIDER_ID}/{model}", "--print-logs"]
        code, stdout, stderr = _run(command, cwd=work, env=env, timeout=timeout)
    return ClientRun(code, stdout, stderr)


def continue_config(
    base_url: str, model: str, api_key: str | None, *, provider: str = "openai",
    roles: tuple[str, ...] = ("chat", "edit", "apply", "autocomplete", "embed"),
) -> dict[str, Any]:
    """A Continue ``config.yaml`` (as a dict) with one model; ``api_key=None`` leaves the key out."""
    entry: dict[str, Any] = {"name": model, "provider": provider, "model": model, "apiBase": base_url,
                             "roles": list(roles)}
    if api_key is not None:
        entry["apiKey"] = api_key
    return {"name": "cube-test", "version": "1.0.0", "schema": "v1", "models": [entry]}


def run_continue(config: dict[str, Any], prompt: str, *, timeout: float = DEFAULT_TIMEOUT) -> ClientRun:
    """``cn -p PROMPT --config config.yaml`` (headless) with the given config."""
    binary = client_binary("cn")
    with tempfile.TemporaryDirectory(prefix="cube-continue-") as scratch:
        home, work = Path(scratch) / "home", Path(scratch) / "work"
        work.mkdir(parents=True)
        config_file = Path(scratch) / "config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        guard_log = Path(scratch) / "refused-hosts.log"
        env = _isolated_env(home, {
            "CONTINUE_GLOBAL_DIR": str(home / ".continue"),
            "CONTINUE_CLI_ENABLE_TELEMETRY": "0",
            "CONTINUE_METRICS_ENABLED": "0",
            "NODE_OPTIONS": f"--require={OFFLINE_GUARD}",
            "CUBE_OFFLINE_GUARD_LOG": str(guard_log),
        })
        command = ["node", str(binary), "-p", prompt, "--config", str(config_file)]
        code, stdout, stderr = _run(command, cwd=work, env=env, timeout=timeout)
        refused = guard_log.read_text().split() if guard_log.exists() else []
    return ClientRun(code, stdout, stderr, refused)


@dataclass(frozen=True)
class AdaptersResult:
    completion: str  # the streamed fill-in-the-middle text
    embeddings: list[list[float]]


def run_continue_adapters(
    api_base: str, model: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[ClientRun, AdaptersResult | None]:
    """Continue's model layer, headless: a completion with ``suffix`` (autocomplete) and an embedding.

    ``cn`` has no autocomplete or embedding command; Continue's editors reach models through the same
    ``@continuedev/openai-adapters`` package, which ``continue_adapters.mjs`` drives (``provider: openai``).
    """
    script = HERE / "continue_adapters.mjs"
    adapters = node_tools() / "node_modules" / "@continuedev" / "openai-adapters"
    if not adapters.is_dir():
        pytest.fail(f"@continuedev/openai-adapters not found at {adapters}: run ./dev test (tests/clients/package.json)")
    with tempfile.TemporaryDirectory(prefix="cube-continue-adapters-") as scratch:
        home = Path(scratch) / "home"
        # A copy inside the prefix: ESM resolves packages from the importing file's directory upwards.
        runner = node_tools() / f".continue_adapters-{os.getpid()}-{Path(scratch).name}.mjs"
        runner.write_text(script.read_text())
        try:
            env = _isolated_env(home, {"NODE_OPTIONS": f"--require={OFFLINE_GUARD}"})
            arguments = json.dumps({"apiBase": api_base.rstrip("/") + "/", "apiKey": api_key, "model": model})
            code, stdout, stderr = _run(["node", str(runner), arguments], cwd=Path(scratch), env=env, timeout=timeout)
        finally:
            runner.unlink(missing_ok=True)
    run = ClientRun(code, stdout, stderr)
    if code != 0:
        return run, None
    answer = json.loads(stdout.strip().splitlines()[-1])
    return run, AdaptersResult(completion=answer["completion"], embeddings=answer["embeddings"])
