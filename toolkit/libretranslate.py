"""`toolkit serve` speaking LibreTranslate's API, so its clients (libretranslatepy, deep-translator, Mastodon,
browser extensions) work unchanged.

`POST /translate` with `q` (a string or a list), `source`, `target`, `format`, `api_key` — as JSON, as a
form-encoded body or in the query string (deep-translator) — answers `{"translatedText": ...}`; a request in
our own shape (`text`/`texts`) reaches our own handler as before. `GET /languages` lists the model's two
languages. Errors are `{"error": "..."}` with LibreTranslate's codes: 400 bad request (a text beyond
`--max-chars` included), 403 bad key, 429 busy, 500 translation failure.

No `/detect`: both languages of the default model are written in Han characters, and a character or lexicon
guess on a short sentence would be a coin toss reported as a confidence. `source: "auto"` needs none: a model
of two languages translates into `target` from the other one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from toolkit.config import ServeConfig
from toolkit.prompt import PromptSpec

log = logging.getLogger(__name__)
PATH = "/libretranslate/translate"  # where Dispatch sends LibreTranslate's POST /translate
ALIASES = {"zh": ["zh", "zh-Hant"], "nan": ["nan", "nan-Hant"]}  # Traditional-script codes clients send
# Our statuses for the same failures -> LibreTranslate's.
FIELDS = {"q", "source", "target", "format", "api_key"}  # a JSON object with `q`, or with these and not OURS
OURS = {"text", "texts"}
STATUS = {413: 400, 422: 400, 429: 429, 503: 500, 504: 500}


def codes_for(settings: ServeConfig, columns: tuple[str, str]) -> tuple[list[str], list[str]]:
    """The codes of the model's source and target language: configured, else the prep columns and their aliases."""
    return (list(settings.source_codes) or ALIASES.get(columns[0], [columns[0]]),
            list(settings.target_codes) or ALIASES.get(columns[1], [columns[1]]))


def _form(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, errors="strict")


class Dispatch:
    """ASGI middleware: a LibreTranslate request to POST /translate goes to PATH; ours goes on unchanged.

    LibreTranslate's: a form body, `q` in the query string, or a JSON object with `q` (or with its other
    fields and neither `text` nor `texts`). A JSON body is read
    (under the app's body limit) and handed on as it came.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/translate":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        ours = kind not in (b"application/x-www-form-urlencoded", b"multipart/form-data") and "q" not in dict(query)
        if ours and kind in (b"application/json", b""):
            messages = []
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            body = b"".join(m.get("body", b"") for m in messages)
            if any(f'"{key}"'.encode() in body for key in FIELDS):  # else only FastAPI parses ours
                try:
                    parsed = json.loads(body)
                except ValueError:
                    parsed = None
                ours = not (isinstance(parsed, dict) and ("q" in parsed or (FIELDS & parsed.keys() and not
                                                                            OURS & parsed.keys())))

            async def replay() -> dict[str, Any]:
                return messages.pop(0) if messages else await receive()

            receive = replay
        if not ours:
            scope = {**scope, "path": PATH, "raw_path": PATH.encode()}
        await self.app(scope, receive, send)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BadRequest(Exception):
    pass


async def _params(request: Request) -> tuple[dict[str, Any], str | None]:
    """The request's fields (query string, then the body over it) and what was wrong with the body, if anything."""
    params: dict[str, Any] = dict(request.query_params)
    body = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        return params, None
    if kind == "multipart/form-data":
        return params, "multipart bodies are not supported: send JSON or application/x-www-form-urlencoded"
    if kind == "application/x-www-form-urlencoded":
        try:
            pairs = _form(body)
        except (UnicodeError, ValueError):
            return params, "the form body is not valid percent-encoded UTF-8"
        names = [k for k, _ in pairs]
        repeated = sorted({k for k in names if names.count(k) > 1})
        if repeated:
            return params, f"{repeated[0]!r} given {names.count(repeated[0])} times: send a list of texts as JSON"
        return {**params, **dict(pairs)}, None
    try:
        parsed = json.loads(body)
    except ValueError:
        return params, "the body is not valid JSON"
    if not isinstance(parsed, dict):
        return params, "expected a JSON object with q, source and target"
    return {**params, **parsed}, None


