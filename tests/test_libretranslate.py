"""`toolkit serve` speaking LibreTranslate's API: the app with the fake translator (shapes, codes, errors, keys),
then the real PyPI clients (libretranslatepy, deep-translator) against `toolkit serve` on the tiny GGUF (llama)."""

from __future__ import annotations

import json
import urllib.error

import pytest
from test_serve import KEY, NAN, SPEC, ZH, FakeTranslator, TooLong, _serve_process, _stop, client

from toolkit import libretranslate
from toolkit.config import ConfigError, ServeConfig, build

FORM = {"content-type": "application/x-www-form-urlencoded"}


def test_json_string_and_list_in_its_shape():
    fake = FakeTranslator()
    with client(fake) as c:
        one = c.post("/translate", json={"q": "你好", "source": "zh", "target": "nan", "format": "text"})
        many = c.post("/translate", json={"q": ["一", "二"], "source": "nan-Hant", "target": "zh-Hant"})
    assert one.status_code == 200 and one.json() == {"translatedText": f"{NAN}|你好"}
    assert many.json() == {"translatedText": [f"{ZH}|一", f"{ZH}|二"]}
    assert fake.specs == [SPEC, SPEC.reversed()]


def test_form_body_and_query_string():
    """libretranslatepy sends a form body; deep-translator puts the fields in the query string, body empty."""
    fake = FakeTranslator()
    with client(fake) as c:
        form = c.post("/translate", content="q=%E4%BD%A0%E5%A5%BD&source=zh&target=nan", headers=FORM)
        query = c.post("/translate", params={"q": "食飽未", "source": "nan", "target": "zh", "format": "text"})
    assert form.json() == {"translatedText": f"{NAN}|你好"}
    assert query.json() == {"translatedText": f"{ZH}|食飽未"}


@pytest.mark.parametrize("target, reverse", [("nan", False), ("zh", True), ("NAN-HANT", False)])
def test_auto_source_is_the_other_language(target, reverse):
    fake = FakeTranslator()
    with client(fake) as c:
        assert c.post("/translate", json={"q": "a", "source": "auto", "target": target}).status_code == 200
    assert fake.specs == [SPEC.reversed() if reverse else SPEC]


def test_our_own_request_is_untouched_even_with_a_q_inside():
    with client() as c:
        body = c.post("/translate", json={"text": '"q"', "source_lang": "zh"}).json()
    assert body["translations"][0]["text"] == f'{NAN}|"q"'


def test_languages_and_configured_codes():
    with client() as c:
        assert c.get("/languages").json() == [{"code": "zh", "name": ZH, "targets": ["nan"]},
                                              {"code": "nan", "name": NAN, "targets": ["zh"]}]
    fake = FakeTranslator()
    with client(fake, source_codes=["cmn"], target_codes=["nan-TW", "tw"]) as c:
        assert [lang["code"] for lang in c.get("/languages").json()] == ["cmn", "nan-TW"]
        assert c.post("/translate", json={"q": "a", "source": "tw", "target": "cmn"}).status_code == 200
        gone = c.post("/translate", json={"q": "a", "source": "zh", "target": "nan"})
    assert gone.status_code == 400 and "between cmn" in gone.json()["error"]
    assert fake.specs == [SPEC.reversed()]


def test_configured_codes_are_checked():
    assert build("serve", None, ["serve.source_codes=['zh']", "serve.target_codes=['nan']"]).source_codes == ["zh"]
    with pytest.raises(ConfigError, match="share 'zh'"):
        build("serve", None, ["serve.source_codes=['zh']", "serve.target_codes=['ZH']"])
    with pytest.raises(ConfigError, match="found 'zh Hant'"):
        build("serve", None, ["serve.source_codes=['zh Hant']"])
    assert libretranslate.codes_for(ServeConfig(), ("cmn", "nan")) == (["cmn"], ["nan", "nan-Hant"])


