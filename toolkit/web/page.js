// toolkit serve's translation page: sends the text to POST /translate (the same server) and shows the answer.
// No framework and nothing from elsewhere; text reaches the page through textContent/value only, never as HTML.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const form = $("form"), source = $("source"), target = $("target"), count = $("count");
  const keyBox = $("key-box"), keyInput = $("key"), remember = $("remember");
  const effort = $("effort"), submit = $("translate"), errorBox = $("error"), status = $("status");
  const note = $("note"), analysis = $("analysis"), meta = $("meta");
  const STORE = "toolkit-serve-api-key";
  const [first, second] = config.languages;
  const directions = [{ source: first, target: second }, { source: second, target: first }];
  const numbers = new Intl.NumberFormat("en");
  let busy = false;

  // ---- set-up from the server's config --------------------------------------------------------------
  $("model").textContent = `Model: ${config.model} (${config.backend})`;
  document.title = `Translate: ${first.name} ↔ ${second.name}`;
  $("forward-label").textContent = `${first.name} → ${second.name}`;
  $("reverse-label").textContent = `${second.name} → ${first.name}`;
  $("effort-default").textContent = `model default (${config.default_effort})`;

  function direction() {
    return directions[document.querySelector('input[name="direction"]:checked').value];
  }

  function showDirection() {
    const { source: from, target: to } = direction();
    $("source-label").textContent = `Text in ${from.name}`;
    $("target-label").textContent = `Translation into ${to.name}`;
    source.lang = from.code;
    target.lang = to.code;
  }

  for (const radio of document.querySelectorAll('input[name="direction"]')) {
    radio.addEventListener("change", () => {
      showDirection();
      clearResult();
    });
  }

  // ---- the API key: kept in this browser only ---------------------------------------------------------
  function storedKey() {
    return sessionStorage.getItem(STORE) || localStorage.getItem(STORE) || "";
  }

  function storeKey() {
    sessionStorage.removeItem(STORE);
    localStorage.removeItem(STORE);
    const key = keyInput.value.trim();
    if (key) (remember.checked ? localStorage : sessionStorage).setItem(STORE, key);
  }

  function showKeyBox() {
    keyBox.hidden = false;
  }

  keyInput.value = storedKey();
  remember.checked = Boolean(localStorage.getItem(STORE));
  if (config.key_required || keyInput.value) showKeyBox();
  keyInput.addEventListener("input", storeKey);
  remember.addEventListener("change", storeKey);
  $("forget").addEventListener("click", () => {
    keyInput.value = "";
    remember.checked = false;
    storeKey();
    say("The key is forgotten.");
    keyInput.focus();
  });

  // ---- the text and its length ---------------------------------------------------------------------
  function characters(text) {
    return [...text].length; // code points, as the server counts
  }

  function showCount() {
    const n = characters(source.value);
    const over = n > config.max_chars;
    count.textContent = `${numbers.format(n)} / ${numbers.format(config.max_chars)} characters` +
      (over ? ": too long for this server, shorten it" : "");
    count.classList.toggle("over", over);
    source.setAttribute("aria-invalid", String(over));
  }

  source.addEventListener("input", showCount);
  source.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  // ---- messages ------------------------------------------------------------------------------------
  function say(text) {
    status.textContent = text;
  }

  function showError(headline, detail) {
    errorBox.replaceChildren();
    for (const line of [headline, detail]) {
      if (!line) continue;
      const p = document.createElement("p");
      p.textContent = line;
      errorBox.append(p);
    }
    errorBox.hidden = false;
    say("");
  }

  function clearResult() {
    errorBox.hidden = true;
    errorBox.replaceChildren();
    note.hidden = true;
    target.value = "";
    meta.textContent = "";
    analysis.textContent = "Translate a text to see the model’s reasoning.";
  }

  function detailOf(body) {
    const detail = body && body.detail;
    if (typeof detail === "string") return detail;
    // A validation error: pydantic's prefix off, and the one text the page sends is "the text", not "text 0".
    if (Array.isArray(detail)) {
      return detail.map((e) => String(e.msg || "").replace(/^Value error, /, "").replace(/\btext 0\b/, "the text"))
        .join("; ");
    }
    return "";
  }

  // Plain words for each status POST /translate answers with.
  function explain(statusCode, body, text) {
    const detail = detailOf(body);
    switch (statusCode) {
      case 401:
        showKeyBox();
        keyInput.focus();
        return keyInput.value
          ? ["The server refused this API key. Check it and translate again."]
          : ["This server needs an API key. Enter it in the “API key” box and translate again."];
      case 413: {
        const n = characters(text);
        if (n > config.max_chars) {
          return [`The text is too long: ${numbers.format(n)} characters, and this server takes at most ` +
            `${numbers.format(config.max_chars)}. Shorten it or translate it in parts.`];
        }
        return ["The text is too long for the model’s context window. Shorten it or translate it in parts.",
          detail && `The server says: ${detail}`];
      }
      case 422:
        return ["The server could not accept this request.", detail && `The server says: ${detail}`];
      case 429:
        return ["The server is busy with other translations. Wait a moment and try again."];
      case 503:
        return ["The translation model is not available right now. Try again later; the server’s log says why."];
      case 504:
        return ["The translation took too long and was stopped. Try a shorter text, or try again when the " +
          "server is less busy."];
      default:
        return [`Something went wrong on the server (HTTP ${statusCode}). Try again; the server’s log has the ` +
          "details."];
    }
  }

  function duration(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  }

  function showResult(body) {
    const result = body.translations[0];
    target.value = result.text;
    const notes = [];
    if (!result.text) notes.push("The model gave no translation for this text.");
    if (!result.complete) {
      notes.push("The model stopped at its token limit before finishing, so the translation may be cut short.");
    }
    note.textContent = notes.join(" ");
    note.hidden = notes.length === 0;
    analysis.textContent = result.analysis || "The model gave no reasoning for this text.";
    const t = body.timings;
    meta.textContent = `${body.model} (${body.backend}) · ${numbers.format(result.tokens)} tokens · ` +
      `${duration(t.total_ms)} in all (waiting ${duration(t.queue_ms)}, model ${duration(t.backend_ms)})`;
    say(`Translated into ${body.target_lang}.`);
  }

  // ---- translating ---------------------------------------------------------------------------------
  function requestBody(text) {
    const { source: from, target: to } = direction();
    const body = { text, source_lang: from.code, target_lang: to.code, include_reasoning: true };
    if (effort.value) body.reasoning_effort = effort.value;
    // GLOSSARY (issue 19): once POST /translate takes a per-request `glossary`, read the glossary box
    // (index.html marks its place) into body.glossary here, in the shape the API documents.
    return body;
  }

  function setBusy(on) {
    busy = on;
    submit.setAttribute("aria-disabled", String(on));
    form.setAttribute("aria-busy", String(on));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (busy) return;
    const text = source.value;
    clearResult();
    if (!text.trim()) {
      showError("Type or paste a text to translate first.");
      source.focus();
      return;
    }
    const headers = { "Content-Type": "application/json" };
    const key = keyInput.value.trim();
    if (key) headers["X-API-Key"] = key;
    setBusy(true);
    say("Translating…");
    try {
      let response;
      try {
        response = await fetch("translate", {
          method: "POST", headers, body: JSON.stringify(requestBody(text)), cache: "no-store",
          credentials: "omit", referrerPolicy: "no-referrer",
        });
      } catch {
        showError("Could not reach the server. Check that `toolkit serve` is still running, then try again.");
        return;
      }
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = null;
      }
      if (response.ok && body && Array.isArray(body.translations) && body.translations.length) {
        showResult(body);
      } else {
        const [headline, detail] = explain(response.ok ? 500 : response.status, body, text);
        showError(headline, detail);
      }
    } finally {
      setBusy(false);
    }
  });

  // ---- copying -------------------------------------------------------------------------------------
  $("copy").addEventListener("click", async () => {
    if (!target.value) {
      say("Nothing to copy yet: translate a text first.");
      return;
    }
    try {
      await navigator.clipboard.writeText(target.value);
    } catch {
      // Not a secure context (plain http to another machine): copy through the selection instead.
      target.select();
      document.execCommand("copy");
    }
    say("Translation copied.");
  });

  showDirection();
  showCount();
})();
