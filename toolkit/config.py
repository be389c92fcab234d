"""Stage configuration: one frozen dataclass per stage, filled from defaults, a TOML preset or file,
then repeated `--set section.key=value` overrides. Unknown keys and bad values are collected and
reported together in one ConfigError.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from toolkit.errors import ConfigError


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field whose help text becomes --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass(frozen=True)
class PrepConfig:
    """`toolkit prep`: TSV/JSONL pairs -> Harmony chat examples."""

    section: ClassVar[str] = "prep"

    source_column: str = _help("TSV column holding the source sentence.", "zh")
    target_column: str = _help("TSV column holding the target sentence.", "nan")
    reasoning_column: str | None = _help("Optional TSV column with a reasoning text for the analysis channel.", None)
    source_name: str = _help("Language name of the source column, as written in the prompt.",
                             "Mandarin Chinese (Traditional)")
    target_name: str = _help("Language name of the target column, as written in the prompt.",
                             "Taiwanese Hokkien (Han characters)")
    direction: str = _help("forward (source->target), reverse, or both.", "forward")
    reasoning_language: str = _help("Value of the system option `reasoning language: X`.", "English")
    reasoning_effort: str = _help("Harmony reasoning effort: low, medium or high.", "low")
    instruction: str = _help(
        "Developer instruction; {src} and {tgt} are replaced by the language names.",
        "Translate the user's text from {src} into {tgt}. Reply with the translation only.",
    )
    dev_fraction: float = _help("Share of pairs held out as the dev split (ignored with dev_file).", 0.05)
    dev_file: str | None = _help("Explicit dev TSV/JSONL instead of a random split.", None)
    seed: int = _help("Seed of the dev split.", 20261125)
    max_length: int = _help("Longest allowed source or target (tokens, or characters without a tokenizer).", 256)
    length_unit: str = _help("tokens (gpt-oss tokenizer, built offline) or chars.", "chars")
    dedupe: bool = _help("Drop repeated (source, target) pairs.", True)
    skip_bad_lines: bool = _help("Count and skip malformed lines instead of stopping at the first.", False)
    date: str = _help("Current date written in the Harmony system message (fixed for reproducibility).",
                      "2025-06-28")

    def problems(self) -> list[str]:
        out = []
        if self.direction not in ("forward", "reverse", "both"):
            out.append(f"prep.direction: expected forward, reverse or both, found {self.direction!r}")
        if self.reasoning_effort not in ("low", "medium", "high"):
            out.append(f"prep.reasoning_effort: expected low, medium or high, found {self.reasoning_effort!r}")
        if not 0.0 <= self.dev_fraction < 1.0:
            out.append(f"prep.dev_fraction: expected 0 <= x < 1, found {self.dev_fraction}")
        if self.max_length <= 0:
            out.append(f"prep.max_length: expected a positive number, found {self.max_length}")
        if self.length_unit not in ("tokens", "chars"):
            out.append(f"prep.length_unit: expected tokens or chars, found {self.length_unit!r}")
        if self.source_column == self.target_column:
            out.append("prep.source_column and prep.target_column must differ")
        return out


# --- train config (owned by the train stage; give it `section: ClassVar[str] = "NAME"`) ---


# --- merge config (owned by the merge stage; give it `section: ClassVar[str] = "NAME"`) ---


# --- export config (owned by the export stage; give it `section: ClassVar[str] = "NAME"`) ---


# --- eval config (owned by the eval stage; give it `section: ClassVar[str] = "NAME"`) ---


# --- serve config (owned by the serve stage; give it `section: ClassVar[str] = "NAME"`) ---


# Every dataclass above with a `section` class attribute is a TOML section.
SECTIONS: dict[str, type] = {
    obj.section: obj for obj in list(globals().values())
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and isinstance(getattr(obj, "section", None), str)
}



def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _parse_value(text: str) -> Any:
    """`--set k=v`: v is read as a TOML value (numbers, true/false, ["lists"]) or else as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def preset_path(name: str | Path) -> Path:
    """A shipped preset name (e.g. `tiny-cpu`) or a path to a TOML file."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    shipped = resources.files("toolkit") / "configs" / f"{name}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    available = ", ".join(list_presets())
    raise ConfigError(f"config {name!r}: no such file and no shipped preset of that name. Presets: {available}.")


def list_presets() -> list[str]:
    folder = resources.files("toolkit") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def build(
    section: str, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **cli: Any
) -> Any:
    """Defaults -> preset/file section -> `--set section.key=value` -> explicit CLI values (not None).

    Only `section` is built; other sections of the file are checked for unknown keys too, so a typo in
    a shared preset never passes silently.
    """
    problems: list[str] = []
    data: dict[str, dict[str, Any]] = {}
    if config is not None:
        path = preset_path(config)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc}). Fix the file.") from exc
        for name, values in raw.items():
            if name not in SECTIONS or not isinstance(values, dict):
                problems.append(f"{path}: unknown section [{name}] (known: {', '.join(sorted(SECTIONS))})")
                continue
            data[name] = dict(values)
    for item in overrides:
        key, sep, value = item.partition("=")
        name, dot, attr = key.strip().partition(".")
        if not sep or not dot:
            problems.append(f"--set {item!r}: expected section.key=value, e.g. train.lora_r=32")
            continue
        data.setdefault(name, {})[attr] = _parse_value(value.strip())
    for key, value in cli.items():
        if value is not None:
            data.setdefault(section, {})[key] = value
    for name, values in data.items():
        cls = SECTIONS.get(name)
        if cls is None:
            problems.append(f"unknown section {name!r} (known: {', '.join(sorted(SECTIONS))})")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in fields:
                problems.append(f"{name}.{key}: unknown key (known: {', '.join(fields)})")
            elif not _type_ok(value, hints[key]):
                problems.append(f"{name}.{key}: expected {hints[key]}, found {value!r}")
    cls = SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"unknown section {section!r}")
    result = None
    if not problems:
        values = data.get(section, {})
        hints = typing.get_type_hints(cls)
        values = {k: float(v) if hints[k] is float else v for k, v in values.items()}
        result = cls(**values)
        if hasattr(result, "problems"):
            problems.extend(result.problems())
    if problems:
        raise ConfigError(f"{len(problems)} config problem(s): " + "; ".join(problems))
    return result


def as_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_text(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
