"""llama.cpp's part of `toolkit export` (quantize, verify) in a fresh Python process of its own.

A process that has loaded torch and transformers is no place for a CUDA build of llama-cpp-python: on the lent
H200 (2026-12-02, llama-cpp-python 0.3.36 built with CUDA, torch 2.11) `toolkit export` segfaulted in its GGUF
check however it was configured (GPU, `export.n_gpu_layers=0`, no GPU visible), while the same loads passed in
processes that held llama.cpp alone (`bench/llama_gpu_smoke.py`). So export keeps torch (the reference logits)
in its own process and hands each llama.cpp step to a child that imports only llama-cpp-python, numpy and the
toolkit's light modules: `export.llama_process = "child"` (the default). A crash there is one clear error, not
a dead CLI. `same` runs the steps in the export's process (as before; used by tests that patch llama.cpp).
On the H200 on 2026-12-03 the child's quantize ran but its check still crashed (SIGSEGV) with every layer on the
GPU, with none, and with no GPU visible, while `bench/llama_gpu_smoke.py` loaded and checked the base model's file
in processes of its own (bench/results/export-gpu-2026-12-03.md, glossary-2026-12-03.md). Cause not found; the
error names the way out (`export.verify=false`, or a CPU build), and the child prints its Python stack when it
crashes (faulthandler) so the next log shows which call.

    python -m toolkit.llama_worker JOB.pkl RESULT.pkl LOG_LEVEL      (what `run` starts; not for users)
"""

from __future__ import annotations

import faulthandler
import logging
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from toolkit.errors import ExternalToolError

STEPS = ("quantize", "verify")


class WorkerCrashed(ExternalToolError):
    """The worker process died by a signal (a crash inside llama.cpp), not by an error it reported."""


def run(step: str, *args: Any) -> Any:
    """`toolkit.gguf.<step>(*args)` in a fresh process; its return value, or ExternalToolError when it failed."""
    if step not in STEPS:
        raise ValueError(f"llama_worker: unknown step {step!r}")
    with tempfile.TemporaryDirectory(prefix="toolkit-llama-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        with open(job, "wb") as f:
            pickle.dump((step, args), f, protocol=pickle.HIGHEST_PROTOCOL)
        level = logging.getLogger("toolkit").getEffectiveLevel()
        # stderr is the export's: llama.cpp's messages and the child's log lines appear as they come
        proc = subprocess.run(command(job, result, level), check=False)
        if proc.returncode != 0:
            error = WorkerCrashed if proc.returncode < 0 else ExternalToolError
            raise error(f"llama.cpp {step} ({describe(args)}) failed in its worker process: "
                        f"{exit_reason(proc.returncode)}; see the log above. A CUDA build of "
                        "llama-cpp-python that crashes here: export with --set export.verify=false and "
                        "check the files with `toolkit eval`, or use a CPU build.")
        with open(result, "rb") as f:
            return pickle.load(f)


def command(job: Path, result: Path, level: int) -> list[str]:
    return [sys.executable, "-m", "toolkit.llama_worker", str(job), str(result), str(level)]


def describe(args: tuple[Any, ...]) -> str:
    return Path(args[0]).name if args else ""


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def main(argv: list[str]) -> int:
    job, result, level = argv
    faulthandler.enable()  # a crash inside llama.cpp leaves the Python stack (which call) in the export's log
    logging.basicConfig(level=int(level), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with open(job, "rb") as f:
        step, args = pickle.load(f)
    from toolkit import gguf

    value = getattr(gguf, step)(*args)
    with open(result, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
