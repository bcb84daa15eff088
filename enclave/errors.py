"""OpenAI-style error envelope and the exception handlers that make every failure use it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("enclave.errors")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
}


def envelope(message: str, *, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """Raised anywhere in request handling; rendered as the OpenAI envelope with ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None, type: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(envelope(self.message, type=self.type, code=self.code, param=self.param),
                            status_code=self.status, headers=self.headers)


def unauthorized(message: str, reason: str) -> ApiError:
    """401 for any PAT problem. Never retried by openai-python (x-should-retry: false)."""
    err = ApiError(401, message, code="invalid_api_key", type="invalid_request_error",
                   headers={"WWW-Authenticate": 'Bearer realm="cube-ai"', "x-should-retry": "false"})
    err.reason = reason  # type: ignore[attr-defined]  # for metrics only
    return err


def forbidden(message: str, code: str) -> ApiError:
    return ApiError(403, message, code=code, type="permission_error", headers={"x-should-retry": "false"})


def model_not_found(model: str) -> ApiError:
    model = model if len(model) <= 200 else model[:200] + "..."
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def not_found(what: str, code: str) -> ApiError:
    return ApiError(404, f"{what} not found.", code=code)


def bad_request(message: str, code: str = "invalid_value", param: str | None = None) -> ApiError:
    return ApiError(400, message, code=code, param=param)


def error_response(status: int, message: str, code: str | None, *, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return ApiError(status, message, code=code, param=param, headers=headers).response()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None, "invalid_request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "The request body is not valid JSON.", None, "invalid_json"
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return f"Unknown field `{param}`.", param, "unknown_field"
    where = f"`{param}`" if param else "the request"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid value for {where}: {msg}{more}.", param, "invalid_value"


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's). Asked
    through ``matches`` alone, so routers included in routers are searched too."""
    return [m for m in _METHODS
            if any(route.matches({**request.scope, "method": m})[0] is Match.FULL for route in request.app.router.routes)]


def install_error_handlers(app: FastAPI, *,
                           before_validation_error: Callable[[Request], Awaitable[JSONResponse | None]] | None = None
                           ) -> None:
    """``before_validation_error`` may answer instead of the 400 (used so an unauthenticated request with a bad
    body still gets the 401, as FastAPI parses bodies before it runs the authentication dependency)."""
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if before_validation_error is not None:
            early = await before_validation_error(request)
            if early is not None:
                return early
        message, param, code = _validation_message(exc)
        return error_response(400, message, code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            return error_response(404, "No such route.", "not_found", headers=headers)
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
            return error_response(405, "Method not allowed for this route.", "method_not_allowed", headers=headers)
        detail = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return error_response(exc.status_code, detail, None, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                  exc_info=exc)
        return JSONResponse(envelope("Internal server error.", type="api_error", code="internal_error"),
                            status_code=500)
