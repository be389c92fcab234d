"""toolkit.resources: the figures each stage's manifest records (wall time, peak RSS, GPU, disk high-water mark)."""

from __future__ import annotations

import subprocess
import sys
import time

from toolkit import config, corpus, resources


def test_disk_high_water_mark_sees_a_deleted_intermediate(tmp_path):
    with resources.Usage(watch=tmp_path, interval=0.01) as usage:
        (tmp_path / "intermediate.bin").write_bytes(b"x" * 300_000)
        time.sleep(0.3)
        (tmp_path / "intermediate.bin").unlink()
        (tmp_path / "final.bin").write_bytes(b"y" * 1000)
        figures = usage.figures()
    assert figures["disk_final_bytes"] == 1000
    assert figures["disk_peak_bytes"] >= 300_000
    assert figures["disk_folder"] == tmp_path.name


def test_rss_figures_are_lifetime_marks(tmp_path):
    usage = resources.Usage()
    block = bytearray(200 * 2**20)  # 200 MiB touched: raises this process's high-water mark unless it was higher
    block[:: 4096] = b"x" * len(block[:: 4096])
    figures = usage.figures()
    assert figures["peak_rss_bytes"] >= max(figures["peak_rss_bytes_at_start"], 200 * 2**20)
    assert "disk_peak_bytes" not in figures and figures["wall_seconds"] >= 0
    del block


def test_figures_never_import_torch():
    code = ("import sys; from toolkit import resources; f = resources.Usage().figures(); "
            "print(f['gpu'], 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["None", "False"]


def test_prep_manifest_records_resources(sample_tsv, tmp_path):
    manifest = corpus.prepare(config.build("prep"), sample_tsv, tmp_path / "prep")
    res = manifest["metrics"]["resources"]
    assert res["peak_rss_bytes"] > 0 and res["wall_seconds"] > 0 and res["gpu"] is None
    summary = resources.summary(res)
    assert summary.startswith("peak RSS ") and "GiB" in summary
