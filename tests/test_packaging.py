"""A non-editable install (`pip install .`) works outside the checkout: the wheel ships the shipped data.

The wheel is built from a copy of the source, installed with `--no-deps` into a fresh virtual environment
that borrows this environment's dependencies (a .pth line; nothing of the checkout is on its path), and
run from a folder outside the checkout: `toolkit tiny` needs the sample corpus (its tokenizer is trained
on it) and a Modelfile needs modelfiles/.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from toolkit import assets, ollama, prompt

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "toolkit", "modelfiles", "corpora")
RENDER = """
import sys
from pathlib import Path
import toolkit
from toolkit import ollama, prompt
values = ollama.modelfile_values(prompt.default_spec(), "m-Q4_K_M.gguf", "m", temperature=0.0, num_ctx=4096,
                                 num_predict=1024)
print(toolkit.__file__)
print(ollama.write_modelfile(Path(sys.argv[1]), "gpt-oss-harmony", values))
"""


def shipped_files() -> set[str]:
    """Package-relative names of the files the wheel must carry besides the code."""
    names = {p.relative_to(ROOT).as_posix() for p in (ROOT / "toolkit").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    for folder in assets.SHIPPED:
        names |= {f"toolkit/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / folder).rglob("*") if p.is_file()}
    return names


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the toolkit's wheel; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, cwd=tmp, env=_clean_env())
    (wheel,) = (tmp / "dist").glob("toolkit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        missing = shipped_files() - set(zf.namelist())
    assert not missing, f"the wheel lacks {sorted(missing)}: list their folder in pyproject.toml's packages"

    env_dir = tmp / "env"
    venv.create(env_dir, with_pip=False, system_site_packages=True)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = Path(subprocess.run([str(bin_dir / "python"), "-c", where], check=True, capture_output=True,
                                 text=True).stdout.strip())
    # This environment's dependencies (torch, transformers, click ...), after the venv's own site-packages;
    # a .pth line adds a folder only, so an editable toolkit installed here stays out of the new venv.
    borrowed = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (target / "borrowed-deps.pth").write_text("\n".join(borrowed) + "\n", encoding="utf-8")
    subprocess.run([*pip, "--python", str(bin_dir / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, cwd=tmp, env=_clean_env())
    return bin_dir


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_installed_wheel_renders_a_modelfile_and_writes_the_tiny_model(installed, tiny_model, tmp_path):
    outside = tmp_path / "elsewhere"  # not the checkout: nothing resolves through the working directory
    outside.mkdir()
    done = subprocess.run([str(installed / "python"), "-c", RENDER, str(outside)], cwd=outside, env=_clean_env(),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    package, modelfile = done.stdout.split()
    assert Path(package).is_relative_to(installed.parent), f"imported {package}, not the installed wheel"
    values = ollama.modelfile_values(prompt.default_spec(), "m-Q4_K_M.gguf", "m", temperature=0.0, num_ctx=4096,
                                     num_predict=1024)
    expected = ollama.write_modelfile(tmp_path, "gpt-oss-harmony", values)  # from the checkout's modelfiles/
    assert Path(modelfile).read_text(encoding="utf-8") == expected.read_text(encoding="utf-8")

    done = subprocess.run([str(installed / "toolkit"), "tiny", str(outside / "tiny")], cwd=outside,
                          env=_clean_env(), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    # The tokenizer is trained on the sample corpus: the same bytes as the checkout's means the wheel shipped it.
    assert (outside / "tiny" / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_shipped_folders_are_the_checkouts():
    assert assets.folder("modelfiles") == ROOT / "modelfiles"
    assert assets.folder("corpora") == ROOT / "corpora"
    assert ollama.template_path("gpt-oss-harmony") == ROOT / "modelfiles" / "gpt-oss-harmony.Modelfile"
    with pytest.raises(ValueError, match="not shipped"):
        assets.folder("export")