@pytest.mark.parametrize("payload, message", [
    ({"source": "zh", "target": "nan"}, "missing q parameter"),
    ({"q": "", "source": "zh", "target": "nan"}, "missing q parameter"),
    ({"q": ["a", 3], "source": "zh", "target": "nan"}, "expected a string or a list of strings"),
    ({"q": ["a", " "], "source": "zh", "target": "nan"}, "text 1 is empty"),
    ({"q": "a\ud800", "source": "zh", "target": "nan"}, "lone surrogate"),
    ({"q": "a", "target": "nan"}, "missing source parameter"),
    ({"q": "a", "source": "zh"}, "missing target parameter"),
    ({"q": "a", "source": "en", "target": "nan"}, "source 'en' is not supported"),
    ({"q": "a", "source": "zh", "target": "zh-Hant"}, "source and target are both 'zh'"),
    ({"q": "<p>a</p>", "source": "zh", "target": "nan", "format": "html"}, "format 'html' is not supported"),
    ({"q": "字" * 6, "source": "zh", "target": "nan"}, "request (6 characters) exceeds text limit (5)"),
    ({"q": ["字" * 3] * 2, "source": "zh", "target": "nan"}, "request (6 characters) exceeds text limit (5)"),
    ({"q": ["a"] * 4, "source": "zh", "target": "nan"}, "request (4 texts) exceeds batch limit (3)"),
])
def test_bad_request_is_400_in_its_shape(payload, message):
    fake = FakeTranslator()
    with client(fake, max_chars=5, max_texts=3) as c:
        resp = c.post("/translate", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json() == {"error": resp.json()["error"]} and message in resp.json()["error"]
    assert fake.specs == []


@pytest.mark.parametrize("body, message", [
    ("q=a&q=b&source=zh&target=nan", "'q' given 2 times"),
    ("q=%FF&source=zh&target=nan", "not valid percent-encoded UTF-8"),
])
def test_bad_form_is_400(body, message):
    with client() as c:
        resp = c.post("/translate", content=body, headers=FORM)
    assert resp.status_code == 400 and message in resp.json()["error"]


@pytest.mark.parametrize("where, status", [
    ({}, 403),
    ({"api_key": "wrong"}, 403),
    ({"api_key": KEY}, 200),
    ({"headers": {"X-API-Key": KEY}}, 200),
    ({"headers": {"Authorization": f"Bearer {KEY}"}}, 200),
])
def test_key_in_the_body_or_a_header(where, status):
    headers = where.pop("headers", {})
    with client(api_key=KEY) as c:
        as_json = c.post("/translate", json={"q": "a", "source": "zh", "target": "nan", **where}, headers=headers)
        as_form = c.post("/translate", data={"q": "a", "source": "zh", "target": "nan", **where},
                         headers=headers)
        assert c.get("/languages").status_code == 200  # LibreTranslate lists its languages to anyone
    assert as_json.status_code == as_form.status_code == status
    if status == 403:
        assert as_json.json() == as_form.json() == {"error": "Invalid API key"}


def test_key_is_checked_before_the_body():
    with client(api_key=KEY) as c:
        assert c.post("/translate", json={"q": 7, "format": "html"}).status_code == 403
        assert c.post("/translate", json={"q": 7, "api_key": KEY}).status_code == 400


def test_backend_failures_in_its_codes():
    body = {"q": ["a", "字" * 9], "source": "zh", "target": "nan"}
    with client(TooLong()) as c:
        resp = c.post("/translate", json=body)
    assert resp.status_code == 400 and "the context window (n_ctx) holds 2,048 tokens" in resp.json()["error"]
    with client(FakeTranslator(fail=True)) as c:
        resp = c.post("/translate", json=body)
    assert resp.status_code == 500 and "CUDA" not in resp.text and "error" in resp.json()


def test_full_queue_is_429_in_its_shape():
    import threading

    fake = FakeTranslator()
    fake.release = threading.Event()
    with client(fake, concurrency=1, queue_size=0) as c:
        first = threading.Thread(target=lambda: c.post("/translate", json={"text": "a"}))
        first.start()
        assert fake.entered.wait(10)
        busy = c.post("/translate", json={"q": "b", "source": "zh", "target": "nan"})
        fake.release.set()
        first.join(10)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]


# ---- the real clients against the real command ---------------------------------------------------

@pytest.mark.llama
def test_real_clients_against_toolkit_serve(tiny_gguf):
    from deep_translator import LibreTranslator
    from deep_translator.exceptions import AuthorizationException, ServerException
    from libretranslatepy import LibreTranslateAPI

    proc, url = _serve_process(str(tiny_gguf), "--max-new-tokens", "4", "--max-chars", "50",
                               "--set", "serve.n_ctx=512", env={"TOOLKIT_API_KEY": KEY})
    try:
        lt = LibreTranslateAPI(url, api_key=KEY)
        assert [lang["code"] for lang in lt.languages()] == ["zh", "nan"]
        assert isinstance(lt.translate("你好", "zh", "nan"), str)
        with pytest.raises(urllib.error.HTTPError) as wrong:
            LibreTranslateAPI(url, api_key="wrong").translate("你好", "zh", "nan")
        assert wrong.value.code == 403 and json.loads(wrong.value.read()) == {"error": "Invalid API key"}
        with pytest.raises(urllib.error.HTTPError) as long:
            lt.translate("字" * 51, "zh", "nan")
        assert long.value.code == 400 and "exceeds text limit (50)" in json.loads(long.value.read())["error"]

        # deep-translator's own language table lacks Taigi: "auto" into zh is Taigi -> Mandarin.
        dt = LibreTranslator(source="auto", target="zh", api_key=KEY, custom_url=url + "/")
        batch = dt.translate_batch(["食飽未", "多謝"])
        assert len(batch) == 2 and all(isinstance(t, str) for t in batch)
        with pytest.raises(AuthorizationException):
            LibreTranslator(source="auto", target="zh", api_key="wrong", custom_url=url + "/").translate("你好")
        with pytest.raises(ServerException, match="ERR_BAD_REQUEST"):  # its name for 400
            dt.translate("字" * 51)

        import httpx  # LibreTranslate's JSON list, as Mastodon and browser extensions send it

        resp = httpx.post(f"{url}/translate", json={"q": ["你好", "多謝"], "source": "auto", "target": "nan",
                                                    "api_key": KEY}, timeout=60)
        assert resp.status_code == 200 and len(resp.json()["translatedText"]) == 2
    finally:
        err = _stop(proc)
    assert proc.returncode == 0
    statuses = [line.split()[-3] for line in err.splitlines() if "toolkit.serve" in line and "/translate" in line]
    assert statuses == ["200", "403", "400", "200", "200", "403", "400", "200"]
