"""The parts of a GPU pack (bench/gpu_pack.py): laid out under a size limit here, gathered on the GPU machine.

`write_parts` fills parts largest file first (a file larger than a part becomes numbered chunks) and writes the
manifest, each part's files with sha256 and bytes, into every part. On the GPU machine `stash` copies the parts a
call carries into the stage folder, checking each piece, and `ready` refuses, in one line naming the missing
parts, until every file of the manifest is there intact. Standard library only: this runs on the GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from toolkit.artifacts import atomic_write_json, sha256_file  # stdlib only, like this module

MANIFEST = "manifest.json"
STAGE = Path(os.environ.get("GPU_PACK_STAGE", "/tmp/gpu-pack"))


class PackError(Exception):
    """One line: what is wrong and what to do."""

# ---- parts -----------------------------------------------------------------------------------------------

def plan_parts(sizes: dict[str, int], limit: int) -> list[list[dict]]:
    """Pieces per part, each part at most `limit` bytes: files largest first into the first part with room.

    A file larger than `limit` becomes chunks `PATH.chunkNNN` of `limit` bytes (the last shorter), each a
    piece of its own with `of` (the file) and `offset`. Deterministic: ties go by path.
    """
    if limit <= 0:
        raise PackError(f"part limit {limit} bytes: nothing fits; the working tree alone may exceed the limit")
    pieces = []
    for path, size in sizes.items():
        if size <= limit:
            pieces.append({"path": path, "bytes": size})
            continue
        for i, offset in enumerate(range(0, size, limit)):
            pieces.append({"path": f"{path}.chunk{i:03d}", "bytes": min(limit, size - offset), "of": path,
                           "offset": offset})
    parts: list[list[dict]] = []
    room: list[int] = []
    for piece in sorted(pieces, key=lambda p: (-p["bytes"], p["path"])):
        for i, free in enumerate(room):
            if piece["bytes"] <= free:
                parts[i].append(piece)
                room[i] -= piece["bytes"]
                break
        else:
            parts.append([piece])
            room.append(limit - piece["bytes"])
    for part in parts:
        part.sort(key=lambda p: p["path"])
    return parts


def write_parts(tree: Path, out: Path, limit: int, info: dict) -> dict:
    """Lay out the files under `tree` as parts `out/p1..pN`, each with the whole manifest; returns it."""
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    sizes = {str(p.relative_to(tree)): p.stat().st_size for p in files}
    plan = plan_parts(sizes, limit)
    if out.exists():
        shutil.rmtree(out)
    manifest = dict(info, limit_bytes=limit,
                    files=[{"path": path, "bytes": size, "sha256": sha256_file(tree / path)}
                           for path, size in sizes.items()],
                    parts=[])
    for n, pieces in enumerate(plan, 1):
        name = f"p{n}"
        for piece in pieces:
            dest = out / name / piece["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            if "of" in piece:
                with open(tree / piece["of"], "rb") as src, open(dest, "wb") as dst:
                    src.seek(piece["offset"])
                    dst.write(src.read(piece["bytes"]))
            else:
                shutil.copyfile(tree / piece["path"], dest)
            piece["sha256"] = sha256_file(dest)
        manifest["parts"].append({"name": name, "bytes": sum(p["bytes"] for p in pieces), "pieces": pieces})
    for part in manifest["parts"]:
        atomic_write_json(out / part["name"] / MANIFEST, manifest)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def verify(pack: Path) -> list[str]:
    """Problems with a built pack (`pack/manifest.json` and its parts): missing or altered pieces."""
    manifest = json.loads((pack / MANIFEST).read_text(encoding="utf-8"))
    problems = []
    for part in manifest["parts"]:
        for piece in part["pieces"]:
            path = pack / part["name"] / piece["path"]
            if not path.is_file():
                problems.append(f"{part['name']}: {piece['path']} missing")
            elif sha256_file(path) != piece["sha256"]:
                problems.append(f"{part['name']}: {piece['path']} altered (sha256 differs from the manifest)")
    return problems


# ---- on the GPU machine ------------------------------------------------------------------------------------

def stash(carried: Path, stage: Path) -> list[str]:
    """Copy each carried part (`carried/pN` with its manifest) into `stage`, checking every piece's sha256.

    A part from another build than the one already staged restarts the stage. Returns the parts stashed.
    """
    done = []
    for folder in sorted(carried.glob("p*"), key=lambda p: (len(p.name), p.name)):
        if not (folder / MANIFEST).is_file():
            continue
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        staged = stage / MANIFEST
        if staged.is_file() and json.loads(staged.read_text(encoding="utf-8")) != manifest:
            print(f"gpu_pack: {folder} is from another build than {stage}: restarting the stage", file=sys.stderr)
            shutil.rmtree(stage)
        stage.mkdir(parents=True, exist_ok=True)
        if not staged.is_file():
            atomic_write_json(staged, manifest)
        part = next((p for p in manifest["parts"] if p["name"] == folder.name), None)
        if part is None:
            raise PackError(f"{folder}: its manifest lists no part {folder.name}; rebuild the pack")
        for piece in part["pieces"]:
            src = folder / piece["path"]
            if not src.is_file() or sha256_file(src) != piece["sha256"]:
                why = "missing" if not src.is_file() else "altered (sha256 differs from the manifest)"
                raise PackError(f"{src}: {why}; copy the part again from the pack built here")
            dest = stage / (".chunks/" + piece["path"] if "of" in piece else piece["path"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        (stage / ".parts").mkdir(exist_ok=True)
        (stage / ".parts" / folder.name).touch()
        done.append(folder.name)
    if (stage / MANIFEST).is_file():
        _join_chunks(stage, json.loads((stage / MANIFEST).read_text(encoding="utf-8")))
    return done


def _join_chunks(stage: Path, manifest: dict) -> None:
    chunks: dict[str, list[dict]] = {}
    for part in manifest["parts"]:
        for piece in part["pieces"]:
            if "of" in piece:
                chunks.setdefault(piece["of"], []).append(piece)
    for path, pieces in chunks.items():
        sources = [stage / ".chunks" / p["path"] for p in sorted(pieces, key=lambda p: p["offset"])]
        if (stage / path).is_file() or not all(s.is_file() for s in sources):
            continue
        (stage / path).parent.mkdir(parents=True, exist_ok=True)
        with open(stage / path, "wb") as out:
            for src in sources:
                with open(src, "rb") as fh:
                    shutil.copyfileobj(fh, out)
        for src in sources:
            src.unlink()


def missing(stage: Path) -> tuple[list[str], list[str]]:
    """(parts not stashed, files absent or altered) of the pack staged in `stage`."""
    manifest = json.loads((stage / MANIFEST).read_text(encoding="utf-8"))
    parts = [p["name"] for p in manifest["parts"] if not (stage / ".parts" / p["name"]).is_file()]
    bad = [f["path"] for f in manifest["files"]
           if not (stage / f["path"]).is_file() or sha256_file(stage / f["path"]) != f["sha256"]]
    return parts, bad


def ready(use: str, carried: Path, stage: Path) -> Path:
    """Stash what this call carries, then require the whole pack in `stage`; returns `stage`."""
    stash(carried, stage)
    if not (stage / MANIFEST).is_file():
        raise PackError(f"gpu pack {use}: no part of it on this machine (expected {carried}/pN carried, or earlier "
                        f"`python3 bench/gpu_pack.py stash {use}` calls); build it with "
                        f"`python bench/gpu_pack.py build {use}` and see its `calls`")
    parts, bad = missing(stage)
    if parts or bad:
        manifest = json.loads((stage / MANIFEST).read_text(encoding="utf-8"))
        coming = {q.get("of", q["path"]) for p in manifest["parts"] if p["name"] in parts for q in p["pieces"]}
        altered = [f for f in bad if f not in coming]
        carry = " ".join(f'[".gpu/{use}/{p}"]' for p in parts)
        if not parts:
            raise PackError(f"gpu pack {use}: altered on this machine: {', '.join(altered[:4])}; remove {stage} "
                            "and stash every part again")
        raise PackError(f"gpu pack {use}: missing part(s) {' '.join(parts)} of {len(manifest['parts'])}"
                        + (f" (and altered here: {', '.join(altered[:4])})" if altered else "")
                        + f": first one device call per part, carry {carry}, command `python3 bench/gpu_pack.py "
                          f"stash {use}`, on the same warm machine")
    return stage
