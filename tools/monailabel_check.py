"""Serve and train the student bundles with MONAI Label 0.8.5's ``monaibundle`` sample app, through its REST API.

Run by ``tools/monailabel_check.sh`` inside the MONAI Label venv it builds (monai 1.5.2, monailabel 0.8.5,
this checkout of monai-relkd). Everything happens in a scratch folder, offline, on 127.0.0.1:

1. ``monailabel apps --download --name monaibundle`` (copied from the installed package, no network), and the
   teacher and student bundles copied from ``bundles/`` into its ``model/`` folder, as a user drops them in;
2. a synthetic six-site set (``relkd synth``); every site but the held-out UCL becomes the app's studies
   (``labels/final`` holds the labels), the UCL case is the volume segmented at the end;
3. the teacher trained with the bundle CLI (``python -m monai.bundle run training``);
4. server 1 (``--conf models <students>``): for each student, ``POST /train/<student>`` with the teacher
   checkpoint moved away must end in ERROR with "Teacher checkpoint not found: '<path>'"; with the checkpoint
   back it must end DONE and leave ``models/model.pt`` (MONAI Label's
   ``BundleTrainTask`` runs the student's ``train.json``, i.e. distillation from the teacher beside it). The
   task's status (``GET /train/``) keeps only its last 20 lines, which end in MONAI's "Failed to evaluate
   ConfigExpression ... load_teacher(...)"; the FileNotFoundError it wraps, naming the missing path and how to
   get a checkpoint, is in the server's log;
5. server 2 (the infer tasks exist only for bundles holding ``models/model.pt`` at start): ``GET /info/`` lists
   each student with the label ``prostate``, and ``POST /infer/<student>`` with the UCL volume returns a mask with
   the volume's shape and affine, values in {0, 1}, holding prostate (voxels > 0 that overlap the true prostate).

Each server is started in its own process group and stopped by its PID (SIGTERM, then SIGKILL), also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("prostate_mri_student_enet", "prostate_mri_student_espnet", "prostate_mri_student_erfnet")
TEACHER = "prostate_mri_teacher"
TEACHER_MISSING = "Teacher checkpoint not found"
TEST_SITE = "UCL"


def log(msg: str) -> None:
    print(f"[monailabel_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], logfile: Path, timeout: float, cwd: Path | None = None) -> None:
    log(f"$ {' '.join(cmd)}  (log: {logfile})")
    with open(logfile, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout)
    if proc.returncode != 0:
        sys.stdout.write(logfile.read_text()[-4000:])
        raise SystemExit(f"FAIL: {cmd[0]} ... exited {proc.returncode}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``monailabel start_server`` on 127.0.0.1 in its own process group; ``stop()`` kills it by its PID."""

    def __init__(self, app: Path, studies: Path, models: list[str], logfile: Path, start_timeout: float):
        self.app, self.studies, self.models, self.logfile = app, studies, models, logfile
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        cmd = ["monailabel", "start_server", "--app", str(self.app), "--studies", str(self.studies),
               "--conf", "models", ",".join(self.models), "--conf", "zoo_source", "local",
               "--conf", "sam2", "false", "--conf", "preload", "false",
               "--host", "127.0.0.1", "--port", str(self.port)]
        log(f"$ {' '.join(cmd)}  (log: {self.logfile})")
        self._out = open(self.logfile, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        log(f"server PID {self.proc.pid} on {self.url}")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"server exited with {self.proc.returncode} before answering")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self._fail(f"server did not answer GET /info/ within {self.start_timeout:.0f} s")

    def _fail(self, msg: str):
        self.stop()
        sys.stdout.write(self.logfile.read_text()[-4000:])
        raise SystemExit(f"FAIL: {msg}")

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # the server and its training subprocesses (same process group)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived the server
        except ProcessLookupError:
            pass
        self._out.close()
        log(f"server PID {proc.pid} stopped")

    def __exit__(self, *exc) -> None:
        self.stop()

    def get(self, path: str, **kw):
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r

    def post(self, path: str, **kw):
        return requests.post(self.url + path, timeout=kw.pop("timeout", 300), **kw)


