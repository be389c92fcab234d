"""The translation page at `toolkit serve`'s root: its routes and headers (fast), and the page itself driven in
headless Chromium against the tiny GGUF (marker `browser`: `pytest -m browser`). Each browser test saves a
screenshot into tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_serve import KEY, NAN, SPEC, ZH, FakeTranslator, _serve_process, _stop, _wait_for, client

from toolkit import serve, webpage
from toolkit.config import ServeConfig
from toolkit.prompt import default_spec

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path(os.environ.get("TOOLKIT_CHROMIUM", "/usr/bin/chromium"))
# Debian's Chromium, kept off the network and away from any profile but a fresh one.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_CHARS = 200


def page_config(html: str) -> dict:
    found = re.search(r'<script id="config" type="application/json">(.*?)</script>', html, re.DOTALL)
    assert found, "no config in the page"
    return json.loads(found.group(1))


# ---- routes, headers, package data (no browser) --------------------------------------------------------------

def test_page_and_its_assets_are_served_with_a_strict_policy():
    with client(max_chars=123, max_glossary_entries=7) as c:
        page = c.get("/")
        assets = {name: c.get(f"/web/{name}") for name in webpage.ASSETS}
        missing = [c.get(path).status_code for path in ("/web/index.html", "/web/../serve.py", "/web/%2e%2e/serve.py")]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page_config(page.text) == {
        "model": "fake-model", "backend": "FakeTranslator", "max_chars": 123, "default_effort": "low",
        "key_required": False, "languages": [{"code": "zh", "name": ZH}, {"code": "nan", "name": NAN}],
        "glossary": {"max_entries": 7, "max_forms": serve.MAX_FORMS, "max_term_chars": serve.MAX_TERM_CHARS}}
    assert 'type="file"' not in page.text  # nothing in the page selects a file
    assert not re.search(r'(src|href)="(https?:)?//', page.text)  # nothing from another origin
    assert assets["page.js"].headers["content-type"].startswith("text/javascript")
    assert assets["page.css"].headers["content-type"].startswith("text/css")
    assert all(a.status_code == 200 and a.headers["x-content-type-options"] == "nosniff" for a in assets.values())
    assert missing == [404, 404, 404]  # each asset has its own route; no path reaches another file


def test_page_is_open_with_a_key_and_holds_no_key():
    with client(api_key=KEY) as c:
        page = c.get("/")
        assert c.post("/translate", json={"text": "a"}).status_code == 401  # the API still needs the key
    assert page.status_code == 200 and page_config(page.text)["key_required"] is True
    assert KEY not in page.text


def test_language_names_cannot_end_the_config_script():
    spec = default_spec()
    hostile = spec.__class__(**{**spec.__dict__, "source_name": "</script><script>alert(1)</script><!--"})
    app = serve.create_app(FakeTranslator(), hostile, ServeConfig())
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        html = c.get("/").text
    assert "<script>alert" not in html and "<!--\"" not in html
    assert page_config(html)["languages"][0]["name"] == hostile.source_name


def test_the_page_is_package_data():
    """A non-editable install carries every file of toolkit/web/ (pyproject's package-data patterns)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "toolkit.web" in setuptools["packages"]
    patterns = setuptools["package-data"]["toolkit.web"]
    web = sorted(p.relative_to(ROOT / "toolkit" / "web").as_posix() for p in (ROOT / "toolkit" / "web").iterdir())
    assert web == ["index.html", "page.css", "page.js"]
    assert [f for f in web if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []


# ---- the page in headless Chromium, against the tiny GGUF ------------------------------------------------------

def _missing(reason: str) -> None:
    if os.environ.get("TOOLKIT_REQUIRE_BROWSER"):  # scripts/test.sh installs both: a skip there would hide a failure
        pytest.fail(f"{reason}; TOOLKIT_REQUIRE_BROWSER is set")
    pytest.skip(f"{reason} (scripts/test.sh installs it)")


@pytest.fixture(scope="session")
def playwright_driver():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TOOLKIT_CHROMIUM)")
    with sync_playwright() as driver:
        yield driver


def _expect():
    from playwright.sync_api import expect

    return expect


class Browser:
    """One Chromium with a fresh profile per test; records every URL the page asks for."""

    def __init__(self, driver, profile: Path) -> None:
        self.driver, self.profile = driver, profile
        self.context = self.page = None
        self.requested: list[str] = []

    def open(self, url: str, *, width: int = 1000, height: int = 760):
        self.context = self.driver.chromium.launch_persistent_context(
            str(self.profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport={"width": width, "height": height}, locale="en-US")
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.goto(url)
        return self.page

    def only_own_requests(self, url: str) -> None:
        """Everything the page loaded or sent went to the toolkit's server: nothing from the internet."""
        foreign = [u for u in self.requested if not (u.startswith((url + "/", "data:")))]
        assert self.requested and foreign == []


@pytest.fixture
def browser(playwright_driver, tmp_path, request):
    b = Browser(playwright_driver, tmp_path / "profile")
    yield b
    if b.page is not None:  # the artifact: how the page looked at the end of the test (failed or not)
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^\w.-]+", "_", request.node.name)
        b.page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)
    if b.context is not None:
        b.context.close()


