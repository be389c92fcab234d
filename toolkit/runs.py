"""Run folders, and what a stage or command finds upstream of a model: the one place that knows them.

A run is a folder `export/<run>/` with one subfolder per stage (`prep`, `train`, `merge`, `export`, `eval`),
finished when its `manifest.json` is written. Each manifest carries the one of the stage it read (`upstream`),
so any model's manifest leads back to the prep config (columns, language names, prompt) and to the chat
format train recorded. The CLI asks this module which folders a command reads and writes and which model a
run holds; the stages ask it for a model's manifest, its prep config, its adapter and its base model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from toolkit.artifacts import MANIFEST, finished_runs, read_manifest
from toolkit.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)
EXPORT_ROOT = Path("export")
STAGES = ("prep", "train", "merge", "export", "eval")
ADAPTER_CONFIG = "adapter_config.json"


# ---- run folders ----------------------------------------------------------------------------------

def run_dir(run: str) -> Path:
    return EXPORT_ROOT / run


def stage_dir(run: str | Path, stage: str) -> Path:
    """`export/<run>/<stage>` for a run name; `<folder>/<stage>` for a run folder."""
    return (run if isinstance(run, Path) else run_dir(run)) / stage


def default_run(corpus: Path | None = None) -> str:
    """Run name: the corpus file's stem, or the most recent run under export/ with a finished stage."""
    if corpus is not None:
        return Path(corpus).stem
    runs = finished_runs(EXPORT_ROOT)  # a folder left by a failed stage is no run
    if not runs:
        raise ArtifactError("no run with a finished stage under export/: start with `toolkit prep CORPUS.tsv`, "
                            "or pass --run.")
    return max(runs, key=lambda p: p.stat().st_mtime).name


def run_of(path: str | Path) -> str | None:
    """The run a path inside `export/<run>/` belongs to; None for a path elsewhere (or a model name)."""
    root, resolved = EXPORT_ROOT.resolve(), Path(path).resolve()
    if resolved.is_relative_to(root) and resolved != root:
        return resolved.relative_to(root).parts[0]
    return None


# ---- the model a command uses -----------------------------------------------------------------------

class Model(NamedTuple):
    backend: str  # transformers, llama-cpp or ollama
    model: str  # what the backend loads: a model/merge/train folder or hub id, a GGUF file, an Ollama name
    manifest_dir: Path | None  # the folder whose manifest gives the prompt (None: none, the default prompt)


def export_gguf(export_dir: Path) -> Path | None:
    """The GGUF of a finished export folder that is used by default: the one its Modelfile names, else the
    file of its `ollama_gguf` type, else the first by name; None when it holds none."""
    manifest = read_manifest(export_dir)
    named = (manifest.get("ollama") or {}).get("gguf")
    if named and (export_dir / named).is_file():
        return export_dir / named
    ggufs = sorted(export_dir.rglob("*.gguf"))
    wanted = str((manifest.get("config") or {}).get("ollama_gguf") or "").lower()
    preferred = [g for g in ggufs if wanted and wanted in g.name.lower()]
    return (preferred or ggufs or [None])[0]


def latest_model(run_folder: Path, backend: str | None = None) -> tuple[str, Path]:
    """(backend, model) of a run folder's most advanced finished stage: export GGUF > merge > train."""
    run_folder = Path(run_folder)
    export = run_folder / "export"
    if backend in (None, "llama-cpp") and (export / MANIFEST).is_file():
        gguf = export_gguf(export)
        if gguf is not None:
            return "llama-cpp", gguf
    if backend in (None, "transformers"):
        for stage in ("merge", "train"):
            if (run_folder / stage / MANIFEST).is_file():
                return "transformers", run_folder / stage
    wanted = {"llama-cpp": "export", "transformers": "merge or train"}.get(backend or "", "export, merge or train")
    raise ArtifactError(f"{run_folder}: no finished {wanted} stage to evaluate. Pass --model, or finish "
                        "`toolkit train` first.")


def default_backend(model: str | Path) -> str:
    """The backend of a model path when none is chosen: llama-cpp for a GGUF file, else transformers."""
    return "llama-cpp" if str(model).endswith(".gguf") else "transformers"


def eval_target(model: str | None, backend: str | None, run: str | None,
                out_dir: Path | None) -> tuple[str, str, Path]:
    """What `toolkit eval TEST.tsv` evaluates and where it writes: `model` through `backend` (None: from the
    model), or without a model the latest finished stage of `run` (default: the latest run); the output folder
    defaults to `export/<run>/eval` of that run, or of the run the model belongs to. Returns (backend, model,
    output folder)."""
    if model is None:
        if backend == "ollama":
            raise ConfigError("--backend ollama needs --model NAME (the name given to `ollama create`).")
        run = run or default_run()
        backend, path = latest_model(run_dir(run), backend)
        log.info("eval: %s through %s", path, backend)
        model = str(path)
    if backend != "ollama" and Path(model).is_dir() and (Path(model) / MANIFEST).is_file() \
            and read_manifest(Path(model)).get("stage") == "export":  # an export folder: its Modelfile's GGUF
        backend, model = resolve(model, backend)[:2]
    backend = backend or default_backend(model)
    if out_dir is None:
        run = run or run_of(model)
        if run is None:
            raise ConfigError("pass --out DIR (or --run RUN to write export/RUN/eval).")
        out_dir = stage_dir(run, "eval")
    return backend, model, out_dir


