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
  const glossaryBox = $("glossary"), glossaryError = $("glossary-error");
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
  $("glossary-max").textContent = numbers.format(config.glossary.max_entries);
  $("glossary-forms").textContent = numbers.format(config.glossary.max_forms);

  function direction() {
    return directions[document.querySelector('input[name="direction"]:checked').value];
  }

  function showDirection() {
    const { source: from, target: to } = direction();
    $("source-label").textContent = `Text in ${from.name}`;
    $("target-label").textContent = `Translation into ${to.name}`;
    source.lang = from.code;
    target.lang = to.code;
    $("glossary-from").textContent = from.name;
    $("glossary-to").textContent = to.name;
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
  for (const box of [source, glossaryBox]) {
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
  }

  // ---- the glossary: one term per line, read into POST /translate's `glossary` ----------------------------
  const SEPARATOR = /→|->|\t/;
  const FORMS = /[/|]/;

  // The box's entries in the API's shape ({source, target: a form or a list of forms}), the line number of each
  // (to name it in the server's errors), and a sentence for each line that cannot be read. Blank lines are skipped.
  function readGlossary(text) {
    const entries = [], lines = [], problems = [];
    text.split(/\r\n|\r|\n/).forEach((line, i) => {
      if (!line.trim()) return;
      const n = i + 1;
      const parts = line.split(SEPARATOR);
      const term = parts[0].trim();
      const forms = parts.length === 2 ? parts[1].split(FORMS).map((f) => f.trim()).filter(Boolean) : [];
      if (parts.length < 2) problems.push(`Line ${n} has no “→” or tab between the term and its translation.`);
      else if (parts.length > 2) problems.push(`Line ${n} has more than one “→” or tab: write one term per line.`);
      else if (!term) problems.push(`Line ${n} has no term before the “→”.`);
      else if (!forms.length) problems.push(`Line ${n} has no translation after the “→”.`);
      else {
        entries.push({ source: term, target: forms.length === 1 ? forms[0] : forms });
        lines.push(n);
      }
    });
    return { entries, lines, problems };
  }

  function showGlossaryProblems(problems) {
    const shown = problems.length > 5 ? [...problems.slice(0, 4), `… and ${problems.length - 4} more.`] : problems;
    glossaryError.replaceChildren(...shown.map((text) => {
      const p = document.createElement("p");
      p.textContent = text;
      return p;
    }));
    glossaryError.hidden = problems.length === 0;
    glossaryBox.setAttribute("aria-invalid", String(problems.length > 0));
  }

  // Checked when the text is sent, then as the lines are mended. Not on leaving the box: the message would push
  // the Translate button away under the pointer that is clicking it.
  glossaryBox.addEventListener("input", () => {
    if (!glossaryError.hidden) showGlossaryProblems(readGlossary(glossaryBox.value).problems);
  });

  // Why the server refused an entry the page sent (a 422 on `glossary`), in the words of the box.
  function refusedEntry(error, glossary) {
    const i = Array.isArray(error.loc) ? error.loc[2] : undefined;
    const entry = glossary.entries[i];
    if (!entry) return `The glossary: ${String(error.msg || "").replace(/^Value error, /, "")}`;
    const n = glossary.lines[i], forms = [entry.target].flat(), limit = config.glossary.max_term_chars;
    if (forms.length > config.glossary.max_forms) {
      return `Line ${n} has ${forms.length} translations; this server takes at most ${config.glossary.max_forms} per term.`;
    }
    const long = [entry.source, ...forms].find((term) => characters(term) > limit);
    if (long) return `Line ${n}: “${[...long].slice(0, 20).join("")}…” is longer than ${limit} characters.`;
    return `Line ${n} holds something the server does not take in a term (a control character?).`;
  }

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
  function explain(statusCode, body, text, glossary) {
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
        const terms = glossary.entries.length;
        if (terms > config.glossary.max_entries) {
          return [`The glossary has ${numbers.format(terms)} lines, and this server takes at most ` +
            `${numbers.format(config.glossary.max_entries)}. Keep the terms this text needs.`];
        }
        return ["The text is too long for the model’s context window. Shorten it or translate it in parts.",
          detail && `The server says: ${detail}`];
      }
      case 422: {
        const refused = Array.isArray(body && body.detail) ?
          body.detail.filter((e) => Array.isArray(e.loc) && e.loc[1] === "glossary") : [];
        if (refused.length) {
          showGlossaryProblems(refused.map((e) => refusedEntry(e, glossary)));
          glossaryBox.focus();
          return ["The server could not accept the glossary: see the lines named under the glossary box."];
        }
        return ["The server could not accept this request.", detail && `The server says: ${detail}`];
      }
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
  function requestBody(text, glossary) {
    const { source: from, target: to } = direction();
    const body = { text, source_lang: from.code, target_lang: to.code, include_reasoning: true };
    if (effort.value) body.reasoning_effort = effort.value;
    if (glossary.entries.length) body.glossary = glossary.entries;
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
    const glossary = readGlossary(glossaryBox.value);
    showGlossaryProblems(glossary.problems);
    if (glossary.problems.length) {
      showError("A line of the glossary cannot be read, so nothing was sent: see under the glossary box.");
      glossaryBox.focus();
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
          method: "POST", headers, body: JSON.stringify(requestBody(text, glossary)), cache: "no-store",
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
        const [headline, detail] = explain(response.ok ? 500 : response.status, body, text, glossary);
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