@pytest.fixture(scope="module")
def page_server(tiny_gguf):
    # 16 tokens: greedy decoding of the tiny model writes no channel marker in them, so they come back as text
    proc, url = _serve_process(str(tiny_gguf), "--max-new-tokens", "16", "--max-chars", str(MAX_CHARS),
                               "--set", "serve.n_ctx=512", env={"TOOLKIT_API_KEY": ""})
    yield url
    _stop(proc)


def translate(page, press: str | None = None):
    """Translate what the source box holds (the button, or a key press in the box); the API's response."""
    with page.expect_response(re.compile(r"/translate$")) as answer:
        if press:
            page.locator("#source").press(press)
        else:
            page.get_by_role("button", name="Translate", exact=True).click()
    return answer.value


SENTENCE = "今仔日天氣真好。"


@pytest.mark.browser
@pytest.mark.llama
def test_type_a_sentence_and_get_its_translation(browser, page_server, tiny_gguf):
    page = browser.open(page_server)
    expect = _expect()
    expect(page).to_have_title(f"Translate: {ZH} ↔ {NAN}")
    expect(page.locator("#model")).to_have_text(f"Model: {tiny_gguf.name} (llama-cpp)")
    expect(page.locator("#key-box")).to_be_hidden()  # no key configured
    page.get_by_label(f"Text in {ZH}").fill(SENTENCE)
    expect(page.locator("#count")).to_have_text(f"8 / {MAX_CHARS} characters")
    response = translate(page, press="Control+Enter")  # the keyboard way
    assert response.status == 200
    assert response.request.post_data_json == {"text": SENTENCE, "source_lang": "zh", "target_lang": "nan",
                                               "include_reasoning": True}
    body = response.json()
    result = body["translations"][0]
    expect(page.get_by_role("status")).to_have_text(f"Translated into {NAN}.")
    output = page.get_by_label(f"Translation into {NAN}")
    expect(output).to_have_value(result["text"])
    assert result["text"].strip()  # the tiny model's words, whatever they mean
    expect(page.locator("#note")).to_have_text("The model stopped at its token limit before finishing, so the "
                                               "translation may be cut short.")  # 16 tokens, no end token
    meta = page.locator("#meta")
    expect(meta).to_contain_text(f"{tiny_gguf.name} (llama-cpp) · {result['tokens']} tokens · ")
    expect(meta).to_have_text(re.compile(r"[\d.]+ m?s in all \(waiting [\d.]+ m?s, model [\d.]+ m?s\)$"))
    page.get_by_role("button", name="Copy translation").click()
    expect(page.get_by_role("status")).to_have_text("Translation copied.")
    assert page.evaluate("navigator.clipboard.readText()") == result["text"]
    browser.only_own_requests(page_server)