def serve_target(model: str | Path | None, backend: str | None, run: str | None) -> Model:
    """What `toolkit serve [MODEL]` serves: `resolve(MODEL)`, or the latest finished stage of `run` (default: the
    latest run)."""
    if model is None:
        if backend == "ollama":
            raise ConfigError("--backend ollama needs MODEL (an Ollama model name or an export folder).")
        _, model = latest_model(run_dir(run or default_run()), backend)
    return resolve(model, backend)


def resolve(target: str | Path, backend: str | None) -> Model:
    """The model to serve for a GGUF, a stage folder or (with `ollama`) a model name.

    An export folder means its Modelfile's GGUF through llama-cpp, or its Ollama model with `ollama`.
    """
    path = Path(target)
    if path.is_file():
        if path.suffix != ".gguf" or backend not in (None, "llama-cpp"):
            raise ConfigError(f"{path}: a file is served as a GGUF through llama-cpp; found {path.suffix or 'no'} "
                              f"suffix with backend {backend or 'auto'}. Pass a .gguf, or a model folder.")
        return Model("llama-cpp", str(path), path.parent)
    if path.is_dir():
        manifest = read_manifest(path) if (path / MANIFEST).is_file() else {}
        if manifest.get("stage") == "export":
            ollama = manifest.get("ollama") or {}
            if not ollama.get("name") or not ollama.get("gguf"):
                raise ArtifactError(f"{path}: the export manifest names no GGUF/Ollama model. Re-run `toolkit "
                                    "export` with --force, or pass the .gguf file.")
            if backend == "ollama":
                return Model("ollama", ollama["name"], path)
            if backend in (None, "llama-cpp"):
                return Model("llama-cpp", str(path / ollama["gguf"]), path)
        if backend == "ollama":
            raise ConfigError(f"{path}: --backend ollama needs a model name or an export folder; found a folder "
                              "without an export manifest.")
        return Model(backend or "transformers", str(path), path)
    if backend == "ollama":
        return Model("ollama", str(target), None)
    raise ArtifactError(f"{target}: no such file or folder. Pass a GGUF, an export/merge/train folder, or "
                        "--backend ollama with a model name.")


# ---- manifests upstream -----------------------------------------------------------------------------

def _folder_with_manifest(target: str | Path) -> Path | None:
    path = Path(target)
    if not path.exists():
        return None
    folder = path if path.is_dir() else path.parent
    return next((c for c in (folder, folder.parent, folder.parent.parent) if (c / MANIFEST).is_file()), None)


def nearest_manifest(target: str | Path | None) -> dict[str, Any] | None:
    """The manifest of the stage folder holding `target` (its own folder, then up to two parents: a GGUF in an
    export folder, a checkpoint in a train folder); None for a name or a folder outside any stage."""
    folder = _folder_with_manifest(target) if target else None
    return read_manifest(folder) if folder is not None else None


def upstream(manifest: dict[str, Any] | None, stage: str) -> dict[str, Any] | None:
    """The manifest of `stage` in `manifest`'s upstream chain (itself included); None when there is none."""
    node = manifest
    while node is not None:
        if node.get("stage") == stage:
            return node
        node = node.get("upstream")
    return None


def prep_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The prep manifest upstream of a stage's manifest (the prompt and the columns); ArtifactError without one."""
    found = upstream(manifest, "prep")
    if found is None:
        raise ArtifactError("no prep manifest in this folder's upstream chain: it was not made by `toolkit prep`.")
    return found


def trained_with_analysis(manifest: dict[str, Any] | None) -> bool:
    """Whether the model's prep wrote analyses: a reasoning column, or a glossary with an analysis share."""
    try:
        cfg = prep_manifest(manifest)["config"] if manifest else {}
    except ArtifactError:
        return False
    return bool(cfg.get("reasoning_column") or (cfg.get("glossary") and cfg.get("glossary_analysis_share", 0)))


def prep_columns(manifest: dict[str, Any] | None) -> tuple[str, str]:
    """The (source, target) TSV columns of a model's prep config (e.g. zh, nan); prep's defaults without one."""
    from toolkit.config import PrepConfig

    cfg = (upstream(manifest, "prep") or {}).get("config") or {}
    default = PrepConfig()
    return cfg.get("source_column", default.source_column), cfg.get("target_column", default.target_column)


def chat_format(manifest: dict[str, Any]) -> str | None:
    """The chat format the train stage recorded in a manifest's upstream chain (None when none did)."""
    node: dict[str, Any] | None = manifest
    while node is not None:
        if node.get("stage") == "train" and node.get("chat_format"):
            return node["chat_format"]
        node = node.get("upstream")
    return None


def find_adapter(train_dir: Path) -> Path:
    """The folder holding adapter_config.json: the train folder itself or its `adapter/` subfolder."""
    train_dir = Path(train_dir)
    for candidate in (train_dir, train_dir / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ArtifactError(
        f"{train_dir}: no {ADAPTER_CONFIG} here or in {train_dir / 'adapter'}. Pass the folder `toolkit train` wrote."
    )


def base_model_of(train_manifest: dict[str, Any], adapter_dir: Path, override: str | None) -> str:
    """The base model: --base-model, else the train manifest's config, else the adapter's own record."""
    if override:
        return override
    name = (train_manifest.get("config") or {}).get("base_model") or train_manifest.get("base_model")
    if not name:
        name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not name:
        raise ArtifactError(f"{adapter_dir}: no base model recorded. Pass --base-model PATH_OR_ID.")
    return str(name)
