"""bench/gpu_pack.py and bench/gpu_parts.py on small fake files, no network: parts under a size limit, the
manifest, and the check on the GPU machine that refuses a missing or altered part."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_pack
import gpu_parts


def make_tree(root: Path, sizes: dict[str, int]) -> Path:
    for i, (name, size) in enumerate(sizes.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes((i * 7 + j) % 251 for j in range(size)))
    return root


def test_parts_stay_under_the_limit_and_hold_every_file_once():
    sizes = {"model/a.whl": 90, "model/b.whl": 95, "wheels/c.whl": 30, "wheels/d.whl": 8, "data/e.tsv": 5}
    parts = gpu_parts.plan_parts(sizes, 100)
    assert all(sum(p["bytes"] for p in part) <= 100 for part in parts)
    assert sorted(p["path"] for part in parts for p in part) == sorted(sizes)
    # 228 bytes need 3 parts of 100; largest first: b (95) + e (5), a (90) + d (8), c alone
    assert [[p["path"] for p in part] for part in parts] == [
        ["data/e.tsv", "model/b.whl"], ["model/a.whl", "wheels/d.whl"], ["wheels/c.whl"]]


def test_a_file_over_the_limit_travels_as_chunks():
    parts = gpu_parts.plan_parts({"big.bin": 250, "small": 10}, 100)
    chunks = sorted((p for part in parts for p in part if p.get("of") == "big.bin"), key=lambda p: p["offset"])
    assert [(c["path"], c["bytes"], c["offset"]) for c in chunks] == [
        ("big.bin.chunk000", 100, 0), ("big.bin.chunk001", 100, 100), ("big.bin.chunk002", 50, 200)]
    assert all(sum(p["bytes"] for p in part) <= 100 for part in parts)
    with pytest.raises(gpu_parts.PackError):
        gpu_parts.plan_parts({"a": 1}, 0)


@pytest.fixture
def pack(tmp_path):
    tree = make_tree(tmp_path / "tree", {"model/big.whl": 250, "wheels/w.whl": 60, "data/t.tsv": 30})
    manifest = gpu_parts.write_parts(tree, tmp_path / ".gpu" / "demo", 100, {"use": "demo"})
    return tmp_path, tree, manifest


def test_manifest_lists_each_part_and_every_part_carries_it(pack):
    tmp_path, tree, manifest = pack
    out = tmp_path / ".gpu" / "demo"
    names = [p["name"] for p in manifest["parts"]]
    assert names == [f"p{i}" for i in range(1, len(names) + 1)] and len(names) == 4
    for part in manifest["parts"]:
        folder = out / part["name"]
        assert json.loads((folder / "manifest.json").read_text()) == manifest
        carried = [f for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json"]
        assert sum(f.stat().st_size for f in carried) == part["bytes"] <= 100
        for piece in part["pieces"]:
            assert gpu_parts.sha256_file(folder / piece["path"]) == piece["sha256"]
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == {
        str(p.relative_to(tree)): gpu_parts.sha256_file(p) for p in tree.rglob("*") if p.is_file()}
    assert gpu_parts.verify(out) == []
    victim = manifest["parts"][1]
    (out / victim["name"] / victim["pieces"][0]["path"]).write_bytes(b"x")
    (out / "p1" / manifest["parts"][0]["pieces"][0]["path"]).unlink()
    assert len(gpu_parts.verify(out)) == 2


def carry(tmp_path: Path, part: str) -> Path:
    """The device call's working tree: only `part` of the pack came."""
    carried = tmp_path / f"call-{part}" / "demo"
    shutil.rmtree(carried, ignore_errors=True)
    shutil.copytree(tmp_path / ".gpu" / "demo" / part, carried / part)
    return carried


def test_parts_gather_over_calls_and_the_big_file_is_joined(pack):
    tmp_path, tree, manifest = pack
    stage = tmp_path / "stage" / "demo"
    names = [p["name"] for p in manifest["parts"]]
    for name in names[:-1]:
        assert gpu_parts.stash(carry(tmp_path, name), stage) == [name]
    with pytest.raises(gpu_parts.PackError, match=rf"missing part\(s\) {names[-1]} of 4.*\.gpu/demo/{names[-1]}"):
        gpu_parts.ready("demo", tmp_path / "nothing-carried", stage)
    assert gpu_parts.ready("demo", carry(tmp_path, names[-1]), stage) == stage
    for path in ("model/big.whl", "wheels/w.whl", "data/t.tsv"):
        assert (stage / path).read_bytes() == (tree / path).read_bytes()
    assert not list((stage / ".chunks").rglob("*.chunk*"))


def test_ready_names_every_missing_part(pack):
    tmp_path = pack[0]
    stage = tmp_path / "stage" / "demo"
    with pytest.raises(gpu_parts.PackError, match="no part of it on this machine"):
        gpu_parts.ready("demo", tmp_path / "empty", stage)
    with pytest.raises(gpu_parts.PackError) as err:
        gpu_parts.ready("demo", carry(tmp_path, "p2"), stage)
    assert "missing part(s) p1 p3 p4 of 4" in str(err.value) and "\n" not in str(err.value)


def test_an_altered_part_is_refused_and_a_damaged_stage_caught(pack):
    tmp_path, _, manifest = pack
    stage = tmp_path / "stage" / "demo"
    carried = carry(tmp_path, "p1")
    piece = manifest["parts"][0]["pieces"][0]["path"]
    (carried / "p1" / piece).write_bytes(b"not what was built")
    with pytest.raises(gpu_parts.PackError, match="altered"):
        gpu_parts.stash(carried, stage)
    for part in manifest["parts"]:
        gpu_parts.stash(carry(tmp_path, part["name"]), stage)
    (stage / "data" / "t.tsv").write_text("changed on the machine")
    with pytest.raises(gpu_parts.PackError, match=r"altered on this machine: data/t\.tsv"):
        gpu_parts.ready("demo", tmp_path / "empty", stage)