@pytest.mark.browser
@pytest.mark.llama
def test_switch_direction(browser, page_server):
    page = browser.open(page_server)
    expect = _expect()
    page.get_by_label(f"{NAN} → {ZH}").check()
    expect(page.get_by_label(f"Text in {NAN}")).to_have_attribute("lang", "nan")
    page.get_by_label(f"Text in {NAN}").fill("食飽未？")
    response = translate(page)
    assert response.request.post_data_json["source_lang"] == "nan"
    assert response.request.post_data_json["target_lang"] == "zh"
    assert (response.json()["source_lang"], response.json()["target_lang"]) == (NAN, ZH)
    expect(page.get_by_role("status")).to_have_text(f"Translated into {ZH}.")
    expect(page.get_by_label(f"Translation into {ZH}")).to_have_value(response.json()["translations"][0]["text"])
    page.get_by_label(f"{ZH} → {NAN}").check()  # and back: the old translation goes with the old direction
    expect(page.get_by_label(f"Translation into {NAN}")).to_have_value("")
    browser.only_own_requests(page_server)


@pytest.mark.browser
@pytest.mark.llama
def test_reasoning_effort_and_the_reasoning_panel(browser, page_server):
    page = browser.open(page_server)
    expect = _expect()
    expect(page.get_by_label("Reasoning effort")).to_have_value("")
    expect(page.locator("#effort-default")).to_have_text("model default (low)")  # the manifest's effort
    page.get_by_label("Reasoning effort").select_option("high")
    page.get_by_label(f"Text in {ZH}").fill(SENTENCE)
    response = translate(page)
    assert response.request.post_data_json["reasoning_effort"] == "high"
    analysis = response.json()["translations"][0].get("analysis")
    panel = page.locator("#analysis")
    expect(panel).to_be_hidden()  # closed until asked for
    summary = page.get_by_text("Show reasoning")
    summary.focus()
    page.keyboard.press("Enter")  # a disclosure: opens from the keyboard
    expect(panel).to_be_visible()
    assert analysis is None  # the tiny model writes no analysis channel (the fake backend's test below has one)
    expect(panel).to_have_text("The model gave no reasoning for this text.")
    browser.only_own_requests(page_server)


@pytest.mark.browser
@pytest.mark.llama
def test_over_long_text_gets_a_readable_error(browser, page_server):
    page = browser.open(page_server)
    expect = _expect()
    text = "字" * (MAX_CHARS + 1)
    page.get_by_label(f"Text in {ZH}").fill(text)
    expect(page.locator("#count")).to_have_text(f"201 / {MAX_CHARS} characters: too long for this server, shorten it")
    expect(page.get_by_label(f"Text in {ZH}")).to_have_attribute("aria-invalid", "true")
    response = translate(page)
    assert response.status == 413  # the server's limit, not only the page's counter
    expect(page.get_by_role("alert")).to_have_text(
        f"The text is too long: 201 characters, and this server takes at most {MAX_CHARS}. "
        "Shorten it or translate it in parts.")
    expect(page.get_by_label(f"Translation into {NAN}")).to_have_value("")
    page.get_by_label(f"Text in {ZH}").fill("")
    page.get_by_role("button", name="Translate", exact=True).click()  # nothing to send: said, not sent
    expect(page.get_by_role("alert")).to_have_text("Type or paste a text to translate first.")
    assert sum(u.endswith("/translate") for u in browser.requested) == 1


