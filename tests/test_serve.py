"""`toolkit serve`: the FastAPI app with a fake translator (every status code), key and bind rules, model
resolution, and the real command on the tiny model (slow) and on a tiny GGUF through llama.cpp (llama)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from toolkit import backends, serve
from toolkit.backends import Translation
from toolkit.cli import main
from toolkit.config import ServeConfig
from toolkit.errors import ConfigError
from toolkit.prompt import PromptSpec, default_spec

fastapi_testclient = pytest.importorskip("fastapi.testclient")
KEY = "k" * 24
SPEC = default_spec()
ZH, NAN = SPEC.source_name, SPEC.target_name


class FakeTranslator:
    """Answers `<target language>|<text>` and records the spec of each call; can block, fail or be down."""

    name = "fake-model"

    def __init__(self, *, fail: bool = False, healthy: bool = True) -> None:
        self.fail, self.healthy = fail, healthy
        self.specs: list[PromptSpec] = []
        self.texts: list[list[str]] = []  # each call's
        self.entered = threading.Event()
        self.release: threading.Event | None = None

    def translate(self, texts: list[str], spec: PromptSpec, *, max_new_tokens: int = 256) -> list[Translation]:
        self.specs.append(spec)
        self.texts.append(list(texts))
        self.entered.set()
        if self.release is not None:
            assert self.release.wait(10), "test never released the fake translator"
        if self.fail:
            raise RuntimeError("CUDA out of memory at /secret/path/model.gguf")
        return [Translation(text=f"{spec.target_name}|{t}", analysis=f"thinking about {t}", complete=True,
                            tokens=len(t), latency_s=0.0, raw=t) for t in texts]

    def health(self) -> bool:
        if self.healthy is None:
            raise ConnectionError("refused")
        return self.healthy


class BatchingTranslator(FakeTranslator):
    decodes_in_batches = True  # as the transformers backend


def client(translator: FakeTranslator | None = None, api_key: str | None = None, **settings):
    app = serve.create_app(translator or FakeTranslator(), SPEC, ServeConfig(**settings), api_key=api_key)
    return fastapi_testclient.TestClient(app)


# ---- happy path ---------------------------------------------------------------------------------

def test_translate_one_text():
    fake = FakeTranslator()
    with client(fake) as c:
        resp = c.post("/translate", json={"text": "你好"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["translations"] == [{"text": f"{NAN}|你好", "complete": True, "tokens": 2, "stop": "end"}]
    assert (body["model"], body["source_lang"], body["target_lang"]) == ("fake-model", ZH, NAN)
    assert set(body["timings"]) == {"queue_ms", "backend_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["backend_ms"] >= 0
    assert fake.specs == [SPEC]  # the training prompt, unchanged


def test_batch_keeps_order_and_returns_reasoning_when_asked():
    with client() as c:
        plain = c.post("/translate", json={"texts": ["一", "二", "三"]}).json()
        reasoned = c.post("/translate", json={"texts": ["一", "二"], "include_reasoning": True}).json()
    assert [t["text"] for t in plain["translations"]] == [f"{NAN}|一", f"{NAN}|二", f"{NAN}|三"]
    assert all("analysis" not in t for t in plain["translations"])
    assert [t["analysis"] for t in reasoned["translations"]] == ["thinking about 一", "thinking about 二"]


@pytest.mark.parametrize("langs, reverse", [
    ({"source_lang": "zh"}, False),
    ({"target_lang": "nan"}, False),
    ({"source_lang": "nan"}, True),
    ({"target_lang": "ZH"}, True),
    ({"source_lang": NAN.upper(), "target_lang": ZH}, True),
    ({"source_lang": ZH, "target_lang": "nan"}, False),
])
def test_languages_pick_the_direction(langs, reverse):
    fake = FakeTranslator()
    with client(fake) as c:
        body = c.post("/translate", json={"text": "食飽未", **langs}).json()
    assert fake.specs == [SPEC.reversed() if reverse else SPEC]
    assert (body["source_lang"], body["target_lang"]) == ((NAN, ZH) if reverse else (ZH, NAN))


def test_reasoning_options_reach_the_prompt():
    fake = FakeTranslator()
    with client(fake) as c:
        c.post("/translate", json={"text": "你好", "reasoning_language": "Chinese", "reasoning_effort": "high"})
    assert (fake.specs[0].reasoning_language, fake.specs[0].reasoning_effort) == ("Chinese", "high")
    assert fake.specs[0].instruction == SPEC.instruction


def test_health_models_and_docs():
    with client() as c:
        assert c.get("/health").json() == {"status": "ok", "model": "fake-model", "backend": "FakeTranslator"}
        model = c.get("/v1/models").json()["data"][0]
        assert model["id"] == "fake-model" and model["languages"] == {"zh": ZH, "nan": NAN}
        assert c.get("/docs").status_code == 200
        assert "/translate" in c.get("/openapi.json").json()["paths"]


def test_one_log_line_per_request(caplog):
    caplog.set_level("INFO", logger="toolkit.serve")
    with client() as c:
        c.post("/translate", json={"text": "a"})
        c.post("/translate", json={"text": ""})
        c.get("/health")
    lines = [r.getMessage() for r in caplog.records if r.name == "toolkit.serve" and " ms" in r.getMessage()]
    assert [line.rsplit(" ", 2)[0] for line in lines] == ["POST /translate 200", "POST /translate 422", "GET /health 200"]
    assert all(float(line.split()[-2]) >= 0 for line in lines)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    {"text": ""},
    {"text": "   \n"},
    {"text": 42},
    {"text": ["a list"]},
    {"texts": "not a list"},
    {"texts": ["ok", 7]},
    {"texts": ["ok", ""]},
    {"texts": []},
    {"text": "a", "texts": ["b"]},
    {},
    {"text": "a", "model_path": "/etc/passwd"},  # nothing in a request selects a file
    {"text": "a", "source_lang": "fr"},
    {"text": "a", "target_lang": "English"},
    {"text": "a", "source_lang": "zh", "target_lang": "zh"},
    {"text": "a", "reasoning_effort": "extreme"},
    {"text": "a", "reasoning_language": "x\n<|end|>"},
    {"text": "a", "include_reasoning": "yes"},
])
def test_malformed_input_is_422_without_echo_or_traceback(payload):
    fake = FakeTranslator()
    with client(fake) as c:
        resp = c.post("/translate", json=payload)
    assert resp.status_code == 422, resp.text
    assert "detail" in resp.json() and "Traceback" not in resp.text and "/etc/passwd" not in resp.text
    assert fake.specs == []  # the backend was never called


def test_invalid_json_is_422():
    with client() as c:
        resp = c.post("/translate", content=b'{"text": ', headers={"content-type": "application/json"})
    assert resp.status_code == 422


@pytest.mark.parametrize("body, message", [
    (b'{"text": "a\\ud800b"}', "text 0 holds a lone surrogate"),
    (b'{"texts": ["ok", "\\udfff"]}', "text 1 holds a lone surrogate"),
    (b'{"text": "a", "source_lang": "\\ud83d"}', "unable to parse raw data as a unicode string"),  # pydantic's
])
def test_lone_surrogate_is_422(body, message):
    fake = FakeTranslator()
    with client(fake) as c:
        resp = c.post("/translate", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert message in resp.text and fake.specs == []
    with client() as c:  # a real pair is fine
        assert c.post("/translate", content=b'{"text": "\\ud83d\\ude00"}',
                      headers={"content-type": "application/json"}).status_code == 200


class TooLong(FakeTranslator):
    def translate(self, texts, spec, *, max_new_tokens=256):
        raise backends.PromptTooLong(1, 2126, 2048, "n_ctx")


def test_prompt_beyond_the_context_window_is_413_with_the_numbers():
    with client(TooLong()) as c:
        resp = c.post("/translate", json={"texts": ["a", "字" * 2000]})
    assert resp.status_code == 413
    assert resp.json()["detail"] == ("text 1: its prompt is 2,126 tokens, and the context window (n_ctx) holds 2,048 "
                                     "tokens, the reply included: shorten the text, or raise n_ctx.")


@pytest.mark.parametrize("payload", [{"text": "字" * 11}, {"texts": ["a"] * 4}])
def test_too_long_or_too_many_is_413(payload):
    with client(max_chars=10, max_texts=3) as c:
        resp = c.post("/translate", json=payload)
        assert resp.status_code == 413
        assert c.post("/translate", json={"texts": ["字" * 10] * 3}).status_code == 200  # at the limits


def test_huge_body_is_refused_before_parsing():
    with client(max_chars=10, max_texts=3) as c:
        resp = c.post("/translate", content=b'{"text": "' + b"a" * 1_000_000 + b'"}',
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413


def test_backend_error_is_503_without_details():
    with client(FakeTranslator(fail=True)) as c:
        resp = c.post("/translate", json={"text": "你好"})
    assert resp.status_code == 503
    assert "secret" not in resp.text and "Traceback" not in resp.text and "CUDA" not in resp.text


@pytest.mark.parametrize("healthy", [False, None])  # None: health() raises
def test_health_is_503_when_the_backend_is_down(healthy):
    with client(FakeTranslator(healthy=healthy)) as c:
        resp = c.get("/health")
    assert resp.status_code == 503 and resp.json()["status"] == "unavailable"


def _start(c, results: list, payload=None) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(c.post("/translate", json=payload or {"text": "a"})))
    thread.start()
    return thread


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_full_queue_is_429_and_recovers():
    fake = FakeTranslator()
    fake.release = threading.Event()
    results: list = []
    with client(fake, concurrency=1, queue_size=1) as c:
        gate = c.app.state.gate
        running = _start(c, results)
        assert fake.entered.wait(10)  # one call holds the only worker
        waiting = _start(c, results)
        _wait_for(lambda: gate.admitted == 2)  # one waits in the queue
        full = c.post("/translate", json={"text": "b"})
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        fake.release.set()
        running.join(10)
        waiting.join(10)
        assert [r.status_code for r in results] == [200, 200]
        _wait_for(lambda: gate.admitted == 0)
        assert c.post("/translate", json={"text": "c"}).status_code == 200
    assert len(fake.specs) == 3  # the refused request never reached the backend


@pytest.mark.parametrize("batching", [False, True])
def test_timeout_is_504_and_keeps_the_slot_until_the_backend_returns(batching):
    fake = BatchingTranslator() if batching else FakeTranslator()  # a worker thread's call / a Batcher's
    fake.release = threading.Event()
    with client(fake, concurrency=1, queue_size=0, request_timeout_s=0.2) as c:
        gate = c.app.state.gate
        assert c.post("/translate", json={"text": "slow"}).status_code == 504
        # The backend still runs: a second call must not start beside it.
        assert gate.admitted == 1
        assert c.post("/translate", json={"text": "next"}).status_code == 429
        fake.release.set()
        _wait_for(lambda: gate.admitted == 0)
        assert c.post("/translate", json={"text": "next"}).status_code == 200


def test_concurrent_requests_are_decoded_as_one_call_each_with_its_own_answer():
    fake = BatchingTranslator()
    fake.release = threading.Event()
    results: list = []
    payloads = [{"text": "一"}, {"texts": ["二", "三"]}, {"text": "四"}]
    with client(fake) as c:  # batch_requests is on by default, with no window
        assert c.app.state.batcher is not None
        first = _start(c, results, {"text": "零"})
        assert fake.entered.wait(10)  # a call runs; the next requests wait behind it, together
        threads = [_start(c, results, payload) for payload in payloads]
        _wait_for(lambda: c.app.state.gate.admitted == 4)
        fake.release.set()
        for thread in [first, *threads]:
            thread.join(10)
        reverse = c.post("/translate", json={"text": "五", "source_lang": NAN, "target_lang": ZH})
    assert sorted(r.status_code for r in results) == [200] * 4 and reverse.status_code == 200
    answers = sorted([t["text"] for t in r.json()["translations"]] for r in results)
    assert answers == [[f"{NAN}|一"], [f"{NAN}|二", f"{NAN}|三"], [f"{NAN}|四"], [f"{NAN}|零"]]
    assert fake.texts[0] == ["零"] and sorted(fake.texts[1]) == ["一", "三", "二", "四"]  # one call for the three
    assert fake.texts[2] == ["五"] and reverse.json()["translations"][0]["text"] == f"{ZH}|五"


def test_batching_is_off_for_backends_that_do_not_batch_and_when_turned_off():
    with client(FakeTranslator(), batch_window_ms=400) as c:
        assert c.app.state.batcher is None
    with client(BatchingTranslator(), batch_requests=False) as c:
        assert c.app.state.batcher is None
        assert c.post("/translate", json={"text": "a"}).status_code == 200



# ---- API key ------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"X-API-Key": "wrong"}, 401),
    ({"Authorization": f"Basic {KEY}"}, 401),
    ({"X-API-Key": KEY}, 200),
    ({"Authorization": f"Bearer {KEY}"}, 200),
])
def test_api_key_on(headers, status):
    with client(api_key=KEY) as c:
        assert c.post("/translate", json={"text": "a"}, headers=headers).status_code == status
        assert c.get("/v1/models", headers=headers).status_code == status
        assert c.get("/health").status_code == 200  # probes need no key


@pytest.mark.parametrize("body", [b'{"text": ', b'{"text": 42}', b'[]', b'not json'])
def test_api_key_is_checked_before_the_body(body):
    json_type = {"content-type": "application/json"}
    with client(api_key=KEY) as c:
        assert c.post("/translate", content=body, headers=json_type).status_code == 401
        assert c.post("/translate", content=body, headers={**json_type, "X-API-Key": KEY}).status_code == 422


def test_api_key_off_ignores_headers():
    with client() as c:
        assert c.post("/translate", json={"text": "a"}, headers={"X-API-Key": "anything"}).status_code == 200


def test_non_localhost_bind_needs_a_key(monkeypatch):
    monkeypatch.delenv("TOOLKIT_API_KEY", raising=False)
    assert serve.api_key_for(ServeConfig(host="127.0.0.1")) is None
    assert serve.api_key_for(ServeConfig(host="::1")) is None
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ConfigError, match="TOOLKIT_API_KEY"):
            serve.api_key_for(ServeConfig(host=host))
    monkeypatch.setenv("MY_KEY", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        serve.api_key_for(ServeConfig(host="0.0.0.0", api_key_env="MY_KEY"))
    monkeypatch.setenv("MY_KEY", KEY)
    assert serve.api_key_for(ServeConfig(host="0.0.0.0", api_key_env="MY_KEY")) == KEY


@pytest.mark.parametrize("key, message", [
    (" " * 16, "at least 16 characters besides spaces, found 0"),
    ("\t" * 20, "at least 16 characters besides spaces, found 0"),
    (" " * 10 + "abcdefghij", "at least 16 characters besides spaces, found 10"),
    (KEY + " ", "without leading or trailing spaces"),
    ("ключ" * 5, "printable ASCII"),
])
def test_key_that_no_client_could_send_or_guessable_is_refused(monkeypatch, key, message):
    monkeypatch.setenv("MY_KEY", key)
    with pytest.raises(ConfigError, match=message):
        serve.api_key_for(ServeConfig(host="0.0.0.0", api_key_env="MY_KEY"))


def test_cli_refuses_public_bind_without_key_before_loading(monkeypatch, tmp_path):
    monkeypatch.delenv("TOOLKIT_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "missing.gguf"), "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "error: binding to 0.0.0.0" in result.output and "missing.gguf" not in result.output


def test_cli_rejects_bad_limits():
    result = CliRunner().invoke(main, ["serve", "x.gguf", "--concurrency", "0", "--port", "70000"])
    assert result.exit_code == 2
    assert "serve.concurrency" in result.output and "serve.port" in result.output


# ---- model resolution and binding ---------------------------------------------------------------

def test_taken_port_is_one_clear_error():
    taken = serve.bind("127.0.0.1", 0)
    taken.listen()
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            serve.bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_ollama_backend_up_then_down():
    """The real Ollama translator against the stand-in server: it answers, then the server goes away: 503."""
    from ollama_standin import StandinOllama, full_name

    from toolkit import backends

    with StandinOllama() as ollama:
        ollama.models[full_name("taigi")] = {"files": {"model.gguf": "sha256:0"}, "size": 4, "digest": "0",
                                             "family": "gpt-oss", "modified_at": "2026-01-01T00:00:00Z"}
        translator = backends.load_translator("ollama", "taigi", host=ollama.url)
        app = serve.create_app(translator, SPEC, ServeConfig(backend="ollama"))
        with fastapi_testclient.TestClient(app) as c:
            body = c.post("/translate", json={"text": "食飽未？", "source_lang": "nan", "include_reasoning": True}).json()
            assert body["translations"][0]["text"] == "食飽未？"  # the stand-in echoes the sentence
            assert body["translations"][0]["analysis"] == "The user wants this sentence translated."
            assert ollama.generate_requests[0]["prompt"] == SPEC.reversed().harmony_prompt("食飽未？")
            assert c.get("/health").status_code == 200
    with fastapi_testclient.TestClient(app) as c:  # the stand-in has stopped
        assert c.get("/health").status_code == 503
        resp = c.post("/translate", json={"text": "你好"})
        assert resp.status_code == 503 and "127.0.0.1" not in resp.text


# ---- the real command ---------------------------------------------------------------------------

def _serve_process(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", *args, "--port", "0"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    url = proc.stdout.readline().strip()  # printed once the server listens
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"no URL printed: {url!r}\n{proc.stderr.read()[-2000:]}")
    return proc, url


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(2)  # Ctrl-C: uvicorn shuts down cleanly
    _, err = proc.communicate(timeout=30)
    return err


def _post(url: str, payload: dict, key: str | None = None) -> tuple[int, dict]:
    import httpx

    headers = {"X-API-Key": key} if key else {}
    resp = httpx.post(f"{url}/translate", json=payload, headers=headers, timeout=60)
    return resp.status_code, resp.json()


@pytest.mark.slow
def test_command_serves_the_tiny_model(tiny_model):
    proc, url = _serve_process(str(tiny_model), "--max-new-tokens", "8", env={"TOOLKIT_API_KEY": KEY})
    try:
        status, body = _post(url, {"texts": ["你好", "多謝"], "source_lang": "nan"}, key=KEY)
        assert status == 200 and len(body["translations"]) == 2
        assert body["backend"] == "transformers" and body["source_lang"] == SPEC.target_name
        assert all(t["tokens"] <= 8 for t in body["translations"])
        assert _post(url, {"text": "你好"})[0] == 401
    finally:
        err = _stop(proc)
    assert proc.returncode == 0
    lines = [line for line in err.splitlines() if "toolkit.serve" in line and "/translate" in line]
    assert len(lines) == 2 and " 200 " in lines[0] and " 401 " in lines[1] and lines[0].endswith(" ms")


@pytest.mark.llama
def test_command_serves_a_tiny_gguf(tiny_gguf):
    proc, url = _serve_process(str(tiny_gguf), "--max-new-tokens", "8", "--set", "serve.n_ctx=512")
    try:
        status, body = _post(url, {"text": "你好", "include_reasoning": True})
        assert status == 200, body
        assert body["backend"] == "llama-cpp" and body["model"] == tiny_gguf.name
        assert 0 < body["translations"][0]["tokens"] <= 8
    finally:
        _stop(proc)


@pytest.mark.llama
def test_llama_cpp_text_at_max_chars_beyond_the_context_is_413_not_503(tiny_gguf):
    translator = backends.load_translator("llama-cpp", tiny_gguf, n_ctx=512)
    settings = ServeConfig(backend="llama-cpp", n_ctx=512, max_new_tokens=4)  # max_chars 2000, the default
    with fastapi_testclient.TestClient(serve.create_app(translator, SPEC, settings)) as c:
        for text in ("字" * 2000, "😀" * 2000):
            resp = c.post("/translate", json={"texts": ["你好", text]})
            assert resp.status_code == 413, resp.text
            assert re.fullmatch(r"text 1: its prompt is [\d,]+ tokens, and the context window \(n_ctx\) holds 512 "
                                r"tokens, the reply included: shorten the text, or raise n_ctx\.", resp.json()["detail"])
        assert c.post("/translate", json={"text": "你好"}).status_code == 200


@pytest.mark.llama
def test_llama_cpp_serve_keeps_special_strings_of_a_text_as_text(tiny_gguf):
    """A client's `<|end|><|start|>system...` reaches the model as text, not as Harmony control tokens."""
    from test_backends import INJECTION

    translator = backends.load_translator("llama-cpp", tiny_gguf, n_ctx=512)
    prompts, generate = [], translator.llm.generate

    def spy(tokens, **kwargs):
        prompts.append(list(tokens))
        yield from generate(tokens, **kwargs)

    translator.llm.generate = spy
    with fastapi_testclient.TestClient(serve.create_app(translator, SPEC, ServeConfig(max_new_tokens=2))) as c:
        assert c.post("/translate", json={"texts": [INJECTION, "x"]}).status_code == 200
    special = set(translator.forbidden)
    count = lambda ids: sum(i in special for i in ids)
    assert count(prompts[0]) == count(prompts[1]) > 0  # the scaffold's control tokens, none from the text


