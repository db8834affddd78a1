"""Every bad input and fault of ``docs/reliability.md``, tried for real, and the table of what the user sees.

    PYTHONPATH=plugin python benchmarks/reliability.py [--out reliability_run]

Runs, in a scratch folder (nothing in the repository is touched): a real training of the ENet student bundle
(teacher-free, every lambda 0, 32 px synthetic data) SIGKILLed inside a ``model.pt`` write, inside a
``checkpoint_last.pt`` write and at a random moment, a second training on the same bundle, a run shorter than
``val_interval``; inference on a folder of bad files; ``relkd datalist`` on a tree with an unusable site;
``relkd package`` with a truncated ``model.pt`` and a symbolic link out of the bundle. Each row says what the user
sees (the first line of the message, as printed) and whether anything was lost (checked, not assumed). Prints the
Markdown table; takes 2-4 minutes on 2 CPU cores. Exit status 1 if any "nothing lost" check fails.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "bundles" / "prostate_mri_student_enet"
SLOW = "MONAI_RELKD_FAULT_SLOW_WRITE"
ROWS: list[tuple[str, str, str]] = []


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(REPO / "plugin") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _row(fault: str, sees: str, ok: bool, detail: str = "") -> None:
    sees = " ".join(sees.split())[:220].replace("|", "\\|")
    ROWS.append((fault, sees, ("yes" if ok else "**NO**") + (f" ({detail})" if detail else "")))
    print(f"[{'ok' if ok else 'LOST'}] {fault}: {sees}", flush=True)


def _first(text: str, *needles: str) -> str:
    for line in text.splitlines():
        if any(n in line for n in needles):
            return line.split(" - ", 3)[-1].strip()
    return "(nothing printed)"


def _train_cmd(data: Path, out: Path, **extra) -> list[str]:
    configs = STUDENT / "configs"
    overrides = {"bundle_root": STUDENT, "dataset_dir": data, "test_site": "HK", "image_size": 32, "num_steps": 12,
                 "val_every_steps": 2, "num_samples": 2, "batch_size": 4, "ckpt_dir": out / "models",
                 "output_dir": out / "eval", "log_dir": out / "runs", "teacher_ckpt": out / "none.pt",
                 "distillation#lambda_logits": 0, "distillation#lambda_km": 0, "distillation#lambda_aa": 0, **extra}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(configs / "train.json"),
           "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def _loads(models: Path) -> bool:
    import torch

    from monai_relkd.networks import ENet

    if not (models / "model.pt").exists():
        return True  # nothing to lose yet
    ENet(1, 2).load_state_dict(torch.load(models / "model.pt", weights_only=True))
    return True


def _wait(cond, proc, timeout=240) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def training_faults(root: Path, data: Path) -> None:
    import torch

    run = lambda out, **kw: subprocess.run(_train_cmd(data, out, **kw), env=_env(), capture_output=True, text=True,
                                           timeout=600)
    ref = run(root / "ref")
    ref_steps = torch.load(root / "ref" / "models" / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"]
    models = root / "cut" / "models"
    log = open(root / "cut.log", "a")

    def start(slow: str) -> subprocess.Popen:
        return subprocess.Popen(_train_cmd(data, root / "cut"), env=_env(**{SLOW: slow}), stdout=log,
                                stderr=subprocess.STDOUT)

    def kill(proc):
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

    proc = start("5:model.pt")
    hit = _wait(lambda: list(models.glob(".model.pt.*.tmp")), proc)
    kill(proc)
    ok = hit and not (models / "model.pt").exists() and _loads(models)
    _row("SIGKILL while the first `model.pt` is written", "the process dies; no `model.pt` (never a truncated one); "
         "the half-written `.model.pt.*.tmp` is removed by the next run", ok)

    proc = start("5:checkpoint_last.pt")
    hit = _wait(lambda: (models / "checkpoint_last.pt").exists() and (models / "model.pt").exists(), proc)
    second = run(root / "cut")
    text = second.stdout + second.stderr
    _row("a second training started on the same bundle", _first(text, "is being trained by another process"),
         hit and second.returncode != 0 and proc.poll() is None, "the first run goes on")
    hit = _wait(lambda: list(models.glob(".checkpoint_last.pt.*.tmp")), proc)
    before = torch.load(models / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"]
    kill(proc)
    after = torch.load(models / "checkpoint_last.pt", weights_only=True)["trainer"]["iteration"]
    _row("SIGKILL while `checkpoint_last.pt` is written", "the process dies; the previous full state (iteration "
         f"{after}) is intact", hit and before == after and _loads(models))

    proc = start("0")
    stamp = (models / "checkpoint_last.pt").stat().st_mtime_ns
    _wait(lambda: (models / "checkpoint_last.pt").stat().st_mtime_ns != stamp, proc)
    time.sleep(random.uniform(0, 1))
    kill(proc)
    final = run(root / "cut")
    text = final.stdout + final.stderr
    state = torch.load(models / "checkpoint_last.pt", weights_only=True)
    record = json.loads((models / "model.json").read_text())
    same = record["sha256"] == hashlib.sha256((models / "model.pt").read_bytes()).hexdigest()
    _row("SIGKILL at a random moment, then the same command again", _first(text, "resumed from"),
         final.returncode == 0 and state["trainer"]["iteration"] == ref_steps and same and _loads(models),
         f"ended at step {state['trainer']['iteration']} like the uninterrupted run's {ref_steps}")
    _row("re-running after a kill: the stale lock", _first(text, "taking over the stale training lock"),
         final.returncode == 0)
    log.flush()
    import re

    scores = [float(v) for v in re.findall(r"Metrics -- val_mean_dice: ([0-9.]+)",
                                           (root / "cut.log").read_text() + final.stdout + final.stderr)]
    _row("resumed runs whose later models are worse than the best so far", f"`model.pt` is the best of all "
         f"{len(scores)} validations of the four runs (recorded {record['metric']:.4f}, epoch {record['epoch']}; "
         f"logged {', '.join(f'{v:.4f}' for v in scores)})",
         same and bool(scores) and round(record["metric"], 4) == max(scores))

    short = run(root / "short", num_steps=2, val_every_steps=2, **{"train#handlers#0#interval": 5})
    rec = json.loads((root / "short" / "models" / "model.json").read_text())
    _row("training shorter than `val_interval`", _first(short.stdout + short.stderr, "before its first validation"),
         short.returncode == 0 and rec["validated"] is False and _loads(root / "short" / "models"))


def inference_faults(root: Path, data: Path) -> None:
    import nibabel as nib
    import numpy as np
    import torch

    from monai_relkd.networks import ENet

    folder = root / "images"
    folder.mkdir()
    good = nib.load(str(sorted((data / "HK").glob("Case*[0-9].nii.gz"))[0]))
    vol = np.asanyarray(good.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, good.affine), str(folder / "good.nii.gz"))
    nan = vol.copy()
    nan[2:5, 2:5, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, good.affine), str(folder / "nan_patch.nii.gz"))
    for name, shape in (("huge_header.nii.gz", (5000, 5000, 200)), ("lying_size.nii.gz", (500, 500, 200))):
        header = nib.Nifti1Header()
        header.set_data_dtype(np.float32)
        header.set_data_shape(shape)
        header["vox_offset"] = 352
        (folder / name).write_bytes(gzip.compress(header.binaryblock + b"\0" * 260))
    nib.save(nib.Nifti1Image(vol, good.affine), str(folder / "whole.nii"))
    raw = (folder / "whole.nii").read_bytes()
    (folder / "whole.nii").unlink()
    (folder / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.stack([vol] * 3, -1), good.affine), str(folder / "series4d.nii.gz"))
    (folder / "not_nifti.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    weights = root / "weights.pt"
    torch.save(ENet(1, 2).state_dict(), weights)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    configs = STUDENT / "configs"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "inference.json"),
           "--meta_file", str(configs / "metadata.json"), "--bundle_root", str(STUDENT), "--input_path", str(folder),
           "--output_dir", str(folder), "--ckpt_path", str(weights), "--image_size", "32", "--device", "cpu"]
    runs = [subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600) for _ in range(2)]
    err = runs[0].stderr
    untouched = all((folder / n).read_bytes() == b for n, b in before.items())
    outputs = sorted(p.name for p in folder.iterdir() if p.name not in before)
    for name, what in [("nan_patch.nii.gz", "NaN voxels (a 3x3 patch)"), ("huge_header.nii.gz", "a 200-byte file "
                       "whose header declares 5000x5000x200"), ("lying_size.nii.gz", "a header declaring more data "
                       "than the file can hold"), ("truncated.nii", "a truncated `.nii`"),
                       ("series4d.nii.gz", "a 4-D (3-volume) image"), ("not_nifti.nii.gz", "not a NIfTI file")]:
        line = next((ln.strip() for ln in err.splitlines() if ln.strip().startswith(str(folder / name) + ":")), "")
        _row(f"inference input: {what}", line.replace(str(folder) + "/", "") or "(not reported)",
             bool(line) and untouched and outputs == ["good_seg.nii.gz"], "the other files are segmented")
    first = next((ln for ln in err.splitlines() if ln.startswith("inference: ")), "")
    _row("inference on a folder with bad files", f"exit status {runs[0].returncode}; `{first}` then one line per file",
         runs[0].returncode == 1 and untouched)
    _row("inference with the output folder = the input folder, run twice", "`*_seg` outputs are never read as "
         f"inputs (second run: exit {runs[1].returncode}, same {len(outputs)} output)",
         outputs == ["good_seg.nii.gz"] and untouched)
    cut = root / "cut_weights.pt"
    cut.write_bytes(weights.read_bytes()[:100000])
    proc = subprocess.run(cmd[:-10] + ["--input_path", str(folder / "good.nii.gz"), "--output_dir", str(root / "o"),
                                      "--ckpt_path", str(cut), "--image_size", "32", "--device", "cpu"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    _row("inference with a truncated `model.pt`", proc.stderr.strip().splitlines()[-1].replace(str(root) + "/", ""),
         proc.returncode == 1 and not (root / "o").exists())


def _relkd(*args: str) -> tuple[int, str, str]:
    from monai_relkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def tool_faults(root: Path, data: Path) -> None:
    import numpy as np
    import nibabel as nib
    import torch

    from monai_relkd.networks import ENet

    tree = root / "tree"
    shutil.copytree(data, tree)
    for f in (tree / "BIDMC").glob("*segmentation*"):
        lab = nib.load(str(f))
        nib.save(nib.Nifti1Image(np.zeros(lab.shape, np.uint8), lab.affine), str(f))
    before = {p: p.read_bytes() for p in tree.rglob("*.nii.gz")}
    code, out, err = _relkd("datalist", "--root", str(tree), "--test_site", "HK", "--out", str(root / "dl.json"))
    dl = json.loads((root / "dl.json").read_text())
    _row("`relkd datalist`: a site whose only case has an empty label", _first(out, "left out: no usable case") +
         " (and each case with its reason)", code == 0 and "BIDMC" not in dl["meta"]["training_sites"] and
         all(p.read_bytes() == b for p, b in before.items()), "the datalist is written without it")
    code, out, err = _relkd("datalist", "--root", str(tree), "--test_site", "HK", "--strict")
    _row("`relkd datalist --strict` on the same tree", f"exit {code}: " + err.splitlines()[0], code == 2)
    code, out, err = _relkd("datalist", "--root", str(root / "nowhere"), "--test_site", "HK")
    _row("`relkd` user error (missing data root)", f"exit {code}: " + err.splitlines()[0], code == 2,
         "traceback only with --debug")

    bundle = root / "bundle"
    shutil.copytree(STUDENT, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    (bundle / "models").mkdir()
    torch.save(ENet(1, 2).state_dict(), bundle / "models" / "model.pt")
    good = (bundle / "models" / "model.pt").read_bytes()
    (bundle / "models" / "model.pt").write_bytes(good[: len(good) // 2])
    code, out, err = _relkd("package", "--bundle", str(bundle), "--out", str(root / "release"))
    _row("`relkd package` with a truncated `model.pt`", f"exit {code}: " + err.splitlines()[0].replace(str(root) +
         "/", ""), code == 2 and not (root / "release").exists(), "no zip written")
    (bundle / "models" / "model.pt").write_bytes(good)
    (bundle / "docs" / "secret.txt").symlink_to(Path.home() / ".bashrc")
    code, out, err = _relkd("package", "--bundle", str(bundle), "--out", str(root / "release"))
    _row("`relkd package` with a symbolic link out of the bundle", f"exit {code}: " + err.splitlines()[0].replace(
         str(root) + "/", ""), code == 2 and not (root / "release").exists(), "no zip written")


def main(out: str | None = None) -> None:
    """Try every fault and print the table; exits with status 1 when a "nothing lost" check failed.

    Args:
        out: scratch folder, kept (default: a temporary folder, removed).
    """
    import tempfile

    from monai_relkd.data.synthetic import generate_six_site_dataset

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="relkd_reliability_"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        data = root / "data"
        if not data.exists():
            generate_six_site_dataset(data, scale=0.05, size=32, seed=0)
        training_faults(root, data)
        inference_faults(root, data)
        tool_faults(root, data)
    finally:
        if not out:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n| fault or bad input | what the user sees | nothing lost |\n|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    print(f"\n{len(ROWS)} cases in {time.perf_counter() - t0:.0f} s; "
          f"{sum(r[2].startswith('yes') for r in ROWS)} with nothing lost.")
    if not all(r[2].startswith("yes") for r in ROWS):
        sys.exit(1)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