def train_via_rest(server: Server, model: str, epochs: int, timeout: float) -> dict:
    """``POST /train/<model>`` (a background task, as the UI does) and poll ``GET /train/`` until it ends."""
    # "pretrained" stays at its default (True: continue from models/model.pt when there is one); MONAI Label 0.8.5
    # crashes on "pretrained": false (os.path.exists(None) in BundleTrainTask._load_checkpoint)
    params = {"max_epochs": epochs, "device": "cpu", "val_split": 0.2, "multi_gpu": False}
    r = server.post(f"/train/{model}", json=params)
    if r.status_code != 200:
        raise SystemExit(f"FAIL: POST /train/{model} -> {r.status_code} {r.text[:500]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2)
        task = server.get("/train/").json()
        if task and task.get("status") in ("DONE", "ERROR"):
            return task
    raise SystemExit(f"FAIL: training {model} did not end within {timeout:.0f} s")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("students", nargs="*", default=list(STUDENTS), help="student bundles (default: all three)")
    ap.add_argument("--workdir", help="scratch folder (default: a new temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--size", type=int, default=64, help="in-plane size of the synthetic volumes")
    ap.add_argument("--scale", type=float, default=0.2, help="fraction of the public case counts (relkd synth)")
    ap.add_argument("--image_size", type=int, default=64,
                    help="image_size written into the scratch copies of the students' train.json and inference.json "
                         "(and used for the teacher): training at the bundles' 128 takes 4x the CPU time; 0 keeps "
                         "the bundles' value")
    ap.add_argument("--teacher_steps", type=int, default=300, help="optimizer steps (16 slices) of the teacher")
    ap.add_argument("--teacher_ckpt", help="use this teacher checkpoint instead of training one")
    ap.add_argument("--student_epochs", type=int, default=12,
                    help="max_epochs of MONAI Label's train task: validation intervals of --student_val_every steps")
    ap.add_argument("--student_val_every", type=int, default=25,
                    help="val_every_steps written into the scratch copies of the students' train.json")
    ap.add_argument("--min_dice", type=float, default=0.1,
                    help="the returned mask must overlap the true prostate at least this much")
    ap.add_argument("--timeout", type=float, default=900, help="limit on each training, in seconds")
    args = ap.parse_args()
    unknown = [s for s in args.students if s not in STUDENTS]
    if unknown:
        ap.error(f"unknown student bundle(s) {unknown}; choose from {list(STUDENTS)}")

    t0 = time.monotonic()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="monailabel_check.")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    log(f"scratch folder {work}; monai-relkd from {__import__('monai_relkd').__file__}")
    try:
        check(args, work, logs)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    log(f"PASS {' '.join(args.students)} in {time.monotonic() - t0:.0f} s")
    return 0