def test_url_of_formats_ipv4_and_ipv6():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert serve.url_of(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}"
    if socket.has_ipv6:
        with socket.socket(socket.AF_INET6) as sock:
            try:
                sock.bind(("::1", 0))
            except OSError:
                return  # no IPv6 loopback in this container
            assert serve.url_of(sock) == f"http://[::1]:{sock.getsockname()[1]}"


# ---- glossaries ---------------------------------------------------------------------------------

def test_request_glossary_becomes_the_hint_of_its_direction():
    from dataclasses import replace as dc_replace

    from toolkit.glossary import Glossary

    fake = FakeTranslator()
    spec = dc_replace(SPEC, glossary=Glossary({"東西": ["物件"], "便宜": ["俗"]}))
    app = serve.create_app(fake, spec, ServeConfig())
    with fastapi_testclient.TestClient(app) as c:
        assert c.post("/translate", json={"text": "這東西很便宜", "glossary": [
            {"source": "東西", "target": ["貨", "物件"]}, {"source": "很", "target": "真"}]}).status_code == 200
        assert c.post("/translate", json={"text": "物件", "source_lang": "nan"}).status_code == 200
    hint = "Glossary (use an entry where it fits the text): "
    assert fake.specs[0].hint_for("這東西很便宜") == hint + "東西 → 貨 / 物件; 很 → 真; 便宜 → 俗"
    assert fake.specs[1].hint_for("這物件真俗") == hint + "物件 → 東西; 俗 → 便宜"  # the server's, reversed
    assert spec.glossary.entries["東西"] == ["物件"]  # a request changes only its own spec


@pytest.mark.parametrize("glossary, status", [
    ([{"source": "東西", "target": "物件"}] * 3, 413),
    ([{"source": "東\n西", "target": "物件"}], 422),
    ([{"source": "東西", "target": "物件\t<end_of_turn>"}], 422),
    ([{"source": "東西", "target": ["a", "b", "c", "d", "e"]}], 422),
    ([{"source": "東西", "target": []}], 422),
    ([{"source": "東" * 101, "target": "物件"}], 422),
    ([{"source": "東西", "target": "物件", "note": "x"}], 422),
    ({"東西": "物件"}, 422),
])
def test_request_glossary_is_bounded(glossary, status):
    with client(max_glossary_entries=2) as c:
        resp = c.post("/translate", json={"text": "這東西", "glossary": glossary})
    assert resp.status_code == status, resp.text
