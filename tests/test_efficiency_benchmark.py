"""benchmarks/efficiency.py at CI size: every table is produced, the whole-volume rows run the bundle's inference both
in-process and through ``python -m monai.bundle run``, and ``docs/results.md`` is left alone with ``--no-write``; its
python-fire command line accepts every documented spelling (measurements stubbed out)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import fire
import pytest

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


def _stubbed_efficiency(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Dict[str, Any]]:
    """benchmarks/efficiency.py with its measurements and writers replaced by recorders of their arguments."""
    spec = importlib.util.spec_from_file_location("relkd_efficiency", REPO / "benchmarks" / "efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen: Dict[str, Any] = {}

    def record(name: str, result: Any) -> Any:
        def stub(*args: Any) -> Any:
            seen[name] = args
            return result
        return stub

    monkeypatch.setattr(mod, "network_rows", record("network_rows", [{"latency_ms_median": 1.0}]))
    monkeypatch.setattr(mod, "backend_rows", record("backend_rows", [{"network": "ENet"}]))
    monkeypatch.setattr(mod, "volume_rows", record("volume_rows", [{"backend": "eager"}]))
    monkeypatch.setattr(mod, "write_section", record("write_section", None))
    for name in ("_table", "_backend_table", "_volume_table", "_section"):
        monkeypatch.setattr(mod, name, record(name, ""))
    return mod, seen


@pytest.mark.parametrize("argv", [
    ["--threads", "2"],
    ["--threads=2", "--no-write"],
    ["--no_write", "--threads", "2"],
])
def test_efficiency_cli_documented_spellings(monkeypatch, argv: List[str]):
    mod, seen = _stubbed_efficiency(monkeypatch)
    fire.Fire(mod.main, command=argv)
    keys, shape, repeats, warmup, threads = seen["network_rows"]
    assert (keys, shape, repeats, warmup, threads) == (["teacher", "enet", "espnet", "erfnet"], (1, 1, 384, 384), 20,
                                                       3, 2)
    assert seen["backend_rows"][1] == list(mod.BACKENDS)
    assert seen["volume_rows"][1:6] == (["eager", "onnxruntime"], (24, 384, 384), [1, 16], 3, 2)
    assert seen["volume_rows"][6] is None
    wrote = "write_section" in seen
    assert wrote == (not any(a.startswith("--no") for a in argv))
    if wrote:
        assert seen["write_section"][0] == REPO / "docs" / "results.md"


def test_efficiency_cli_lists_flags_and_hyphens(monkeypatch, tmp_path: Path):
    mod, seen = _stubbed_efficiency(monkeypatch)
    out = tmp_path / "e.json"
    fire.Fire(mod.main, command=["--networks", "enet", "--shape", "1x1x32x32", "--backends", "eager,ort_basic",
                                 "--volume", "2,32,32", "--volume_image_size", "32", "--volume-backends", "onnxruntime",
                                 "--sw_batch_sizes", "2", "--volume-repeats", "1", "--json-out", str(out),
                                 "--results", str(tmp_path / "r.md")])
    assert seen["network_rows"][:2] == (["enet"], (1, 1, 32, 32))
    assert seen["backend_rows"][1] == ["eager", "ort_basic"]
    assert seen["volume_rows"][:7] == (["enet"], ["onnxruntime"], (2, 32, 32), [2], 1, None, 32)
    assert seen["write_section"][0] == tmp_path / "r.md"
    assert json.loads(out.read_text())["volume"] == [{"backend": "eager"}]


def test_efficiency_cli_no_volume_and_errors(monkeypatch, capsys):
    mod, seen = _stubbed_efficiency(monkeypatch)
    fire.Fire(mod.main, command=["--no-volume", "--no-write", "--networks", "teacher,enet"])
    assert "volume_rows" not in seen and "write_section" not in seen
    assert seen["network_rows"][0] == ["teacher", "enet"]
    for argv in (["--networks", "resnet"], ["--backends", "cuda"], ["--bogus", "1"], ["2"]):
        with pytest.raises(SystemExit) as exc:
            fire.Fire(mod.main, command=argv)
        assert exc.value.code == 2, argv
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        fire.Fire(mod.main, command=["--help"])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert "--no_write" in captured.out + captured.err  # fire shows the help on stderr when it is not a terminal
