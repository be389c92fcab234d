"""Ollama: render the Modelfile of an export and register it with a server (`toolkit export --register`).

The Modelfile comes from a template in `modelfiles/` (found by `toolkit.assets`) whose `@@NAME@@`
placeholders are filled here (the TEMPLATE body itself is Go template text full of `{{ }}`, hence the
different marker). Registration goes
through the official `ollama` Python client the way `ollama create -f Modelfile` does: upload the GGUF
as a blob, then `create` with `files`, `template`, `system` and `parameters` parsed from the same
Modelfile, so the file on disk and the registered model cannot drift apart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit import assets
from toolkit.config import DEFAULT_OLLAMA_HOST, ollama_host
from toolkit.errors import ConfigError, ExternalToolError
from toolkit.harmony import STOP_TOKENS
from toolkit.prompt import PromptSpec

log = logging.getLogger(__name__)
MODELFILES = assets.folder("modelfiles")
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def template_path(name: str) -> Path:
    """A template shipped in modelfiles/ (`gpt-oss-harmony`) or a path to one."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = MODELFILES / f"{name}.Modelfile"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.name.removesuffix(".Modelfile") for p in MODELFILES.glob("*.Modelfile")))
    raise ConfigError(f"Modelfile template {name!r}: no such file and none in {MODELFILES} (known: {known}).")


def render(template: Path, values: dict[str, Any]) -> str:
    """The template with every @@NAME@@ replaced; unknown or unused names are errors."""
    text = Path(template).read_text(encoding="utf-8")
    wanted = set(_PLACEHOLDER.findall(text))
    missing, unused = wanted - set(values), set(values) - wanted
    if missing or unused:
        raise ConfigError(f"{template}: placeholders {sorted(missing)} have no value and values {sorted(unused)} "
                          "have no placeholder. Fix the template.")
    for key, value in values.items():
        if '"""' in str(value):
            raise ConfigError(f"Modelfile value {key} contains triple quotes, which a Modelfile cannot hold.")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def modelfile_values(spec: PromptSpec, gguf_name: str, model_name: str, *, temperature: float, num_ctx: int,
                     num_predict: int) -> dict[str, Any]:
    """Placeholder values: the GGUF beside the Modelfile and the system text the model was trained with."""
    return {
        "GGUF": f"./{gguf_name}",
        "NAME": model_name,
        "DATE": spec.date,
        "REASONING_EFFORT": spec.reasoning_effort,
        "SYSTEM": spec.messages("")[0]["content"],
        "TEMPERATURE": _number(temperature),
        "NUM_CTX": num_ctx,
        "NUM_PREDICT": num_predict,
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass
class Modelfile:
    """The parts of a Modelfile that /api/create takes."""

    from_: str = ""
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


_INSTRUCTION = re.compile(r"[ \t]*(?:#[^\n]*|(\w+)[ \t]+)?")


def parse(text: str, strict: bool = True) -> Modelfile:
    """FROM, TEMPLATE, SYSTEM and PARAMETER instructions (values quoted, triple-quoted or bare); # comments.

    Other instructions (LICENSE, MESSAGE, ADAPTER) are errors when `strict`, else skipped (a server's
    `show` output may carry them).
    """
    out = Modelfile()
    pos, n = 0, len(text)
    while pos < n:
        match = _INSTRUCTION.match(text, pos)
        keyword = match.group(1)
        pos = match.end()
        if keyword is None:
            pos = text.find("\n", pos) + 1 or n
            continue
        value, pos = _value(text, pos)
        keyword = keyword.upper()
        if keyword == "FROM":
            out.from_ = value
        elif keyword == "TEMPLATE":
            out.template = value
        elif keyword == "SYSTEM":
            out.system = value
        elif keyword == "PARAMETER":
            name, _, raw = value.partition(" ")
            raw = raw.strip()
            param = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else _typed(raw)
            if name == "stop":
                out.parameters.setdefault("stop", []).append(param)
            else:
                out.parameters[name] = param
        elif strict:
            raise ConfigError(f"Modelfile: unsupported instruction {keyword} (toolkit writes FROM, TEMPLATE, SYSTEM, "
                              "PARAMETER)")
    return out


def _value(text: str, pos: int) -> tuple[str, int]:
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ConfigError('Modelfile: unterminated """ block')
        return text[pos + 3:end], end + 3
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end].strip(), end + 1


