"""`toolkit serve [MODEL] --backend B --host 127.0.0.1 --port 8000`: a FastAPI translation endpoint.

`POST /translate` translates one text or a batch with the prompt the model was trained with (the
`PromptSpec` of its manifests), either way between the two languages of training, with a glossary hint
(`--glossary`, and the request's own bounded `glossary` entries) for the terms found in a text; it also speaks
LibreTranslate's API (toolkit/libretranslate.py: `q`/`source`/`target`, `GET /languages`). `GET /health` says
whether the backend answers, `GET /v1/models` names the model, `/docs` is the OpenAPI page, and `/` is a
translation page for people (toolkit/webpage.py).

Backends block (llama.cpp, transformers, an Ollama HTTP call), so they run on a pool of
`concurrency` worker threads; at most `queue_size` more requests wait for one and the rest get 429
at once. A backend that decodes in batches (transformers) gets the requests that wait together as one call
instead (`serve.batch_requests`, toolkit/batcher.py), within the same admission limits. A request that times
out stops waiting (504), but its worker slot stays taken until the backend call really returns: llama.cpp and
a transformers model are not thread-safe, and a slot freed early would let a second call run beside the
first. Errors are JSON without tracebacks; the
traceback goes to the server log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from toolkit import backends, libretranslate, runs, webpage
from toolkit.config import ServeConfig
from toolkit.errors import ConfigError
from toolkit.prompt import PromptSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
HEALTH_TIMEOUT_S = 5.0
MIN_KEY_CHARS = 16
_SURROGATE = re.compile("[\ud800-\udfff]")


# ---- request and response bodies ----------------------------------------------------------------

MAX_TERM_CHARS = 100
MAX_FORMS = 4
_CONTROL = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


class GlossaryEntry(BaseModel):
    """One term of a request's glossary, in the request's direction (source_lang -> target_lang)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = Field(min_length=1, max_length=MAX_TERM_CHARS, description="The term as the text writes it.")
    target: str | list[str] = Field(description=f"Its translation, or up to {MAX_FORMS} alternatives.")

    @model_validator(mode="after")
    def _plain_text(self) -> GlossaryEntry:
        forms = self.forms()
        if not forms or len(forms) > MAX_FORMS:
            raise ValueError(f"`target`: expected 1 to {MAX_FORMS} forms, found {len(forms)}")
        for value in (self.source, *forms):
            if not value.strip() or len(value) > MAX_TERM_CHARS:
                raise ValueError(f"glossary terms are 1 to {MAX_TERM_CHARS} characters besides spaces")
            if _CONTROL.search(value):  # a newline or tab would let an entry pose as hint or prompt structure
                raise ValueError("glossary terms hold no control characters (newline, tab...) and no lone surrogate")
        return self

    def forms(self) -> list[str]:
        return [self.target] if isinstance(self.target, str) else list(self.target)


