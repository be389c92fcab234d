"""Stage folders and their manifests: atomic writes, the no-op re-run, the refused overwrite.

Every stage writes its files and then, last and atomically, `manifest.json`. A folder without a
manifest is an interrupted stage; a folder with one is finished.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.errors import ArtifactError

MANIFEST = "manifest.json"
SECRET_WORDS = ("token", "api_key", "apikey", "password", "secret")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, root: Path | None = None) -> dict[str, Any]:
    """Path (relative to `root` when given), sha256 and size of one file."""
    path = Path(path)
    name = str(path.relative_to(root)) if root else str(path)
    return {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)  # mkstemp makes 0600; the result should look like any file we write
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=False) + "\n")


def redact(obj: Any) -> Any:
    """A copy of a config mapping with secret-looking values replaced (for manifests and logs)."""
    if isinstance(obj, dict):
        return {
            k: ("***" if v and any(w in k.lower() for w in SECRET_WORDS) else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def read_manifest(folder: Path, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a finished stage folder; a clear error if the folder is missing or unfinished."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such folder. Run the stage that writes it first.")
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}, so the stage that writes it did not finish. Re-run it.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}). Re-run the stage with --force.") from exc
    if stage and manifest.get("stage") != stage:
        raise ArtifactError(
            f"{folder}: expected the output of `toolkit {stage}`, found `{manifest.get('stage')}`. "
            f"Pass the folder that `toolkit {stage}` wrote."
        )
    return manifest


def prepare_out_dir(out_dir: Path, *, stage: str, config: dict[str, Any], force: bool, resume: bool = False):
    """Decide what to do with a stage's output folder before any work starts.

    Returns the existing manifest when the same stage already finished there with the same config
    (the caller reports a no-op), else None after making sure the folder exists and may be written.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a folder. Choose another --out.")
    if manifest_path.is_file() and not force:
        manifest = read_manifest(out_dir)
        if manifest.get("stage") == stage and manifest.get("config") == redact(config):
            return manifest
        raise ArtifactError(
            f"{out_dir}: already holds a finished `{manifest.get('stage')}` run with another config. "
            "Pass --force to replace it, or choose another --out."
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (force or resume):
        hint = "pass --resume to continue it or --force to start over" if stage == "train" else "pass --force"
        raise ArtifactError(
            f"{out_dir}: not empty and has no {MANIFEST} (an interrupted `toolkit {stage}`?); {hint}."
        )
    if force and out_dir.is_dir():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def write_manifest(
    out_dir: Path,
    *,
    stage: str,
    config: dict[str, Any],
    inputs: list[Path] | None = None,
    metrics: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record every file of `out_dir` (sha256, bytes) and write `manifest.json` last, atomically."""
    out_dir = Path(out_dir)
    outputs = [
        file_record(p, out_dir)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    ]
    manifest = {
        "stage": stage,
        "toolkit_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": redact(config),
        "inputs": [file_record(Path(p)) for p in inputs or [] if Path(p).is_file()],
        "outputs": outputs,
        "metrics": metrics or {},
        "upstream": upstream,
        **(extra or {}),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