def test_a_part_of_another_build_restarts_the_stage(pack):
    tmp_path, tree, _ = pack
    stage = tmp_path / "stage" / "demo"
    gpu_parts.stash(carry(tmp_path, "p1"), stage)
    (tree / "data" / "t.tsv").write_bytes(b"a newer corpus")
    gpu_parts.write_parts(tree, tmp_path / ".gpu" / "demo", 100, {"use": "demo"})
    gpu_parts.stash(carry(tmp_path, "p2"), stage)
    assert [p.name for p in (stage / ".parts").iterdir()] == ["p2"]


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_requirements_the_image_lacks_are_found(tmp_path):
    datasets = fake_wheel(tmp_path, "datasets", "5.2.0", [
        "numpy>=1.17", "dill<0.4.2,>=0.3.0", "multiprocess<0.70.20", "pyarrow>=21",
        "pytest; extra == 'tests'", "pywin32; sys_platform == 'win32'"])
    trl = fake_wheel(tmp_path, "trl", "1.16.0", ["accelerate>=1.4", "datasets>=3", "transformers>=5.24"])
    need = gpu_pack.unmet([datasets, trl])
    assert sorted(need) == ["dill", "multiprocess", "transformers"]  # the image's transformers is 5.17
    transformers = fake_wheel(tmp_path, "transformers", "5.24.0", ["huggingface-hub>=1.3,<2"])
    dill = fake_wheel(tmp_path, "dill", "0.4.1", [])
    multiprocess = fake_wheel(tmp_path, "multiprocess", "0.70.19", ["dill>=0.4.1"])
    assert gpu_pack.unmet([datasets, trl, transformers, dill, multiprocess]) == {}


def test_calls_end_with_the_bench_script():
    manifest = {"parts": [{"name": "p1"}, {"name": "p2"}, {"name": "p3"}]}
    lines = gpu_pack.calls("real-model", manifest)
    assert lines[0].startswith('carry [".gpu/real-model/p1"]') and lines[0].endswith("stash real-model")
    assert lines[-1] == 'carry [".gpu/real-model/p3"]  command: bash bench/real_model_gpu.sh device'
    assert len(lines) == 3


def test_gpu_site_sh_starts_a_script_only_with_every_part(tmp_path):
    """The shell glue the bench scripts source: one error line and a failed exit while a part is missing;
    then PACK and SHARED (the ../shared folders unpacked from shared.tar) for the script."""
    import subprocess
    import tarfile

    tree = make_tree(tmp_path / "tree", {"model/m.bin": 9000, "data/t.tsv": 4000})
    (tmp_path / "src" / "lexicons").mkdir(parents=True)
    (tmp_path / "src" / "lexicons" / "詞彙.csv").write_text("zh,nan\n")
    with tarfile.open(tree / "shared.tar", "w") as tar:
        tar.add(tmp_path / "src" / "lexicons", arcname="lexicons")
    manifest = gpu_parts.write_parts(tree, tmp_path / "built" / "demo", 14000, {"use": "demo"})  # tar: 10 KiB
    assert len(manifest["parts"]) == 2
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "GPU_PACK_STAGE": str(tmp_path / "stage"),
           "GPU_PACK_ROOT": str(tmp_path / "call")}
    script = '. bench/gpu_site.sh demo; echo "PACK=$PACK"; cat "$SHARED/lexicons/詞彙.csv"'

    def call(part: str) -> subprocess.CompletedProcess:
        shutil.rmtree(tmp_path / "call", ignore_errors=True)
        shutil.copytree(tmp_path / "built" / "demo" / part, tmp_path / "call" / "demo" / part)
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False)

    first = call("p1")
    assert first.returncode == 1 and "PACK=" not in first.stdout
    assert first.stderr.strip().splitlines() == [(
        'error: gpu pack demo: missing part(s) p2 of 2: first one device call per part, carry [".gpu/demo/p2"], '
        "command `python3 bench/gpu_pack.py stash demo`, on the same warm machine")]
    second = call("p2")
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [f"PACK={tmp_path / 'stage' / 'demo'}", "zh,nan"]


def test_a_trimmed_wheel_keeps_the_wanted_libraries_and_a_matching_record(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = [f"bitsandbytes/libbitsandbytes_{v}.so" for v in ("cpu", "cuda128", "cuda130", "cuda132", "rocm64")]
    info = "bitsandbytes-0.50.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in [*libs, "bitsandbytes/__init__.py", f"{info}/METADATA"]:
            zf.writestr(name, name * 3)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},sha256=x,1\n" for n in [*libs, "bitsandbytes/__init__.py"])
                    + f"{info}/RECORD,,\n")
    out = tmp_path / "out" / wheel.name
    out.parent.mkdir()
    dropped = gpu_pack.trim_wheel(wheel, out, gpu_pack.BNB_KEEP)
    assert sorted(dropped) == [libs[1], libs[4]]
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        record = zf.read(f"{info}/RECORD").decode()
        assert zf.read(libs[2]) == (libs[2] * 3).encode()
    assert names == {libs[0], libs[2], libs[3], "bitsandbytes/__init__.py", f"{info}/METADATA", f"{info}/RECORD"}
    assert "cuda128" not in record and "rocm64" not in record and "cuda130" in record