class TranslateRequest(BaseModel):
    """One `text` or a batch of `texts`; languages by name or code, in either direction of training."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"text": "今仔日天氣真好。"},
        {"texts": ["你好。", "多謝。"], "source_lang": "nan", "target_lang": "zh", "include_reasoning": True},
        {"text": "這個東西很便宜。", "glossary": [{"source": "東西", "target": "物件"},
                                               {"source": "便宜", "target": ["俗", "便宜"]}]},
    ]})

    text: str | None = Field(None, description="One text to translate.")
    texts: list[str] | None = Field(None, description="Several texts, translated in order.")
    source_lang: str | None = Field(None, max_length=100, description="Language of the text (default: the "
                                    "model's source language).")
    target_lang: str | None = Field(None, max_length=100, description="Language to translate into.")
    reasoning_language: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[\w ()\-]+$",
                                           description="The system option `reasoning language: X`.")
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    include_reasoning: bool = Field(False, description="Return the analysis channel too.")
    glossary: list[GlossaryEntry] | None = Field(None, description="Terms for this request (source_lang -> "
                                                 "target_lang), added to the server's --glossary: the entries "
                                                 "whose source occurs in a text go to the model as a hint.")

    @model_validator(mode="after")
    def _one_kind(self) -> TranslateRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give either `text` or `texts` (a list), not both and not neither")
        if self.texts is not None and not self.texts:
            raise ValueError("`texts` is empty")
        for i, text in enumerate(self.items()):
            if not text.strip():
                raise ValueError(f"text {i} is empty")
            if _SURROGATE.search(text):  # JSON allows "\ud800" alone; no tokenizer can encode it
                raise ValueError(f"text {i} holds a lone surrogate escape (\\ud800-\\udfff): not valid Unicode text")
        return self

    def items(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])


class TranslationOut(BaseModel):
    text: str
    analysis: str | None = None
    complete: bool
    tokens: int
    stop: str | None = Field(None, description="Why generation ended: end (the model ended it), length (the text's "
                             "token limit) or repetition (a loop, cut to one copy).")


class Timings(BaseModel):
    queue_ms: float
    backend_ms: float
    total_ms: float


class TranslateResponse(BaseModel):
    model: str
    backend: str
    source_lang: str
    target_lang: str
    translations: list[TranslationOut]
    timings: Timings


# ---- languages ----------------------------------------------------------------------------------

def choose_spec(spec: PromptSpec, codes: tuple[str, str], source_lang: str | None,
                target_lang: str | None) -> PromptSpec:
    """`spec` or `spec.reversed()` for the requested languages; ValueError for one the model does not know."""
    aliases = {spec.source_name.lower(): spec.source_name, spec.target_name.lower(): spec.target_name,
               codes[0].lower(): spec.source_name, codes[1].lower(): spec.target_name}

    def lookup(value: str, field: str) -> str:
        name = aliases.get(value.strip().lower())
        if name is None:
            known = ", ".join(repr(a) for a in (codes[0], codes[1], spec.source_name, spec.target_name))
            raise ValueError(f"{field} {value!r}: this model translates between {known}")
        return name

    source = lookup(source_lang, "source_lang") if source_lang is not None else None
    target = lookup(target_lang, "target_lang") if target_lang is not None else None
    if source is not None and source == target:
        raise ValueError(f"source_lang and target_lang are both {source!r}")
    return spec.reversed() if source == spec.target_name or target == spec.source_name else spec


# ---- admission: worker threads and a bounded queue ------------------------------------------------

class QueueFull(Exception):
    pass


class Gate:
    """`concurrency` worker threads; at most `queue_size` more calls admitted to wait; the rest QueueFull."""

    def __init__(self, concurrency: int, queue_size: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="backend")
        self.capacity = concurrency + queue_size
        self.admitted = 0  # only touched on the event loop thread

    async def run(self, fn: Callable[[], T], timeout: float) -> T:
        """`fn` on a worker thread."""
        return await self.join(lambda: self.pool.submit(fn), timeout)

    async def join(self, submit: Callable[[], Future], timeout: float) -> Any:
        """The result of the Future that `submit` starts (a worker thread's call, or a place in a `Batcher`)."""
        if self.admitted >= self.capacity:
            raise QueueFull
        loop = asyncio.get_running_loop()
        self.admitted += 1
        try:
            future = submit()
        except BaseException:
            self.admitted -= 1
            raise
        # Released when the call really ends (or is dropped from the queue), not when the request gives up.
        future.add_done_callback(lambda _: self._release_from(loop))
        # On timeout wait_for cancels the wrapper, which cancels the call only if it has not started.
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def _release(self) -> None:
        self.admitted -= 1

    def _release_from(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the server stopped while this call ran: nothing left to count
            pass

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# ---- the app ------------------------------------------------------------------------------------

def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class _AccessLog:
    """ASGI middleware: one log line per request (method, path, status, latency) and counts by status class."""

    def __init__(self, app: Any, counts: Counter) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # unless a response starts

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.counts[status // 100] += 1
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, (time.perf_counter() - started) * 1e3)


def create_app(translator: backends.Translator, spec: PromptSpec, settings: ServeConfig, *,
               api_key: str | None = None, codes: tuple[str, str] | None = None) -> FastAPI:
    """The FastAPI app around one loaded translator. `api_key`: required on /translate and /v1/models when set."""
    codes = codes or runs.prep_columns(None)
    gate = Gate(settings.concurrency, settings.queue_size)

    def backend(texts: list[str], chosen: PromptSpec) -> list[backends.Translation]:
        return translator.translate(texts, chosen, max_new_tokens=settings.max_new_tokens)

    batcher = None
    if settings.batch_requests and getattr(translator, "decodes_in_batches", False):
        from toolkit.batcher import Batcher

        batcher = Batcher(backend, window_s=settings.batch_window_ms / 1e3, max_texts=settings.batch_max_texts)
    counts: Counter = Counter()
    backend_name = settings.backend or type(translator).__name__
    model_name = Path(translator.name).name or translator.name  # a file name, not the server's folders

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = time.monotonic()
        yield
        if batcher is not None:
            batcher.close()
        gate.close()
        summary = ", ".join(f"{counts[k]} {k}xx" for k in sorted(counts)) or "none"
        log.info("serve: %d requests (%s) in %.0fs", sum(counts.values()), summary, time.monotonic() - started)

    # A JSON-escaped character takes at most 6 bytes (\uXXXX); the rest is room for the other fields.
    max_body = settings.max_texts * (settings.max_chars * 6 + 8) + 4096
    app = FastAPI(title="toolkit translate", version="1", lifespan=lifespan, max_body_size=max_body,
                  description=f"{spec.source_name} <-> {spec.target_name} with {model_name}")
    app.state.gate, app.state.counts, app.state.batcher = gate, counts, batcher
    app.add_middleware(libretranslate.Dispatch)  # inside the access log, which so logs the path the client used
    app.add_middleware(_AccessLog, counts=counts)

    unauthorized = {"detail": "missing or wrong API key (send X-API-Key or Authorization: Bearer)"}

    def key_matches(given: str | None) -> bool:
        if api_key is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), api_key.encode())

    def authorized(request: Request) -> bool:
        given = request.headers.get("x-api-key")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = token.strip()
        return key_matches(given)

    async def check_key(request: Request) -> None:
        if not authorized(request):
            raise HTTPException(401, unauthorized["detail"], headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reads and parses the body before it runs dependencies: without the key, say 401 first, so an
        # anonymous client learns nothing about the request format.
        if not authorized(request):
            return JSONResponse(unauthorized, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        # The default body echoes the input back (a 2 MB text, a key someone mistyped into a field): drop it.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error; the server log has the details")

    async def translate_texts(texts: list[str], chosen: PromptSpec) -> tuple[float, list[backends.Translation], float]:
        """(start, results, end) of one backend call through the gate; HTTPException for every failure."""

        def call() -> tuple[float, list[backends.Translation], float]:
            begun = time.perf_counter()
            return begun, backend(texts, chosen), time.perf_counter()

        try:
            if batcher is not None:  # decoded together with the requests waiting beside it
                begun, results, ended = await gate.join(lambda: batcher.submit(texts, chosen),
                                                        settings.request_timeout_s)
            else:
                begun, results, ended = await gate.run(call, settings.request_timeout_s)
        except QueueFull:
            raise HTTPException(429, "server busy: too many requests waiting; retry later",
                                headers={"Retry-After": "1"}) from None
        except TimeoutError:
            raise HTTPException(504, f"no translation within {settings.request_timeout_s:g}s") from None
        except backends.PromptTooLong as exc:  # --max-chars counts characters, the context window tokens
            raise HTTPException(413, str(exc)) from None
        except Exception:
            log.exception("backend %s failed", translator.name)
            raise HTTPException(503, "translation backend failed; the server log has the details") from None
        if len(results) != len(texts):
            log.error("backend %s returned %d results for %d texts", translator.name, len(results), len(texts))
            raise HTTPException(503, "translation backend returned a wrong number of results")
        return begun, results, ended

    @app.post("/translate", response_model=TranslateResponse, response_model_exclude_none=True,
              dependencies=[Depends(check_key)],
              responses={401: {}, 413: {}, 422: {}, 429: {}, 503: {}, 504: {}})
    async def translate(body: TranslateRequest) -> Any:
        started = time.perf_counter()
        texts = body.items()
        if len(texts) > settings.max_texts:
            raise HTTPException(413, f"{len(texts)} texts: at most {settings.max_texts} per request")
        too_long = [i for i, t in enumerate(texts) if len(t) > settings.max_chars]
        if too_long:
            raise HTTPException(413, f"text {too_long[0]} has {len(texts[too_long[0]])} characters: "
                                     f"at most {settings.max_chars}")
        try:
            chosen = choose_spec(spec, codes, body.source_lang, body.target_lang)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        options = {k: v for k, v in (("reasoning_language", body.reasoning_language),
                                     ("reasoning_effort", body.reasoning_effort)) if v is not None}
        if body.glossary is not None:
            if len(body.glossary) > settings.max_glossary_entries:
                raise HTTPException(413, f"{len(body.glossary)} glossary entries: at most "
                                         f"{settings.max_glossary_entries} per request")
            from toolkit.glossary import Glossary

            own = Glossary()
            for entry in body.glossary:
                own.add(entry.source, entry.forms())
            options["glossary"] = own.merged(chosen.glossary)
        chosen = dataclasses.replace(chosen, **options)
        begun, results, ended = await translate_texts(texts, chosen)
        out = [TranslationOut(text=r.text, analysis=r.analysis if body.include_reasoning else None,
                              complete=r.complete, tokens=r.tokens, stop=r.stop) for r in results]
        timings = Timings(queue_ms=round((begun - started) * 1e3, 2), backend_ms=round((ended - begun) * 1e3, 2),
                          total_ms=round((time.perf_counter() - started) * 1e3, 2))
        return TranslateResponse(model=model_name, backend=backend_name, source_lang=chosen.source_name,
                                 target_lang=chosen.target_name, translations=out, timings=timings)

    @app.get("/health", responses={503: {}})
    async def health() -> JSONResponse:
        try:
            ok = await asyncio.wait_for(asyncio.to_thread(translator.health), HEALTH_TIMEOUT_S)
        except Exception:  # a health check that raises or hangs means: not usable now
            log.warning("health check of %s failed", translator.name, exc_info=True)
            ok = False
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "backend": backend_name}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models", dependencies=[Depends(check_key)], responses={401: {}})
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "owned_by": "toolkit", "backend": backend_name,
            "languages": {codes[0]: spec.source_name, codes[1]: spec.target_name},
            "limits": {"max_chars": settings.max_chars, "max_texts": settings.max_texts,
                       "max_new_tokens": settings.max_new_tokens},
        }]}

    libretranslate.add_routes(app, spec, libretranslate.codes_for(settings, codes), settings, translate_texts,
                              lambda request, given: authorized(request) or key_matches(given))
    webpage.add_routes(app, model=model_name, backend=backend_name, max_chars=settings.max_chars,
                       languages=[(codes[0], spec.source_name), (codes[1], spec.target_name)],
                       default_effort=spec.reasoning_effort, key_required=api_key is not None,
                       glossary_limits={"max_entries": settings.max_glossary_entries, "max_forms": MAX_FORMS,
                                        "max_term_chars": MAX_TERM_CHARS})
    return app