@pytest.mark.browser
@pytest.mark.llama
def test_phone_width_labels_and_contrast(browser, page_server):
    page = browser.open(page_server, width=375, height=740)
    expect = _expect()
    order = []
    for _ in range(8):  # every control in reading order from the keyboard, each showing its focus
        page.keyboard.press("Tab")
        order.append(page.evaluate("(e => [e.id || e.tagName, getComputedStyle(e).outlineStyle])(document.activeElement)"))
    assert order == [[name, "solid"] for name in ("forward", "source", "target", "copy", "glossary", "effort",
                                                   "translate", "SUMMARY")]
    page.get_by_label(f"Text in {ZH}").fill(SENTENCE)
    assert translate(page).status == 200
    expect(page.get_by_role("status")).to_have_text(f"Translated into {NAN}.")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # nothing runs off the side
    source, output = page.locator("#source").bounding_box(), page.locator("#target").bounding_box()
    assert output["y"] >= source["y"] + source["height"]  # the boxes stack
    assert source["width"] >= 300
    assert page.locator("#glossary").bounding_box()["width"] >= 300
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)""")
    assert unlabelled == []
    ratios = page.evaluate(CONTRAST_JS)
    low = {what: round(ratio, 2) for what, ratio in ratios.items() if ratio < 4.5}
    assert len(ratios) >= 8 and low == {}, low  # WCAG AA for text
    browser.only_own_requests(page_server)


@pytest.mark.browser
@pytest.mark.llama
def test_with_a_key_refused_without_it_served_with_it(browser, tiny_gguf):
    proc, url = _serve_process(str(tiny_gguf), "--max-new-tokens", "8", "--set", "serve.n_ctx=512",
                               env={"TOOLKIT_API_KEY": KEY})
    try:
        page = browser.open(url)
        expect = _expect()
        key_box = page.get_by_label("API key")
        expect(key_box).to_be_visible()
        expect(key_box).to_have_attribute("type", "password")
        page.get_by_label(f"Text in {ZH}").fill(SENTENCE)
        refused = translate(page)
        assert refused.status == 401 and "x-api-key" not in refused.request.headers
        expect(page.get_by_role("alert")).to_have_text(
            "This server needs an API key. Enter it in the “API key” box and translate again.")
        expect(key_box).to_be_focused()
        key_box.fill("wrong-key-wrong-key")
        assert translate(page).status == 401
        expect(page.get_by_role("alert")).to_have_text("The server refused this API key. Check it and translate again.")
        key_box.fill(KEY)
        served = translate(page)
        assert served.status == 200 and served.request.headers["x-api-key"] == KEY
        expect(page.get_by_role("status")).to_have_text(f"Translated into {NAN}.")
        expect(page.get_by_role("alert")).to_be_hidden()
        stored = page.evaluate("[sessionStorage.getItem('toolkit-serve-api-key'), localStorage.length, document.cookie]")
        assert stored == [KEY, 0, ""]  # this tab only, unless "Remember" is ticked; never a cookie
        page.reload()
        expect(page.get_by_label("API key")).to_have_value(KEY)
        page.get_by_role("button", name="Forget key").click()
        assert page.evaluate("[sessionStorage.length, localStorage.length]") == [0, 0]
        assert all(KEY not in u for u in browser.requested)  # never in a URL
        browser.only_own_requests(url)
    finally:
        _stop(proc)


# Text colour against the first opaque background behind it, for each kind of text on the page.
CONTRAST_JS = """(() => {
  const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (e) => {
    for (; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length < 4 || c[3] === 1) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const shown = ["error", "note", "glossary-error"].map((id) => document.getElementById(id)).filter((e) => e.hidden);
  for (const e of shown) { e.hidden = false; e.textContent = "x"; }  // boxes that only show on occasion
  const out = {};
  for (const sel of ["h1", "#model", "legend", "label[for=source]", "#source", "#target", "#count", "#copy",
                     "#translate", "summary", "#error", "#note", "#meta", "#keys-hint",
                     "label[for=glossary]", "#glossary-hint", "#glossary", "#glossary-error"]) {
    const e = document.querySelector(sel);
    const a = lum(rgb(getComputedStyle(e).color)), b = lum(background(e));
    out[sel] = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  }
  for (const e of shown) { e.hidden = true; e.textContent = ""; }
  return out;
})()"""


# ---- the page against the fake backend of test_serve: an analysis channel, and a busy, broken or slow server -----

@contextmanager
def fake_server(translator: FakeTranslator, **settings):
    """`toolkit serve`'s app around `translator` on a free port, in a thread of this process."""
    import uvicorn

    sock = serve.bind("127.0.0.1", 0)
    app = serve.create_app(translator, SPEC, ServeConfig(**settings))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started)
        yield serve.url_of(sock)
    finally:
        if translator.release is not None:
            translator.release.set()
        server.should_exit = True
        thread.join(10)


