"""What a stage run cost: wall time, peak host RSS, peak GPU memory, and a folder's disk high-water mark.

    usage = resources.Usage()                      # or: with resources.Usage(watch=out_dir) as usage:
    ...                                            #        ...the stage's work...
    metrics["resources"] = usage.figures()         #        metrics["resources"] = usage.figures()

Host RSS comes from `getrusage`. `ru_maxrss` is a high-water mark over the whole life of the process, not
of the stage: when several stages run in one process (`toolkit run`, tests), a stage that stays below an
earlier peak cannot be told apart from it. So the figures give the mark at the start and at the end
(`peak_rss_bytes_at_start`, `peak_rss_bytes`): when they differ, the stage set the peak; when they are equal,
the stage's own peak is at most that. Child processes (llama.cpp's converter) are `RUSAGE_CHILDREN`: the
largest peak of any child this process has waited for, again lifetime-wide.

GPU figures are torch's own (`max_memory_allocated` / `max_memory_reserved`, per device, peak since CUDA
was initialised or last reset), read only when torch is already imported and CUDA initialised: this module
never imports torch nor starts CUDA. The same start/end pairing applies.

`watch=FOLDER` samples the folder's size (sum of its files, temporary ones included) in a background thread
every `interval` seconds: the largest sample and the final size are the disk figures. A sampler can miss a
peak shorter than its interval; the writers here only grow files and rename them, so the final size and
the peak differ only by files deleted during the run (a float GGUF intermediate, for instance).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

GIB = 2**30


def peak_rss_bytes(children: bool = False) -> int:
    """ru_maxrss in bytes (Linux reports KiB, macOS bytes): this process's lifetime peak, or its children's."""
    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # renamed or removed while we looked
                pass
    return total


def gpu_peaks() -> list[dict[str, int]] | None:
    """torch's peak allocated/reserved bytes per device, or None when CUDA is not in use in this process."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return [{"device": i, "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(i)),
             "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(i))} for i in range(torch.cuda.device_count())]


class Usage:
    """Resource figures of one stage run, from construction to `figures()`; a context manager with `watch`."""

    def __init__(self, watch: str | Path | None = None, interval: float = 0.2):
        self.watch = Path(watch) if watch is not None else None
        self.interval = interval
        self.started = time.monotonic()
        self.rss_at_start = peak_rss_bytes()
        self.children_at_start = peak_rss_bytes(children=True)
        self.gpu_at_start = gpu_peaks()
        self.disk_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.watch is not None:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="disk-usage", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _sample(self) -> int:
        size = folder_bytes(self.watch)
        self.disk_peak = max(self.disk_peak, size)
        return size

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def figures(self) -> dict[str, Any]:
        """The figures so far (a manifest's metrics["resources"])."""
        out: dict[str, Any] = {
            "wall_seconds": round(time.monotonic() - self.started, 2),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_rss_bytes_at_start": self.rss_at_start,
            "children_peak_rss_bytes": peak_rss_bytes(children=True),
            "children_peak_rss_bytes_at_start": self.children_at_start,
            "gpu": gpu_peaks(),
            "gpu_at_start": self.gpu_at_start,
        }
        if self.watch is not None:
            final = self._sample()
            out.update(disk_peak_bytes=self.disk_peak, disk_final_bytes=final, disk_folder=self.watch.name)
        return out


def summary(figures: dict[str, Any]) -> str:
    """One short line for a stage's log: 'peak RSS 1.2 GiB (converter 0.8 GiB), disk peak 12.8 GiB'."""
    parts = [f"peak RSS {figures['peak_rss_bytes'] / GIB:.2f} GiB"]
    if figures.get("children_peak_rss_bytes"):
        parts[-1] += f" (subprocess {figures['children_peak_rss_bytes'] / GIB:.2f} GiB)"
    if figures.get("gpu"):
        parts.append(f"GPU peak {max(d['peak_allocated_bytes'] for d in figures['gpu']) / GIB:.2f} GiB")
    if "disk_peak_bytes" in figures:
        parts.append(f"disk peak {figures['disk_peak_bytes'] / GIB:.2f} GiB")
    return ", ".join(parts)
