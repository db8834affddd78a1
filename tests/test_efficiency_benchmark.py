"""benchmarks/efficiency.py at CI size: every table is produced, the whole-volume rows run the bundle's inference both
in-process and through ``python -m monai.bundle run``, and ``docs/results.md`` is left alone with ``--no-write``."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, subprocess_env


def test_efficiency_benchmark_runs_every_table_at_ci_size(tmp_path):
    results = REPO / "docs" / "results.md"
    before = results.read_bytes()
    out = tmp_path / "efficiency.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "efficiency.py"), "--networks", "enet", "--shape", "1,1,32,32",
           "--repeats", "1", "--warmup", "0", "--backends", "eager,eager_folded,ort_basic", "--volume", "2,32,32",
           "--volume_image_size", "32", "--volume_backends", "eager,onnxruntime", "--sw_batch_sizes", "2",
           "--volume_repeats", "1", "--threads", "1", "--no-write", "--json-out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["networks"]) == 1 and data["networks"][0]["latency_ms_median"] > 0
    (backend_row,) = data["backends"]
    assert backend_row["network"] == "ENet"
    assert all(backend_row[b] > 0 for b in ("eager", "eager_folded", "ort_basic"))
    volume = {(r["backend"], r["sw_batch_size"]): r for r in data["volume"]}
    assert set(volume) == {("eager", 2), ("onnxruntime", 2)}
    for row in volume.values():
        assert 0 < row["seconds_min"] <= row["seconds_median"] and row["cli_seconds"] > row["seconds_min"]
    assert "| ENet | onnxruntime | 2 |" in done.stdout
    assert results.read_bytes() == before