@pytest.mark.browser
def test_reasoning_panel_shows_the_analysis_channel(browser):
    with fake_server(FakeTranslator()) as url:
        page = browser.open(url)
        expect = _expect()
        page.get_by_label(f"Text in {ZH}").fill("你好")
        assert translate(page).status == 200
        expect(page.get_by_label(f"Translation into {NAN}")).to_have_value(f"{NAN}|你好")
        expect(page.locator("#note")).to_be_hidden()  # complete, not empty: nothing to warn about
        page.get_by_text("Show reasoning").click()
        expect(page.locator("#analysis")).to_have_text("thinking about 你好")
        browser.only_own_requests(url)


def _hold_the_only_worker(url: str, fake: FakeTranslator) -> None:
    import httpx

    threading.Thread(target=lambda: httpx.post(f"{url}/translate", json={"text": "a"}, timeout=30), daemon=True).start()
    assert fake.entered.wait(10)


@pytest.mark.browser
@pytest.mark.parametrize("case, status, message", [
    ("busy", 429, "The server is busy with other translations. Wait a moment and try again."),
    ("broken", 503, "The translation model is not available right now. Try again later; the server’s log says why."),
    ("slow", 504, ("The translation took too long and was stopped. Try a shorter text, or try again when the "
                   "server is less busy.")),
    ("unreadable", 422, "The server could not accept this request.The server says: the text is empty"),
], ids=["429", "503", "504", "422"])
def test_server_errors_in_plain_words(browser, case, status, message):
    fake = FakeTranslator(fail=case == "broken")
    settings = {}
    if case in ("busy", "slow"):
        fake.release = threading.Event()
        settings = {"concurrency": 1, "queue_size": 0} if case == "busy" else {"request_timeout_s": 0.3}
    with fake_server(fake, **settings) as url:
        if case == "busy":
            _hold_the_only_worker(url, fake)
        page = browser.open(url)
        expect = _expect()
        # U+001C is whitespace to Python's str.strip() but not to JavaScript's trim(): only the server refuses it
        page.get_by_label(f"Text in {ZH}").fill("\x1c" if case == "unreadable" else "你好")
        assert translate(page).status == status
        expect(page.get_by_role("alert")).to_have_text(message)
        expect(page.get_by_role("status")).to_have_text("")
        browser.only_own_requests(url)


# ---- the glossary box: read into the API's `glossary`, its mistakes said before anything is sent -------------------

GLOSSARY_TEXT = "東西 → 物件\n\n  便宜\t俗 / 便宜  \n\n食飯->食飯|呷飯\n"
GLOSSARY_SENT = [{"source": "東西", "target": "物件"}, {"source": "便宜", "target": ["俗", "便宜"]},
                 {"source": "食飯", "target": ["食飯", "呷飯"]}]


