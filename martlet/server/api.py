"""The FastAPI app: routes, the API key, and every error in OpenAI's shape.

The app starts reading the engine core's outputs when it starts serving, and stops the core
after uvicorn has let the in-flight requests finish (or has cancelled them, which aborts them),
so SIGTERM ends both processes cleanly.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from martlet.server import DEFAULT_MAX_BODY_BYTES
from martlet.server.async_engine import AsyncEngine, EngineError
from martlet.server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from martlet.server.serving import APIError, OpenAIServing, bad_request, engine_error


def build_app(
    engine: AsyncEngine, model_name: str, api_key: str | None = None, max_waiting: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_prompt_tokens: int | None = None,
) -> FastAPI:
    serving = OpenAIServing(engine, model_name, max_waiting, max_prompt_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="Martlet", lifespan=lifespan)
    app.add_middleware(_BodySizeLimit, max_bytes=max_body_bytes)
    if api_key:  # added last, so it runs first: no body is read for a request without the key
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return serving.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completion(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if engine.error is not None else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    # FastAPI answers a body it cannot parse or validate with 422; OpenAI's API says 400.
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = None if first.get("type") == "json_invalid" else _param(first)
        message = "; ".join(_describe(error) for error in errors[:3]) or "invalid request"
        return bad_request(message, param).response()

    @app.exception_handler(EngineError)
    async def failed_in_engine(request: Request, exc: EngineError) -> JSONResponse:
        return engine_error(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal server error: {exc}", "server_error").response()


def _param(error: dict) -> str | None:
    return ".".join(str(part) for part in error.get("loc", ())[1:]) or None


def _describe(error: dict) -> str:
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}"
    where = _param(error)
    if error.get("type") == "extra_forbidden":
        return f"{where}: this server does not support this field"
    return f"{where}: {error['msg']}" if where else error["msg"]


class _APIKeyMiddleware:
    """Requires `Authorization: Bearer KEY` on /v1/*, before the body is even read.

    A plain ASGI middleware, not `BaseHTTPMiddleware`, so streaming and disconnects pass through
    untouched. /health and /metrics stay open for probes and scrapers.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = APIError(401, "invalid API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class _BodySizeLimit:
    """Answers 413 to a body over `max_bytes`: at once when Content-Length says so, else as soon as
    the bytes read pass the limit (a chunked body), before the rest is read or parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large().response()(scope, receive, send)
        received = 0
        too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # tell the app the client left, and answer in its place
                too_large = True
                return {"type": "http.disconnect"}
            return message

        async def send_unless_too_large(message: Message) -> None:
            if not too_large:
                await send(message)

        try:
            await self.app(scope, counting_receive, send_unless_too_large)
        except Exception:
            if not too_large:
                raise
        if too_large:
            await self._too_large().response()(scope, receive, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")