def _typed(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def write_modelfile(out_dir: Path, template: str, values: dict[str, Any]) -> Path:
    """Render the template into out_dir/Modelfile (atomically) and check it parses back to what was meant."""
    from toolkit.artifacts import atomic_write_text

    text = render(template_path(template), values)
    parsed = parse(text)
    if parsed.from_ != values["GGUF"] or tuple(parsed.parameters.get("stop", ())) != STOP_TOKENS:
        raise ConfigError(f"{template}: rendered Modelfile must use FROM @@GGUF@@ and stop on {STOP_TOKENS}.")
    path = Path(out_dir) / "Modelfile"
    atomic_write_text(path, text)
    return path


def _client(host: str):
    import ollama

    return ollama.Client(host=host, timeout=600)


def _call(host: str, what: str, func, *args, missing_ok: bool = False, **kwargs):
    """Run one client call; connection problems and server errors become one-line ExternalToolErrors.

    With `missing_ok` a 404 answer returns None (e.g. `show` of a model that does not exist).
    """
    import httpx
    import ollama

    try:
        return func(*args, **kwargs)
    except (ConnectionError, httpx.TransportError) as exc:
        raise ExternalToolError(
            f"no Ollama server answers at {host} ({what}: {exc.__class__.__name__}). Start one with `ollama serve` "
            f"or pass --ollama-host URL (default: $OLLAMA_HOST or {DEFAULT_OLLAMA_HOST})."
        ) from None
    except ollama.ResponseError as exc:
        if missing_ok and exc.status_code == 404:
            return None
        raise ExternalToolError(f"Ollama at {host} refused {what}: {exc.error} (HTTP {exc.status_code}).") from None


def existing(client, host: str, name: str) -> Modelfile | None:
    """The registered model's Modelfile as the server shows it, or None when there is no such model."""
    shown = _call(host, "show", client.show, name, missing_ok=True)
    if shown is None:
        return None
    parsed = parse(shown.modelfile or "", strict=False)
    if shown.template is not None:
        parsed.template = shown.template
    return parsed


def same_model(shown: Modelfile, wanted: Modelfile, digest: str) -> bool:
    """The registered model uses this GGUF blob, template, system and parameters."""
    hex_digest = digest.split(":", 1)[1]
    return (hex_digest in shown.from_ and shown.template == wanted.template and shown.system == wanted.system
            and shown.parameters == wanted.parameters)


def register(modelfile: Path, name: str, *, host: str | None = None, force: bool = False,
             digest: str | None = None) -> dict[str, Any]:
    """Create model `name` from `modelfile` (its FROM is a GGUF beside it); a no-op when it is already there.

    Refuses to replace a different model of that name without `force`. `digest` ("sha256:...") saves
    hashing a large GGUF again when the export manifest already recorded it.
    """
    from toolkit.artifacts import sha256_file

    host = ollama_host(host)
    modelfile = Path(modelfile)
    wanted = parse(modelfile.read_text(encoding="utf-8"))
    gguf = (modelfile.parent / wanted.from_).resolve()
    if not gguf.is_file():
        raise ExternalToolError(f"{modelfile}: FROM {wanted.from_} is not a file. Re-run `toolkit export`.")
    digest = digest or f"sha256:{sha256_file(gguf)}"
    client = _client(host)
    _call(host, "list models", client.list)  # fails fast, with one line, when no server answers
    shown = existing(client, host, name)
    if shown is not None and same_model(shown, wanted, digest):
        log.info("ollama: %s is already registered at %s with this GGUF and Modelfile; nothing to do", name, host)
        return {"name": name, "host": host, "status": "unchanged", "digest": digest}
    if shown is not None and not force:
        raise ExternalToolError(f"Ollama at {host} already has a different model named {name!r}. Pass --force to "
                                "replace it, or choose another --ollama-name.")
    log.info("ollama: uploading %s (%.1f MB) to %s", gguf.name, gguf.stat().st_size / 1e6, host)
    uploaded = _call(host, "blob upload", client.create_blob, gguf)
    if uploaded != digest:
        raise ExternalToolError(f"{gguf}: server stored digest {uploaded}, expected {digest} (file changed?).")
    response = _call(host, "create", client.create, model=name, files={gguf.name: digest}, template=wanted.template,
                     system=wanted.system, parameters=wanted.parameters, stream=False)
    if getattr(response, "status", None) != "success":
        raise ExternalToolError(f"Ollama at {host} did not finish creating {name!r}: status {response.status!r}.")
    status = "replaced" if shown is not None else "created"
    log.info("ollama: %s %s at %s; try it with `ollama run %s`", status, name, host, name)
    return {"name": name, "host": host, "status": status, "digest": digest}