def _texts(q: Any, settings: ServeConfig) -> list[str]:
    from toolkit.serve import _SURROGATE

    texts = q if isinstance(q, list) else [q]
    if q is None or q == "" or q == []:
        raise BadRequest("missing q parameter")
    if not all(isinstance(t, str) for t in texts):
        raise BadRequest("q: expected a string or a list of strings")
    for i, text in enumerate(texts):
        if not text.strip():
            raise BadRequest(f"q: text {i} is empty")
        if _SURROGATE.search(text):
            raise BadRequest(f"q: text {i} holds a lone surrogate escape (\\ud800-\\udfff): not valid Unicode text")
    if len(texts) > settings.max_texts:
        raise BadRequest(f"request ({len(texts)} texts) exceeds batch limit ({settings.max_texts})")
    chars = sum(len(t) for t in texts)  # LibreTranslate's char_limit counts the whole request
    if chars > settings.max_chars:
        raise BadRequest(f"request ({chars:,} characters) exceeds text limit ({settings.max_chars:,})")
    return texts


def _sides(params: dict[str, Any], spec: PromptSpec, codes: tuple[list[str], list[str]]) -> tuple[str | None, str]:
    """(source name or None for auto, target name) of the requested codes."""
    names = {c.lower(): spec.source_name for c in codes[0]} | {c.lower(): spec.target_name for c in codes[1]}
    known = f"{codes[0][0]} ({spec.source_name}) and {codes[1][0]} ({spec.target_name})"
    out = []
    for field in ("source", "target"):
        value = params.get(field)
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(f"missing {field} parameter")
        if field == "source" and value.strip().lower() == "auto":
            out.append(None)
            continue
        name = names.get(value.strip().lower())
        if name is None:
            raise BadRequest(f"{field} {value[:40]!r} is not supported: this server translates between {known}")
        out.append(name)
    if out[0] == out[1]:
        raise BadRequest(f"source and target are both {params['source']!r}")
    return out[0], out[1]


def add_routes(app: FastAPI, spec: PromptSpec, codes: tuple[list[str], list[str]], settings: ServeConfig,
               translate_texts: Callable[[list[str], PromptSpec], Awaitable[tuple[float, list, float]]],
               authorized: Callable[[Request, str | None], bool]) -> None:
    """LibreTranslate's translate (reached through Dispatch) and /languages on `app`."""
    from toolkit.serve import choose_spec

    @app.post(PATH, include_in_schema=False)
    async def translate(request: Request) -> JSONResponse:
        params, problem = await _params(request)
        given = params.get("api_key")
        if not authorized(request, given if isinstance(given, str) else None):  # before anything about the body
            return error(403, "Invalid API key")
        try:
            if problem:
                raise BadRequest(problem)
            fmt = params.get("format", "text")
            if fmt != "text":
                raise BadRequest(f"format {str(fmt)[:20]!r} is not supported: send plain text with format=text "
                                 "(html would need its markup kept out of the model's input)")
            texts = _texts(params.get("q"), settings)
            source, target = _sides(params, spec, codes)
            chosen = choose_spec(spec, (codes[0][0], codes[1][0]), source, target)
            _, results, _ = await translate_texts(texts, chosen)
        except BadRequest as exc:
            return error(400, f"Invalid request: {exc}")
        except HTTPException as exc:
            return error(STATUS.get(exc.status_code, 500), exc.detail, exc.headers)
        out = [r.text for r in results]
        return JSONResponse({"translatedText": out if isinstance(params["q"], list) else out[0]})

    @app.get("/languages", tags=["LibreTranslate"])
    @app.post("/languages", include_in_schema=False)
    async def languages() -> list[dict[str, Any]]:
        """The model's two languages in LibreTranslate's shape; open like /health (LibreTranslate asks no key)."""
        return [{"code": codes[0][0], "name": spec.source_name, "targets": [codes[1][0]]},
                {"code": codes[1][0], "name": spec.target_name, "targets": [codes[0][0]]}]