# ---- choosing and loading the model -------------------------------------------------------------



def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_for(cfg: ServeConfig) -> str | None:
    """The API key from `cfg.api_key_env`; refuses a non-loopback bind without one, and short keys."""
    key = os.environ.get(cfg.api_key_env) or None
    if key is None and not is_loopback(cfg.host):
        raise ConfigError(f"binding to {cfg.host} makes the server reachable from other machines: set "
                          f"{cfg.api_key_env} to a secret of {MIN_KEY_CHARS}+ characters (clients send it as "
                          "X-API-Key), or bind --host 127.0.0.1.")
    if key is None:
        return None
    generate = "Generate one: python -c 'import secrets; print(secrets.token_urlsafe())'"
    if len(key.strip()) < MIN_KEY_CHARS:  # sixteen spaces are not a secret
        raise ConfigError(f"${cfg.api_key_env}: expected an API key of at least {MIN_KEY_CHARS} characters besides "
                          f"spaces, found {len(key.strip())}. {generate}")
    if key != key.strip() or not (key.isascii() and key.isprintable()):
        # HTTP drops a header value's outer spaces and carries ASCII: no client could send such a key
        raise ConfigError(f"${cfg.api_key_env}: expected printable ASCII without leading or trailing spaces (a "
                          f"header carries nothing else). {generate}")
    return key


