"""Stage folders and their manifests: atomic writes, the no-op re-run, the refused overwrite.

Every stage writes its files and then, last and atomically, `manifest.json`. A folder without a
manifest is an interrupted stage; a folder with one is finished. A re-run is a no-op only when the
stage, the config and the inputs (path and sha256; an upstream stage by its manifest.json) are those the
manifest records. Stages that cannot resume build in a hidden folder beside their output (`building`),
which replaces the output only when complete: a failed, killed or `--force` run never loses a finished one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.errors import ArtifactError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Keys whose values are secrets, matched whole (lower case): not every key containing "token"
# (max_new_tokens, pre_tokenizer are config values a no-op check must see).
SECRET_KEYS = frozenset({"api_key", "apikey", "password", "secret", "token", "access_token", "auth_token",
                         "hf_token", "client_secret"})


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
            k: ("***" if v and str(k).lower() in SECRET_KEYS else redact(v)) for k, v in obj.items()
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


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def input_changes(manifest: dict[str, Any], inputs: list[Path]) -> list[str]:
    """How `inputs` differ from those `manifest` records (path, then sha256); empty when they are the same.

    An upstream stage is an input through its manifest.json. A manifest written before upstream
    manifests were recorded matches when its recorded `upstream` equals the current upstream manifest.
    """
    recorded = list(manifest.get("inputs") or [])
    changes = []
    for path in (Path(p) for p in inputs if Path(p).is_file()):
        same = [r for r in recorded if _resolved(r["path"]) == _resolved(path)]
        record = (same or [r for r in recorded if Path(r["path"]).name == path.name] or [None])[0]
        if record is None:
            if path.name == MANIFEST and manifest.get("upstream") == json.loads(path.read_text(encoding="utf-8")):
                continue
            changes.append(f"{path} is a new input")
            continue
        recorded.remove(record)
        if not same:
            changes.append(f"{path} instead of {record['path']}")
        elif (digest := sha256_file(path)) != record["sha256"]:
            changes.append(f"{path} changed (sha256 {record['sha256'][:12]}… -> {digest[:12]}…)")
    changes += [f"{r['path']} is no longer an input" for r in recorded]
    return changes


def config_changes(stage: str, recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """`stage.key: old -> new` for every top-level key whose (redacted) value differs."""
    config = redact(config)
    return [f"{stage}.{k}: {recorded.get(k)!r} -> {config.get(k)!r}"
            for k in sorted(set(recorded) | set(config), key=str) if recorded.get(k) != config.get(k)]


def _summary(items: list[str], most: int = 3) -> str:
    return "; ".join(items[:most]) + (f"; and {len(items) - most} more" if len(items) > most else "")


def check_out_dir(out_dir: Path, *, stage: str, config: dict[str, Any], force: bool, resume: bool = False,
                  inputs: list[Path] | None = None) -> dict[str, Any] | None:
    """Decide what to do with a stage's output folder before any work starts; changes nothing on disk.

    Returns the existing manifest when the same stage already finished there with the same config and
    inputs (the caller reports a no-op; `inputs` None: a stage whose config identifies its input, not compared). Else None when the stage may run: the folder is missing or empty,
    or `force`, or `resume` (an unfinished folder). Anything else is refused, saying what differs.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: exists and is not a folder. Choose another --out.")
    if (out_dir / MANIFEST).is_file() and not force:
        manifest = read_manifest(out_dir)
        if manifest.get("stage") != stage:
            raise ArtifactError(f"{out_dir}: already holds a finished `{manifest.get('stage')}` run. Choose another "
                                "--out, or pass --force to replace it.")
        configs = config_changes(stage, manifest.get("config") or {}, config)
        changed = input_changes(manifest, list(inputs)) if inputs is not None else []
        if not configs and not changed:
            return manifest
        what = " and ".join(part for part in (
            f"with another config ({_summary(configs)})" if configs else "",
            f"from other inputs ({_summary(changed)})" if changed else "") if part)
        raise ArtifactError(f"{out_dir}: already holds a finished `{stage}` run {what}. Pass --force to replace it, "
                            "or choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (force or resume):
        hint = "pass --resume to continue it or --force to start over" if stage == "train" else "pass --force"
        raise ArtifactError(
            f"{out_dir}: not empty and has no {MANIFEST} (an interrupted `toolkit {stage}`?); {hint}."
        )
    return None


def prepare_out_dir(out_dir: Path, *, stage: str, config: dict[str, Any], force: bool, resume: bool = False,
                    inputs: list[Path] | None = None):
    """`check_out_dir`, then for a stage that writes in place: with `force` the old folder is deleted first,
    and the folder is created. Stages that can build beside their output use `building` instead."""
    done = check_out_dir(out_dir, stage=stage, config=config, force=force, resume=resume, inputs=inputs)
    if done is None:
        if force and Path(out_dir).is_dir():
            shutil.rmtree(out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return done


def partial_dir(out_dir: Path) -> Path:
    """The hidden folder beside `out_dir` that a stage is built in."""
    return Path(out_dir).parent / f".{Path(out_dir).name}.partial"


def remove_stale_partials(out_dir: Path) -> None:
    """Delete what a killed earlier run left beside `out_dir` (its partial build, a swap's old folder)."""
    for leftover in (partial_dir(out_dir), Path(out_dir).parent / f".{Path(out_dir).name}.old"):
        if leftover.exists():
            log.warning("%s: removing what an interrupted run left (%s)", out_dir, leftover.name)
            shutil.rmtree(leftover)


def replace_dir(new: Path, out_dir: Path) -> None:
    """Put the complete folder `new` at `out_dir`: rename the old one away, rename the new one in, delete the
    old one. Only between the two renames (microseconds) is there no `out_dir`."""
    new, out_dir = Path(new), Path(out_dir)
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old"
    if old.exists():
        shutil.rmtree(old)
    os.rename(out_dir, old)
    os.rename(new, out_dir)
    shutil.rmtree(old)


@contextlib.contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `out_dir` to write a stage into. When the block succeeds it
    replaces `out_dir` (`replace_dir`); when it fails, it is deleted, with any parent folder it created, so a
    failed run leaves nothing behind and an existing `out_dir` (a finished run under `--force`) stays as it was.
    A killed run leaves only the hidden folder, which the next run of the stage removes."""
    out_dir = Path(out_dir)
    build = partial_dir(out_dir)
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    remove_stale_partials(out_dir)
    try:
        build.mkdir(parents=True)
    except OSError as exc:  # reported as the output folder's error: the hidden build folder is ours, not the user's
        raise type(exc)(exc.errno, exc.strerror, str(out_dir)) from exc
    try:
        yield build
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        for folder in created:  # innermost first; only folders this call made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    replace_dir(build, out_dir)


def finished_runs(root: Path) -> list[Path]:
    """Run folders under `root` holding at least one finished stage (a `STAGE/manifest.json`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and any(p.glob(f"*/{MANIFEST}"))]


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
