"""Typed errors of the models registry and its backends (re-exported by ``enclave.registry``).

They live here, below both the registry and the backend drivers, so the drivers can raise them without
importing the registry.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error the registry or a backend driver raises on purpose."""


class UnknownBackend(RegistryError):
    """No backend of that name is configured."""

    def __init__(self, backend: str) -> None:
        super().__init__(f"no backend named {backend!r} is configured")
        self.backend = backend


class UnsupportedOperation(RegistryError):
    """The backend kind cannot do this (vLLM cannot pull or delete models)."""

    def __init__(self, backend: str, kind: str, operation: str, hint: str = "") -> None:
        message = f"backend {backend!r} ({kind}) cannot {operation} models"
        super().__init__(f"{message}: {hint}" if hint else message)
        self.backend = backend
        self.kind = kind
        self.operation = operation


class BackendUnavailable(RegistryError):
    """The backend did not answer usefully (refused, timed out, HTTP error, malformed body)."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(f"backend {backend!r} is unavailable: {reason}")
        self.backend = backend
        self.reason = reason


class ModelNotFound(RegistryError):
    """The model is not routable (or, with a backend named, that backend does not have it)."""

    def __init__(self, model: str, backend: str | None = None, detail: str | None = None) -> None:
        where = f" on backend {backend!r}" if backend else ""
        message = f"model {model!r} not found{where}"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.model = model
        self.backend = backend
        self.detail = detail


class InvalidModelName(RegistryError):
    """A model name that no backend would accept (empty, whitespace, control characters, too long)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"invalid model name {model[:80]!r}")
        self.model = model


class PullError(RegistryError):
    """A pull failed; ``message`` is the backend's own error text (e.g. Ollama's ``{"error": ...}`` line)."""

    def __init__(self, backend: str, model: str, message: str) -> None:
        # RegistryError by name, not super(): in PullModelNotFound's MRO super() here is ModelNotFound, whose
        # __init__ would take this sentence for the model name and wrap it a second time.
        RegistryError.__init__(self, f"pulling {model!r} on backend {backend!r} failed: {message}")
        self.backend = backend
        self.model = model
        self.message = message


class PullModelNotFound(PullError, ModelNotFound):
    """The backend's upstream registry has no such model (Ollama: ``pull model manifest: file does not exist``)."""

    def __init__(self, backend: str, model: str, message: str) -> None:
        RegistryError.__init__(self, f"model {model!r} not found on backend {backend!r}: {message}")
        self.backend = backend
        self.model = model
        self.message = message
        self.detail = message
