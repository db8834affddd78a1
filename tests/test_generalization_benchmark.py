"""benchmarks/generalization.py at CI size: records, resumability, row overrides, settings validation."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("relkd_generalization", REPO / "benchmarks" / "generalization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_row_overrides_follow_the_bundle_defaults(gen):
    defaults = {"lambda_logits": 0.1, "lambda_km": 0.001, "lambda_aa": 0.3, "temperature": 4.0}
    assert gen.row_overrides("no_kd", defaults) == {f"distillation#{k}": 0.0 for k in gen.LAMBDAS}
    assert gen.row_overrides("full", defaults) == {"distillation#lambda_logits": 0.1, "distillation#lambda_km": 0.001,
                                                   "distillation#lambda_aa": 0.3}
    skd = gen.row_overrides("skd", defaults)
    assert skd["distillation#lambda_aa"] == 0.3 and skd["distillation#lambda_logits"] == 0.0
    assert skd["distillation#lambda_km"] == 0.0 and skd["distillation#pair_weights"] == "uniform"
    assert gen.row_overrides("full_minus_km", defaults)["distillation#lambda_km"] == 0.0


def test_rows_with_a_relational_term_are_estimated_at_its_cost(gen, tmp_path):
    assert [r for r in gen.ROWS if gen.relational(r)] == [
        "full", "full_minus_aa", "full_minus_km", "espnet_full", "erfnet_full", "gkd_full"]
    cheap = gen.make_settings(str(tmp_path), rows="no_kd,hinton")
    costly = gen.make_settings(str(tmp_path), rows="no_kd,full")
    assert gen.estimate_seconds(costly) > gen.estimate_seconds(cheap) > 0


def test_settings_are_validated(gen, tmp_path):
    with pytest.raises(ValueError, match="unknown row"):
        gen.make_settings(str(tmp_path), rows="no_kd,nope")
    with pytest.raises(ValueError, match="unknown fold"):
        gen.make_settings(str(tmp_path), folds="HK,Mars")
    with pytest.raises(ValueError, match="do not fit"):
        gen.make_settings(str(tmp_path), student_steps=100, val_every=100, last_k=3)
    s = gen.make_settings(str(tmp_path))
    assert (s.folds, s.seeds, s.rows) == (["HK", "UCL", "BMC"], [0, 1, 2], list(gen.STANDARD_ROWS))
    assert s.student_steps >= 800 and s.scale == 1.0


def test_report_compares_each_row_with_its_baseline_only_where_both_ran(gen):
    def cell(fold, seed, row, score):
        return {"fold": fold, "seed": seed, "row": row, "score": score, "per_case": {"c1": score, "c2": score - 0.1}}

    pairs = [("HK", 0), ("HK", 1), ("BMC", 0)]
    records = [cell(f, s, "no_kd", 0.70) for f, s in pairs] + [cell(f, s, "full", 0.60 + 0.01 * s) for f, s in pairs]
    records += [cell(f, s, "full_minus_aa", 0.65) for f, s in pairs]
    text = "\n".join(gen.comparison_sections(records))
    ablation = text.split("## ablations against full")[1].split("##")[0]
    assert "| full_minus_aa | 3 | +0.047 |" in ablation  # 0.65 against 0.60, 0.61, 0.60
    assert "full_minus_km" not in text and "## full against hinton" not in text
    assert "## generalizable distillation" not in text and "espnet" not in text
    records += [cell(f, s, "espnet_no_kd", 0.5) for f, s in pairs] + [cell("HK", 0, "espnet_full", 0.55)]
    espnet = "\n".join(gen.comparison_sections(records)).split("## espnet: full against no_kd")[1]
    assert "| espnet_full | 1 | +0.050 |" in espnet


def test_quick_cells_write_records_and_are_not_rerun(gen, tmp_path, capsys):
    out = tmp_path / "bench"
    gen.main(out=str(out), quick=True, rows="no_kd,hinton")
    records = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in records] == ["teacher", "no_kd", "hinton"]  # the teacher is trained for hinton
    keys = {"fold", "seed", "row", "network", "score", "steps", "lambdas", "temperature", "seconds"}
    for r in records:
        assert keys <= set(r) and r["fold"] == "HK" and r["seed"] == 0
        assert r["steps"] == 4 and 0.0 <= r["score"] <= 1.0
        assert r["held_out_steps"] == [2, 4] and r["per_case"]
    hinton = records[2]
    assert hinton["lambdas"]["lambda_km"] == 0.0 and hinton["lambdas"]["lambda_aa"] == 0.0
    assert hinton["lambdas"]["lambda_logits"] > 0 and hinton["temperature"] > 0
    cell = json.loads((out / "cells" / "HK_seed0" / "hinton" / "cell.json").read_text())
    assert cell["overrides"]["teacher_input_key"] == "teacher_image"
    assert "TeacherOutputCache(entries=" in cell["cache"]
    assert "misses=0" in cell["cache"]  # every slice the student drew was in the fold's filled cache
    assert hinton["cache_fill_seconds"] > 0 and cell["settings"]["cache"] == "fold"
    assert [s for s, _ in cell["curve"]] == [2, 4]
    _check_fill_is_reproducible(gen, out)
    assert (out / "curves" / "curves_HK_seed0.png").is_file()
    assert "| hinton | 1 |" in (out / "report.md").read_text()

    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/cell.json")}
    capsys.readouterr()
    gen.main(out=str(out), quick=True, rows="no_kd")
    assert "1 cells, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/*/cell.json")} == before
    assert len(json.loads((out / "results.json").read_text())) == 3

    # --merge: an earlier results.json joins the report; this run's cells replace its records of the same key
    stale = {**records[1], "score": -1.0}
    other = {**records[1], "fold": "UCL", "seed": 1, "score": 0.5}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps([other, stale]))
    text = earlier.read_text()
    gen.main(out=str(out), quick=True, rows="no_kd", merge=str(earlier))
    merged = json.loads((out / "results.json").read_text())
    assert [(r["fold"], r["seed"], r["row"]) for r in merged] == [
        ("HK", 0, "teacher"), ("HK", 0, "no_kd"), ("HK", 0, "hinton"), ("UCL", 1, "no_kd")]
    assert merged[1]["score"] == records[1]["score"] and merged[3]["score"] == 0.5
    assert "| UCL | 1 | no_kd |" in (out / "report.md").read_text()
    assert earlier.read_text() == text  # only read

    # --check: the re-run of a cell against a results.json; each record carries its environment
    env = records[1]["environment"]
    assert {"torch", "monai", "numpy", "cpu", "cpu_capability", "torch_threads"} <= set(env)
    capsys.readouterr()
    gen.main(out=str(out), quick=True, rows="no_kd", check=str(out / "results.json"))
    printed = capsys.readouterr().out
    assert "HK seed 0 no_kd" in printed and "reproduced; same environment" in printed
    assert (out / "check.txt").read_text().endswith("same environment\n")
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps([{**records[1], "score": records[1]["score"] + 0.02,
                                    "environment": {**env, "torch": "0.0"}}]))
    with pytest.raises(SystemExit) as exc:
        gen.main(out=str(out), quick=True, rows="no_kd", check=str(shifted))
    assert exc.value.code == 1
    assert "NOT reproduced" in capsys.readouterr().out
    assert f"torch 0.0 -> {env['torch']}" in (out / "check.txt").read_text()


def _check_fill_is_reproducible(gen, out):
    """Filling the fold's cache again (e.g. from another seed's job) writes the same entries, bit for bit."""
    import torch

    from monai_relkd.profiling import TorchThreads

    models = out / "cells" / "HK_seed0" / "teacher" / "models"
    (first,) = models.glob("teacher_outputs_*.pt")
    kept = first.with_name("kept.pt")
    first.rename(kept)
    s = gen.make_settings(str(out), quick=True)
    common = {"dataset_dir": str(out / "data"), "datalist_file": str(out / "cells" / "HK_seed0" / "datalist.json"),
              "test_site": "HK", "seed": 1, "image_size": s.image_size, "num_samples": s.num_samples,
              "batch_size": s.batch_size, "num_workers": 0, "val_every_steps": s.val_every}
    bundle = gen.find_bundles_dir(None) / "prostate_mri_student_enet"
    with TorchThreads(1):  # as main() ran it (the normalisation's sums, hence the slices, depend on the threads)
        assert gen.fill_fold_cache(bundle, common, str(models / "model.pt"), s.batch_size) > 0
        assert gen.fill_fold_cache(bundle, common, str(models / "model.pt"), s.batch_size) == 0  # exists: kept
    a, b = (torch.load(p, weights_only=True)["entries"] for p in (kept, first))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k][0], b[k][0]) and all(map(torch.equal, a[k][1], b[k][1])) for k in a)


def test_check_lines_compare_scores_and_environments(gen):
    ref = [{"fold": "HK", "seed": 0, "row": "no_kd", "score": 0.656},
           {"fold": "HK", "seed": 1, "row": "no_kd", "score": 0.700, "environment": {"torch": "a", "cpus": 2}}]
    here = [{"fold": "HK", "seed": 0, "row": "no_kd", "score": 0.694},
            {"fold": "HK", "seed": 1, "row": "no_kd", "score": 0.705, "environment": {"torch": "b", "cpus": 2}},
            {"fold": "UCL", "seed": 0, "row": "no_kd", "score": 0.7}]
    lines, ok = gen.check_lines(ref, here)
    assert not ok
    assert lines[0].startswith("HK seed 0 no_kd: 0.6940 here, 0.6560 in the reference, difference +0.0380: NOT")
    assert "does not record its environment" in lines[0]
    assert "+0.0050: reproduced; environment differs: torch a -> b" in lines[1]
    assert lines[2] == "UCL seed 0 no_kd: no score to compare in the reference"
    assert gen.check_lines(ref, here[1:])[1] is True
    assert gen.check_lines(ref, here[2:])[1] is False  # nothing compared is not a reproduction


def test_merge_rejects_a_file_that_is_not_a_results_list(gen, tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"fold": "HK"}))
    with pytest.raises(ValueError, match=f"{bad}: expected a JSON list"):
        gen.main(out=str(tmp_path / "out"), quick=True, merge=str(bad), dry_run=True)
    bad.write_text("[{")
    with pytest.raises(ValueError, match=f"{bad}: cannot read"):
        gen.load_records(bad)
    assert not (tmp_path / "out").exists()


def test_gkd_rows_add_their_config_and_read_the_teacher(gen):
    defaults = {"lambda_logits": 0.1, "lambda_km": 1.0, "lambda_aa": 1.0, "temperature": 4.0}
    assert gen.config_files("no_kd") == ("train.json",)
    assert gen.config_files("gkd") == ("train.json", "gkd.json") == gen.config_files("gkd_full")
    assert not gen.distils("no_kd") and gen.distils("hinton")
    assert gen.distils("gkd") and gen.distils("gkd_full")  # GKD alone zeroes every λ yet needs the teacher
    assert gen.row_overrides("gkd", defaults) == gen.row_overrides("no_kd", defaults)
    assert gen.row_overrides("gkd_full", defaults) == gen.row_overrides("full", defaults)


def test_quick_gkd_cell_pretrains_the_teacher_msan_once_and_reports_fsd(gen, tmp_path):
    out = tmp_path / "bench"
    gen.main(out=str(out), quick=True, rows="no_kd,gkd")
    records = {r["row"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(records) == {"teacher", "no_kd", "gkd"}
    msan = out / "cells" / "HK_seed0" / "teacher" / "models" / "msan_teacher.pt"
    assert msan.is_file() and records["gkd"]["msan_pretrain_seconds"] > 0
    assert "msan_pretrain_seconds" not in records["no_kd"]
    taps = {row: records[row]["fsd"]["tap"] for row in ("no_kd", "gkd")}
    assert taps["no_kd"] == taps["gkd"] and records["teacher"]["fsd"]["tap"] != taps["gkd"]
    assert all(records[row]["fsd"]["fsd"] >= 0 for row in records)
    report = (out / "report.md").read_text()
    assert "| gkd | 1 |" in report and "FSD" in report


def test_teacher_output_stride_reaches_the_teacher_and_the_students_that_read_it(gen, tmp_path):
    with pytest.raises(ValueError, match="teacher_output_stride must be 8 or 16"):
        gen.make_settings(str(tmp_path), quick=True, teacher_output_stride=4)
    s = gen.make_settings(str(tmp_path), quick=True, teacher_output_stride=8)
    assert s.teacher_overrides("no_kd") == {"distillation#teacher#network_def#output_stride": 8}
    assert "teacher_output_stride" not in s.cell_settings("no_kd", "HK")  # reads no teacher: its cells stay valid
    assert gen.make_settings(str(tmp_path), quick=True).teacher_overrides("teacher") == {}
    out = tmp_path / "os8"
    gen.main(out=str(out), quick=True, rows="hinton", teacher_output_stride=8)
    cells = {r: json.loads((out / "cells" / "HK_seed0" / r / "cell.json").read_text()) for r in ("teacher", "hinton")}
    assert cells["teacher"]["overrides"]["network_def#output_stride"] == 8
    assert cells["hinton"]["overrides"]["distillation#teacher#network_def#output_stride"] == 8
    assert cells["teacher"]["settings"]["teacher_output_stride"] == 8
    assert cells["hinton"]["settings"]["teacher_output_stride"] == 8
    assert cells["teacher"]["record"]["fsd"]["tap"] == "aspp"


def test_teacher_precision_trains_the_teacher_under_autocast_and_re_runs_the_students_that_read_it(gen, tmp_path):
    with pytest.raises(ValueError, match="teacher_precision must be"):
        gen.make_settings(str(tmp_path), quick=True, teacher_precision="int8")
    s = gen.make_settings(str(tmp_path), quick=True)
    assert s.teacher_training_overrides()["train#inferer"] == {
        "_target_": "monai_relkd.inferers.AutocastInferer", "dtype": "bfloat16"}
    assert gen.make_settings(str(tmp_path), quick=True, teacher_precision="float32").teacher_training_overrides() == {}
    assert s.cell_settings("teacher", "HK")["teacher_precision"] == "bfloat16"
    assert s.cell_settings("full", "HK")["teacher_precision"] == "bfloat16"
    assert "teacher_precision" not in s.cell_settings("no_kd", "HK")  # reads no teacher: its cells stay valid
    # a student distilled from a teacher of other steps is not "done": before, it was kept after a teacher re-run
    longer = gen.make_settings(str(tmp_path), quick=True, teacher_steps=6)
    assert longer.cell_settings("full", "HK") != s.cell_settings("full", "HK")
    assert longer.cell_settings("no_kd", "HK") == s.cell_settings("no_kd", "HK")


def test_teacher_steps_are_given_per_fold_and_re_run_only_that_fold_s_distilled_students(gen, tmp_path):
    assert gen.parse_teacher_steps("900,UCL=1600") == (900, {"UCL": 1600})
    assert gen.parse_teacher_steps(1200) == (1200, {})
    assert gen.parse_teacher_steps({"HK": 300}) == (None, {"HK": 300})
    for bad, match in (("900,1200", "two numbers"), ("UCL=0", "not a number"), ("UCL=x", "not a number"),
                       ("=900", "not a number"), ("", None)):
        with pytest.raises(ValueError, match=match):
            gen.make_settings(str(tmp_path), teacher_steps=bad)
    with pytest.raises(ValueError, match=r"unknown fold\(s\) \['Mars'\]"):
        gen.make_settings(str(tmp_path), teacher_steps="900,Mars=1600")
    with pytest.raises(ValueError, match=r"no steps for fold\(s\) \['BMC'\]"):
        gen.make_settings(str(tmp_path), teacher_steps="HK=900,UCL=1600")
    with pytest.raises(ValueError, match="do not fit in 200 steps"):
        gen.make_settings(str(tmp_path), teacher_steps="900,BMC=200", val_every=100, last_k=3)

    s = gen.make_settings(str(tmp_path))  # the default: UCL's teacher at its plateau, the others at 900 steps
    assert [s.teacher_steps_for(f) for f in s.folds] == [900, 1600, 900]
    assert s.cell_settings("teacher", "UCL")["steps"] == 1600
    assert s.cell_settings("full", "UCL")["teacher_steps"] == 1600
    flat = gen.make_settings(str(tmp_path), teacher_steps=900)
    for fold in ("HK", "BMC"):  # other folds' cells stay done when one fold's teacher changes
        assert all(s.cell_settings(r, fold) == flat.cell_settings(r, fold) for r in ("teacher", "no_kd", "full"))
    assert s.cell_settings("no_kd", "UCL") == flat.cell_settings("no_kd", "UCL")
    assert s.cell_settings("full", "UCL") != flat.cell_settings("full", "UCL")
    assert gen.estimate_seconds(s) > gen.estimate_seconds(flat)
    named = gen.make_settings(str(tmp_path), folds="HK", teacher_steps="HK=300")
    assert named.teacher_steps_for("HK") == 300
    # a child process gets the same steps from the parent's flag
    argv = gen.child_command({"teacher_steps": "900,UCL=1600"}, gen.plan_jobs(s)[0])
    assert "--teacher_steps=900,UCL=1600" in argv


def test_fsd_builds_the_network_with_the_cell_s_overrides():
    from monai_relkd.evaluation.fsd import _bundle_parts

    teacher = REPO / "bundles" / "prostate_mri_teacher"
    assert _bundle_parts(teacher, 32)[0].config["output_stride"] == 16
    assert _bundle_parts(teacher, 32, {"network_def#output_stride": 8})[0].config["output_stride"] == 8


def test_plan_jobs_trains_each_fold_teacher_before_its_students(gen, tmp_path):
    jobs = gen.plan_jobs(gen.make_settings(str(tmp_path)))
    assert [j.name for j in jobs[:3]] == ["UCL_teacher", "HK_teacher", "BMC_teacher"]  # the longest teacher first
    students = {j.name: j for j in jobs[3:]}
    assert len(students) == 9 and students["UCL_seed2"].after == ["UCL_teacher"]
    assert students["UCL_seed2"].rows == ["no_kd", "hinton", "skd", "full"] and students["UCL_seed2"].seeds == [2]
    assert gen.runs_side_by_side(jobs)

    alone = gen.plan_jobs(gen.make_settings(str(tmp_path), rows="no_kd"))  # no teacher needed, nothing to wait for
    assert [(j.name, j.after) for j in alone][:2] == [("HK_seed0", []), ("HK_seed1", [])] and len(alone) == 9
    each = gen.plan_jobs(gen.make_settings(str(tmp_path), folds="HK", rows="teacher,full", teacher_seed="each"))
    assert [(j.name, j.rows, j.after) for j in each][0] == ("HK_seed0", ["teacher", "full"], [])
    gkd = gen.plan_jobs(gen.make_settings(str(tmp_path), folds="HK", rows="no_kd,gkd"))
    assert {j.name: j.after for j in gkd}["HK_seed2"] == ["HK_teacher", "HK_seed0"]  # one MSAN pre-training
    every_fold = [j.name for j in gen.plan_jobs(gen.make_settings(str(tmp_path), rows="gkd"))]
    assert every_fold[3:6] == ["HK_seed0", "UCL_seed0", "BMC_seed0"]  # no worker waits at the end for a first seed

    s = gen.make_settings(str(tmp_path), folds="HK", rows="hinton")  # a finished teacher is not waited for
    cell = tmp_path / "cells" / "HK_seed0" / "teacher"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"settings": s.cell_settings("teacher", "HK")}))
    assert [(j.name, j.after) for j in gen.plan_jobs(s)] == [(f"HK_seed{i}", []) for i in range(3)]
    forced = gen.make_settings(str(tmp_path), folds="HK", rows="hinton", force=True)  # --force: the rows asked for
    assert not forced.cell_todo("HK", 0, "teacher") and forced.cell_todo("HK", 0, "hinton")
    assert [j.name for j in gen.plan_jobs(forced)] == ["HK_seed0", "HK_seed1", "HK_seed2"]
    refit = gen.make_settings(str(tmp_path), folds="HK", rows="teacher,hinton", force=True)
    assert [(j.name, j.after) for j in gen.plan_jobs(refit)][:2] == [("HK_teacher", []), ("HK_seed0", ["HK_teacher"])]
    chain = gen.plan_jobs(gen.make_settings(str(tmp_path), quick=True, rows="hinton", force=True))
    assert [j.name for j in chain] == ["HK_teacher", "HK_seed0"] and not gen.runs_side_by_side(chain)


def test_run_jobs_keeps_the_order_logs_each_child_and_skips_what_a_failure_blocks(gen, tmp_path):
    Job = gen.Job
    jobs = [Job("T", "HK", [0], ["teacher"]), Job("bad", "UCL", [0], ["teacher"]),
            Job("S", "HK", [0], ["no_kd"], ["T"]), Job("blocked", "UCL", [0], ["no_kd"], ["bad"])]
    order = tmp_path / "order.txt"
    script = ("import os, sys; open({order!r}, 'a').write(sys.argv[1] + ' ' + os.environ['OMP_NUM_THREADS'] + '\\n');"
              " print('working on', sys.argv[1]); sys.exit(3 if sys.argv[1] == 'bad' else 0)")
    command = lambda job: [sys.executable, "-c", script.format(order=str(order)), job.name]  # noqa: E731
    failed = gen.run_jobs(jobs, command, workers=2, threads=1, logs=tmp_path / "logs")
    assert sorted(failed) == ["bad", "blocked"]
    ran = order.read_text().split("\n")[:-1]
    assert sorted(ran) == ["S 1", "T 1", "bad 1"]
    assert ran.index("T 1") < ran.index("S 1")
    header, output = (tmp_path / "logs" / "S.log").read_text().splitlines()
    assert header.startswith("=== ") and header.endswith(" S: no_kd ===") and output == "working on S"
    assert not (tmp_path / "logs" / "blocked.log").exists()
    with pytest.raises(ValueError, match="wait for"):  # S waits for T, which is not given: it would never start
        gen.run_jobs(jobs[2:3], command, workers=1, threads=1, logs=tmp_path / "logs")
    assert gen.run_jobs([Job("S", "HK", [0], ["no_kd"])], command, workers=1, threads=1, logs=tmp_path / "logs") == []
    assert (tmp_path / "logs" / "S.log").read_text().count("working on S") == 2  # the first run's log is kept


def test_workers_give_the_cells_one_process_gives(gen, tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "two"
    gen.main(out=str(out), quick=True, rows="no_kd", seeds="0,1", workers=2, threads=1)
    printed = capsys.readouterr().out
    assert "2 jobs, 2 at a time with 1 thread(s) each" in printed and "HK_seed1: done in" in printed
    records = {r["seed"]: r for r in json.loads((out / "results.json").read_text())}
    assert sorted(records) == [0, 1] and (out / "logs" / "HK_seed1.log").is_file()
    assert {r["environment"]["torch_threads"] for r in records.values()} == {1}
    assert torch.get_num_threads() == threads  # main leaves the caller's setting as it was

    alone = tmp_path / "one"
    gen.main(out=str(alone), quick=True, rows="no_kd", seeds="1", workers=1, threads=1)
    record = json.loads((alone / "results.json").read_text())[0]
    assert record["score"] == records[1]["score"] and record["per_case"] == records[1]["per_case"]