def check(args, work: Path, logs: Path) -> None:
    # 1. the sample app, and the bundles dropped into its model/ folder
    apps = work / "apps"
    shutil.rmtree(apps, ignore_errors=True)
    run(["monailabel", "apps", "--download", "--name", "monaibundle", "--output", str(apps)], logs / "apps.log", 120)
    app = apps / "monaibundle"
    ignore = shutil.ignore_patterns("models", "eval", "runs", "__pycache__")
    for name in (TEACHER, *args.students):
        shutil.copytree(REPO / "bundles" / name, app / "model" / name, ignore=ignore)
    if args.image_size:  # the one knob the check turns in its scratch copies: CPU time (bundles default to 128)
        for name in args.students:
            for cfg in ("train.json", "inference.json"):
                path = app / "model" / name / "configs" / cfg
                config = json.loads(path.read_text())
                config["image_size"] = args.image_size
                if cfg == "train.json":  # MONAI Label's max_epochs counts intervals of val_every_steps steps
                    config["val_every_steps"] = args.student_val_every
                path.write_text(json.dumps(config, indent=4))

    # 2. synthetic data: the studies of the app (training sites), and one held-out volume to segment
    data = work / "data"
    if not data.is_dir():
        run(["relkd", "synth", "--out", str(data), "--scale", str(args.scale), "--size", str(args.size)], logs / "synth.log", 300)
    studies = work / "studies"
    shutil.rmtree(studies, ignore_errors=True)
    (studies / "labels" / "final").mkdir(parents=True)
    test_image = test_label = None
    for site in sorted(p for p in data.iterdir() if p.is_dir()):
        for img in sorted(site.glob("Case??.nii.gz")):
            lab = next(site.glob(img.name.replace(".nii.gz", "_[sS]egmentation.nii.gz")))
            if site.name == TEST_SITE:
                test_image, test_label = test_image or img, test_label or lab
                continue
            shutil.copy(img, studies / f"{site.name}_{img.name}")
            shutil.copy(lab, studies / "labels" / "final" / f"{site.name}_{img.name}")
    assert test_image is not None, f"no {TEST_SITE} case in {data}"

    # 3. the teacher, with the bundle CLI
    teacher_ckpt = app / "model" / TEACHER / "models" / "model.pt"
    t = time.monotonic()
    if args.teacher_ckpt:
        teacher_ckpt.parent.mkdir(exist_ok=True)
        shutil.copy(args.teacher_ckpt, teacher_ckpt)
    else:
        run([sys.executable, "-m", "monai.bundle", "run", "training",
         "--config_file", str(app / "model" / TEACHER / "configs" / "train.json"),
             "--bundle_root", str(app / "model" / TEACHER),
             "--dataset_dir", str(data), "--image_size", str(args.image_size or 128), "--num_steps", str(args.teacher_steps),
             "--num_samples", "8", "--batch_size", "16", "--val_every_steps", str(args.teacher_steps)],
            logs / "teacher_train.log", args.timeout)
    assert teacher_ckpt.is_file(), f"teacher training wrote no {teacher_ckpt}"
    log(f"teacher ready in {time.monotonic() - t:.0f} s")

    # 4. server 1: each student trained through MONAI Label, without and then with the teacher checkpoint
    with Server(app, studies, list(args.students), logs / "server_train.log", 300) as server:
        for student in args.students:
            hidden = teacher_ckpt.with_name("model.pt.moved_away")
            teacher_ckpt.rename(hidden)
            seen = server.logfile.stat().st_size
            try:
                task = train_via_rest(server, student, 5, args.timeout)
            finally:
                hidden.rename(teacher_ckpt)
            # GET /train/ keeps the last 20 lines of the task (MONAI's "Failed to evaluate ConfigExpression ...
            # load_teacher(...)"); the FileNotFoundError it wraps, with the path and how to get a checkpoint, is in
            # the server's log (MONAI Label logs every line of the task there)
            details = "\n".join(task.get("details") or [])
            with open(server.logfile) as f:
                f.seek(seen)
                new_log = f.read()
            expected = f"FileNotFoundError: {TEACHER_MISSING}: {str(teacher_ckpt)!r}"
            if task["status"] != "ERROR" or "load_teacher" not in details or expected not in new_log:
                raise SystemExit(f"FAIL: {student}: training without the teacher checkpoint ended {task['status']}; "
                                 f"expected ERROR, 'load_teacher' in its details and '{expected}' in the server "
                                 f"log; details:\n{details}")
            line = next(ln for ln in new_log.splitlines() if expected in ln)
            log(f"{student}: without the teacher checkpoint the train task ends in ERROR; server log: {line.strip()}")

            t = time.monotonic()
            task = train_via_rest(server, student, args.student_epochs, args.timeout)
            ckpt = app / "model" / student / "models" / "model.pt"
            if task["status"] != "DONE" or not ckpt.is_file():
                raise SystemExit(f"FAIL: {student}: training with the teacher ended {task['status']}, "
                                 f"model.pt {'written' if ckpt.is_file() else 'missing'}:\n"
                                 + "\n".join(task.get("details") or []))
            torch.load(ckpt, map_location="cpu", weights_only=True)  # what MONAI Label's infer task does
            log(f"{student}: trained by MONAI Label ({args.student_epochs} epochs) in {time.monotonic() - t:.0f} s")

    # 5. server 2: segment the held-out volume with each student
    ref = nib.load(str(test_image))
    truth = np.asarray(nib.load(str(test_label)).dataobj)
    with Server(app, studies, list(args.students), logs / "server_infer.log", 300) as server:
        info = server.get("/info/").json()
        for student in args.students:
            model = info.get("models", {}).get(student)
            if not model or "prostate" not in model.get("labels", {}):
                raise SystemExit(f"FAIL: GET /info/ lists no {student} with label 'prostate': {model}")
            t = time.monotonic()
            with open(test_image, "rb") as f:
                r = server.post(f"/infer/{student}?output=image",
                                files={"file": (test_image.name, f, "application/octet-stream")})
            if r.status_code != 200:
                raise SystemExit(f"FAIL: POST /infer/{student} -> {r.status_code} {r.text[:1000]}")
            out = work / f"{student}_seg.nii.gz"
            out.write_bytes(r.content)
            seg = nib.load(str(out))
            mask = np.asarray(seg.dataobj)
            problems = []
            if mask.shape != ref.shape:
                problems.append(f"shape {mask.shape} != volume {ref.shape}")
            if not np.allclose(seg.affine, ref.affine, atol=1e-3):
                problems.append(f"affine\n{seg.affine}\n!= volume\n{ref.affine}")
            if not set(np.unique(mask).tolist()) <= {0, 1}:
                problems.append(f"values {np.unique(mask)[:10]} not in {{0, 1}}")
            d = dice(mask, truth) if mask.shape == truth.shape else 0.0
            if (mask > 0).sum() == 0 or d < args.min_dice:
                problems.append(f"no prostate: {(mask > 0).sum()} voxels, Dice {d:.3f} < {args.min_dice}")
            if problems:
                raise SystemExit(f"FAIL: {student}: " + "; ".join(problems))
            log(f"{student}: POST /infer in {time.monotonic() - t:.1f} s -> mask {mask.shape}, affine matches, "
                f"{int((mask > 0).sum())} prostate voxels, Dice {d:.3f} vs the synthetic label")


if __name__ == "__main__":
    sys.exit(main())