def bind(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so a taken port is one clear error before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ConfigError(f"{host}:{port}: cannot listen there ({exc.strerror or exc}). Pick another --port "
                          "(0 = any free port) or --host.") from exc
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(cfg: ServeConfig, target: runs.Model | str | Path, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Load the model (`runs.resolve`d, or a path or name to resolve) and serve it until interrupted;
    `on_ready(url)` once it listens."""
    api_key = api_key_for(cfg)  # before loading any weights
    backend, model, manifest_dir = target if isinstance(target, runs.Model) else runs.resolve(target, cfg.backend)
    sock = bind(cfg.host, cfg.port)
    spec = backends.spec_for(backend, model, manifest_dir=manifest_dir)
    codes = runs.prep_columns(runs.nearest_manifest(manifest_dir) if manifest_dir else None)
    if cfg.glossary:  # before the weights load: a bad file is one quick error
        from toolkit import glossary

        spec = dataclasses.replace(spec, glossary=glossary.load(cfg.glossary, *codes))
    translator = backends.load_translator(backend, model, **cfg.translator_options(backend))
    app = create_app(translator, spec, dataclasses.replace(cfg, backend=backend), api_key=api_key, codes=codes)
    log.info("serve: %s through %s, %s <-> %s, key %s", translator.name, backend, spec.source_name,
             spec.target_name, "required" if api_key else "off (localhost only)")
    listen(app, sock, on_ready=on_ready)


def listen(app: FastAPI, sock: socket.socket, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve `app` with uvicorn on the bound `sock` until Ctrl-C."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready(url_of(sock))

    # uvicorn keeps the CLI's logging (its own lines at the CLI's level); our middleware logs the requests.
    config = uvicorn.Config(app, log_config=None, log_level=logging.getLogger().getEffectiveLevel(),
                            access_log=False, timeout_graceful_shutdown=5)
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the shutdown already happened
        pass
