"""Run one pipeline stage as a child process and print what it cost, as one JSON line on stdout.

    python bench/measure.py --name merge-mxfp4 --out-dir RUN/merge --log stages.jsonl -- toolkit merge ...

Figures: wall time, peak host RSS of the stage (the largest resident set among the processes it waited for:
getrusage(RUSAGE_CHILDREN), so a converter subprocess counts too), bytes in --out-dir when it ends, the
highest that folder reached while it ran (sampled every --interval seconds: the disk high-water mark) and,
where nvidia-smi answers, the highest GPU memory in use on the machine while it ran.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolkit.resources import folder_bytes


def gpu_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return max(int(x) for x in out.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--out-dir", type=Path, action="append", default=[],
                        help="folder(s) the stage writes (disk written and high-water mark)")
    parser.add_argument("--log", type=Path, help="append the JSON line to this file too")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    peaks = {"disk": 0, "gpu": None}
    stop = threading.Event()

    def sample() -> None:
        while True:
            peaks["disk"] = max(peaks["disk"], sum(folder_bytes(d) for d in args.out_dir))
            used = gpu_used_mib()
            if used is not None:
                peaks["gpu"] = max(peaks["gpu"] or 0, used)
            if stop.wait(args.interval):
                return

    thread = threading.Thread(target=sample, daemon=True)
    started = time.monotonic()
    thread.start()
    returncode = subprocess.call(command)
    stop.set()
    thread.join()
    final = sum(folder_bytes(d) for d in args.out_dir)
    row = {
        "stage": args.name, "returncode": returncode, "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "disk_written_gb": round(final / 1e9, 2), "disk_high_water_gb": round(max(peaks["disk"], final) / 1e9, 2),
        "gpu_peak_used_gib": None if peaks["gpu"] is None else round(peaks["gpu"] / 1024, 2),
        "command": " ".join(command),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.log:
        with open(args.log, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return returncode


if __name__ == "__main__":
    sys.exit(main())