@pytest.mark.browser
def test_glossary_is_sent_in_the_api_shape(browser):
    fake = FakeTranslator()
    with fake_server(fake) as url:
        page = browser.open(url)
        expect = _expect()
        box = page.get_by_label("Glossary (optional)")
        expect(page.locator("#glossary-hint")).to_contain_text(f"the term in {ZH}, then")
        expect(page.locator("#glossary-hint")).to_contain_text(f"translation into {NAN}; up to 4 translations")
        expect(box).to_have_attribute("aria-describedby", "glossary-hint glossary-error")
        page.get_by_label(f"Text in {ZH}").fill("這個東西很便宜。")
        box.fill(GLOSSARY_TEXT)
        response = translate(page)
        assert response.status == 200
        assert response.request.post_data_json["glossary"] == GLOSSARY_SENT
        # what the model's prompt gets: the server drops a form identical to its term
        assert dict(fake.specs[-1].glossary.entries) == {"東西": ["物件"], "便宜": ["俗"], "食飯": ["呷飯"]}
        expect(page.get_by_role("status")).to_have_text(f"Translated into {NAN}.")
        expect(page.locator("#glossary-error")).to_be_hidden()
        box.fill("  \n")  # only blank lines: no `glossary` field at all
        assert "glossary" not in translate(page).request.post_data_json
        browser.only_own_requests(url)


@pytest.mark.browser
def test_malformed_glossary_line_is_said_and_not_sent(browser):
    with fake_server(FakeTranslator()) as url:
        page = browser.open(url, width=375, height=740)  # at phone width
        expect = _expect()
        page.get_by_label(f"Text in {ZH}").fill("這個東西很便宜。")
        box = page.get_by_label("Glossary (optional)")
        box.fill("東西 → 物件\n便宜 俗\n→ 俗\n東西 →  / \na → b → c")
        page.get_by_role("button", name="Translate", exact=True).click()
        expect(page.locator("#glossary-error")).to_have_text(
            "Line 2 has no “→” or tab between the term and its translation."
            "Line 3 has no term before the “→”."
            "Line 4 has no translation after the “→”."
            "Line 5 has more than one “→” or tab: write one term per line.")
        expect(page.get_by_role("alert")).to_have_text(
            "A line of the glossary cannot be read, so nothing was sent: see under the glossary box.")
        expect(box).to_be_focused()
        expect(box).to_have_attribute("aria-invalid", "true")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        assert not any(u.endswith("/translate") for u in browser.requested)
        box.fill("東西 → 物件\n便宜\t俗")  # mended: the message goes as it is typed, and the text is sent
        expect(page.locator("#glossary-error")).to_be_hidden()
        expect(box).to_have_attribute("aria-invalid", "false")
        assert translate(page).request.post_data_json["glossary"] == [{"source": "東西", "target": "物件"},
                                                                      {"source": "便宜", "target": "俗"}]
        browser.only_own_requests(url)


@pytest.mark.browser
@pytest.mark.parametrize("glossary, status, alert, under_the_box", [
    ("東西 → 物件\n便宜 → 俗\n\n好 → 好", 413,
     "The glossary has 3 lines, and this server takes at most 2. Keep the terms this text needs.", ""),
    ("東西 → 物件\n\n便宜 → 俗/a/b/c/d\n" + "長" * 101 + " → 長", 422,
     "The server could not accept the glossary: see the lines named under the glossary box.",
     "Line 3 has 5 translations; this server takes at most 4 per term."
     "Line 4: “" + "長" * 20 + "…” is longer than 100 characters."),
], ids=["413", "422"])
def test_glossary_refused_by_the_server_in_plain_words(browser, glossary, status, alert, under_the_box):
    with fake_server(FakeTranslator(), max_glossary_entries=2) as url:
        page = browser.open(url)
        expect = _expect()
        page.get_by_label(f"Text in {ZH}").fill("這個東西很便宜。")
        page.get_by_label("Glossary (optional)").fill(glossary)
        assert translate(page).status == status  # the page leaves the limits to the server, which says why
        expect(page.get_by_role("alert")).to_have_text(alert)
        expect(page.locator("#glossary-error")).to_have_text(under_the_box)
        expect(page.get_by_label(f"Translation into {NAN}")).to_have_value("")
