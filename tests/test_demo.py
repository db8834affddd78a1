"""relkd demo at toy size: the step schedule reaches every bundle, the distilled student reads the teacher cache."""

from __future__ import annotations

import json

from monai_relkd.demo import run_demo


def test_demo_runs_on_the_step_schedule_with_the_teacher_cache(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out=out, scale=0.15, size=32, image_size=32, teacher_steps=3, student_steps=3, val_every=3,
                      num_samples=2, batch_size=4)
    names = list(result["models"])
    assert names == ["teacher", "enet (no KD)", "enet + relational KD"]
    for key in ("teacher", "student_nokd", "student_kd"):
        assert (out / key / "models" / "model.pt").is_file()
        assert (out / key / "eval" / "summary.json").is_file()
    held = {n: m["per_site"]["HK"]["dice"]["mean"] for n, m in result["models"].items()}
    assert all(0.0 <= d <= 1.0 for d in held.values())
    run = json.loads((out / "run.json").read_text())
    assert [m["role"] for m in run["models"]] == ["teacher", "baseline", "student"]
    assert "HK" in (out / "demo_table.md").read_text()
