"""Ready-to-paste client configuration for the proxy: Continue (both providers) and OpenCode.

Schemas (facts from the clients' documentation): Continue's ``config.yaml`` has ``name``/``version``/``schema: v1``
and ``models:`` entries with ``name``, ``provider``, ``model``, ``apiBase``, ``roles`` (``provider: openai``
appends ``chat/completions`` etc. to an apiBase ending in ``/v1``; ``provider: ollama`` appends ``api/chat`` etc.
to the server's root). OpenCode's ``opencode.json`` has a ``provider`` map whose entries name an AI SDK package
(``npm``), ``options.baseURL`` and a ``models`` map; a model is then chosen as ``<provider>/<model>``.
With ``--pat-file`` the proxy sets the PAT itself, so these snippets carry no key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import quote

import yaml

DOMAIN_PLACEHOLDER = "<domain-id>"
MODEL_PLACEHOLDER = "<model-id>"
PAT_PLACEHOLDER = "<your Cube AI PAT>"
CONTINUE_ROLES = ["chat", "edit", "apply", "autocomplete", "embed"]
OPENCODE_PROVIDER_ID = "cube"


@dataclass(frozen=True)
class SnippetContext:
    """What the snippets depend on: the proxy's URL, the domain, the model ids, whether the proxy holds the PAT."""

    proxy_url: str  # http://127.0.0.1:PORT
    domain: str | None = None
    models: list[str] = field(default_factory=list)
    proxy_sets_pat: bool = True

    @property
    def domain_path(self) -> str:
        return f"{self.proxy_url}/proxy/{quote(self.domain, safe='') if self.domain else DOMAIN_PLACEHOLDER}"

    @property
    def openai_base(self) -> str:
        return f"{self.domain_path}/v1"

    @property
    def model_ids(self) -> list[str]:
        return self.models or [MODEL_PLACEHOLDER]


def continue_config(ctx: SnippetContext, provider: str) -> str:
    """``~/.continue/config.yaml`` with one model entry per model id, for ``provider`` ``openai`` or ``ollama``."""
    if provider not in ("openai", "ollama"):
        raise ValueError(f"provider must be openai or ollama, not {provider!r}")
    api_base = ctx.openai_base if provider == "openai" else ctx.domain_path
    models = []
    for model in ctx.model_ids:
        entry: dict[str, object] = {"name": f"{model} (Cube AI)", "provider": provider, "model": model,
                                    "apiBase": api_base}
        if not ctx.proxy_sets_pat:
            entry["apiKey"] = PAT_PLACEHOLDER
        entry["roles"] = list(CONTINUE_ROLES)
        models.append(entry)
    doc = {"name": "Cube AI (attested)", "version": "1.0.0", "schema": "v1", "models": models}
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)


def opencode_config(ctx: SnippetContext) -> str:
    """``opencode.json`` with a ``cube`` provider over ``@ai-sdk/openai-compatible``."""
    options: dict[str, str] = {"baseURL": ctx.openai_base}
    if not ctx.proxy_sets_pat:
        options["apiKey"] = "{env:CUBE_TOKEN}"  # OpenCode's substitution: export CUBE_TOKEN=<PAT>
    doc = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            OPENCODE_PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Cube AI (attested)",
                "options": options,
                "models": {model: {"name": model} for model in ctx.model_ids},
            }
        },
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# Section headings printed before each snippet; tests and scripts split the output on them.
CONTINUE_OPENAI_HEADING = "--- Continue: ~/.continue/config.yaml (provider: openai) ---"
CONTINUE_OLLAMA_HEADING = "--- Continue: ~/.continue/config.yaml (provider: ollama) ---"
OPENCODE_HEADING = "--- OpenCode: opencode.json ---"
END_HEADING = "--- end of snippets ---"


def render(ctx: SnippetContext) -> str:
    """All three snippets, each after its heading, with the hints a first-time user needs."""
    first = ctx.model_ids[0]
    notes = []
    if not ctx.domain:
        notes.append(f"# replace {DOMAIN_PLACEHOLDER} with your domain's id (cube-admin whoami), or pass --domain")
    if not ctx.models:
        notes.append(f"# replace {MODEL_PLACEHOLDER} with a model id (GET {ctx.openai_base}/models)")
    if not ctx.proxy_sets_pat:
        notes.append("# the proxy holds no PAT (no --pat-file): the clients send theirs, over attested TLS only")
    parts = [*notes,
             CONTINUE_OPENAI_HEADING, continue_config(ctx, "openai").rstrip("\n"),
             CONTINUE_OLLAMA_HEADING + "  (Ollama-hosted models)", continue_config(ctx, "ollama").rstrip("\n"),
             OPENCODE_HEADING + f"  (then: opencode run -m {OPENCODE_PROVIDER_ID}/{first} \"...\")",
             opencode_config(ctx).rstrip("\n"),
             END_HEADING]
    return "\n".join(parts) + "\n"
