"""`toolkit serve MODEL`, then open its URL: a translation page at `/` in front of `POST /translate`.

Three files of package data (toolkit/web/: index.html, page.js, page.css), served by the app itself: no
framework, nothing fetched from another origin (the Content-Security-Policy forbids it), so the page works
offline. The HTML carries the model's language names and limits as JSON; the script sends the text to
`POST /translate` like any client, with the API key (when the server has one) as `X-API-Key`. Each asset has
its own fixed route: no request names a file.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read(name: str) -> str:
    return files("toolkit").joinpath("web", name).read_text(encoding="utf-8")


def script_json(value: Any) -> str:
    """JSON that cannot end its <script> element or open a comment inside it."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def add_routes(app: FastAPI, *, model: str, backend: str, languages: list[tuple[str, str]], max_chars: int,
               default_effort: str, key_required: bool, glossary_limits: dict[str, int]) -> None:
    """GET / (the page) and GET /web/<asset> on `app`. `languages`: (code, name) of the model's two languages;
    `glossary_limits`: max_entries, max_forms and max_term_chars of a request's `glossary`."""
    config = {"model": model, "backend": backend, "max_chars": max_chars, "default_effort": default_effort,
              "key_required": key_required, "languages": [{"code": c, "name": n} for c, n in languages],
              "glossary": glossary_limits}
    page = read("index.html").replace("{{config}}", script_json(config))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=HEADERS)

    for name, media_type in ASSETS.items():
        add_asset(app, name, read(name), media_type)


def add_asset(app: FastAPI, name: str, content: str, media_type: str) -> None:
    @app.get(f"/web/{name}", include_in_schema=False)
    async def asset() -> Response:
        return Response(content, media_type=media_type, headers=HEADERS)
