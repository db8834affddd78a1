"""Seconds per optimizer step of the student (no KD, KD with a live teacher, KD from cached teacher outputs) and of
the teacher, at the benchmark's size (64×64 slices, 16 slices per step) on this machine's CPU.

Prints one line per kind: median and inter-quartile range over ``repeats`` timed steps after ``warmup`` steps, and
the process CPU seconds per step (all threads; less sensitive to other jobs than the wall clock).
The student's distillation loss is the student bundle's (``configs/train.json``: taps, λ, T), built the way the
bundle builds it; "KD, cached teacher" feeds teacher outputs that were computed once (what
:class:`monai_relkd.engines.TeacherOutputCache` returns on a hit), so it times the student's side only. Run it under
the CPU lock on a shared machine::

    flock /tmp/relkd-cpu.lock nice python benchmarks/step_time.py
    python benchmarks/step_time.py --image_size 64 --batch 16 --repeats 10 --student enet
    python benchmarks/step_time.py --image_size 48 --threads 1 --adamw foreach   # the bundles' optimizer before

Every kind's AdamW takes the bundle's options (``--adamw bundle``, the default: weight decay and ``fused``/``foreach``
from ``configs/train.json``), or one implementation for all: ``plain`` (torch's default on the CPU, one tensor at a
time), ``foreach`` or ``fused``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import fire
import torch

from monai.losses import DiceCELoss

from monai_relkd.engines import FeatureTaps
from monai_relkd.inferers import AutocastInferer
from monai_relkd.losses import RelationalDistillationLoss
from monai_relkd.networks import DeepLabV3Plus, ENet, ERFNet, ESPNet

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
STUDENTS = {"enet": ENet, "espnet": ESPNet, "erfnet": ERFNet}
ADAMW_CHOICES = ("bundle", "plain", "foreach", "fused")


def adamw_options(config: dict[str, Any], choice: str) -> dict[str, Any]:
    """AdamW keyword arguments besides params and lr: the bundle config's (``"bundle"``) or one implementation's."""
    if choice not in ADAMW_CHOICES:
        raise ValueError(f"--adamw must be one of {ADAMW_CHOICES}, got {choice!r}.")
    options = {k: v for k, v in config["optimizer"].items() if k not in ("_target_", "params", "lr")}
    if choice != "bundle":
        options = {k: v for k, v in options.items() if k not in ("foreach", "fused")}
        options.update({} if choice == "plain" else {choice: True})
    return options


def _time(step: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float, float, float]:
    """Median, quartiles of the wall-clock seconds per call, and process CPU seconds per call (all threads)."""
    for _ in range(warmup):
        step()
    times = []
    cpu = time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu) / repeats
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2], cpu


def main(image_size: int = 64, batch: int = 16, repeats: int = 10, warmup: int = 2, student: str = "enet",
         threads: int | None = None, adamw: str = "bundle") -> None:
    """Time one optimizer step of each kind and print the medians."""
    if threads:
        torch.set_num_threads(int(threads))
    cfg = json.loads((BUNDLES / f"prostate_mri_student_{student}" / "configs" / "train.json").read_text())
    t_cfg = json.loads((BUNDLES / "prostate_mri_teacher" / "configs" / "train.json").read_text())
    s_opt, t_opt_options = adamw_options(cfg, adamw), adamw_options(t_cfg, adamw)
    dist = cfg["distillation"]
    taps = dist["taps"]
    x = torch.randn(batch, 1, image_size, image_size)
    y = (torch.rand(batch, 1, image_size, image_size) > 0.7).float()
    net = STUDENTS[student](in_channels=1, out_channels=2)
    teacher = DeepLabV3Plus(in_channels=1, out_channels=2, backbone="resnet50", output_stride=16)
    kd = RelationalDistillationLoss(
        lambda_logits=dist["lambda_logits"], lambda_km=dist["lambda_km"], lambda_aa=dist["lambda_aa"],
        temperature=dist["temperature"], student_channels=[t["student_channels"] for t in taps],
        teacher_channels=[t["teacher_channels"] for t in taps], pair_weights=dist["pair_weights"],
        aa_grid=dist["aa_grid"], num_classes=2)
    s_taps = FeatureTaps(net, [t["student"] for t in taps])
    t_taps = FeatureTaps(teacher.eval(), [t["teacher"] for t in taps], detach=True)
    opt = torch.optim.AdamW(list(net.parameters()) + list(kd.parameters()), 1e-3, **s_opt)
    seg = DiceCELoss(to_onehot_y=True, softmax=True)

    def teacher_forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            t_taps.clear()
            return teacher(x), t_taps.features()

    cached_logits, cached_feats = teacher_forward()
    cached_logits = cached_logits.half()
    cached_feats = [f.half() for f in cached_feats]

    def step(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        s_taps.clear()
        loss = loss_fn(net(x))
        loss.backward()
        opt.step()

    def kd_live(logits: torch.Tensor) -> torch.Tensor:
        t_logits, t_feats = teacher_forward()
        return kd(logits, t_logits, s_taps.features(), t_feats, y)["loss"]

    def kd_cached(logits: torch.Tensor) -> torch.Tensor:
        return kd(logits, cached_logits.float(), s_taps.features(), [f.float() for f in cached_feats], y)["loss"]

    t_opt = torch.optim.AdamW(teacher.parameters(), 3e-4, **t_opt_options)

    def teacher_step(forward: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor] = lambda a, n: n(a)) -> None:
        teacher.train()
        t_opt.zero_grad(set_to_none=True)
        seg(forward(x, teacher), y).backward()
        t_opt.step()
        teacher.eval()

    kinds = {
        f"{student} step, no KD": lambda: step(lambda z: seg(z, y)),
        f"{student} step, KD + live teacher": lambda: step(kd_live),
        f"{student} step, KD + cached teacher": lambda: step(kd_cached),
        "teacher forward only (no_grad)": teacher_forward,
        "teacher training step": teacher_step,
        # the generalization benchmark's teacher row (--teacher_precision bfloat16): its forward under autocast
        "teacher training step, bfloat16 forward": lambda: teacher_step(AutocastInferer("bfloat16")),
    }
    print(f"image {image_size}x{image_size}, {batch} slices per step, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median [IQR] of {repeats} steps after {warmup} warm-up; AdamW "
          f"{s_opt} (student), {t_opt_options} (teacher)", flush=True)
    for kind, fn in kinds.items():
        med, q1, q3, cpu = _time(fn, warmup, repeats)
        print(f"  {kind:40s} {med:6.3f} s  [{q1:.3f}-{q3:.3f}]  CPU {cpu:6.3f} s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} (a busy machine inflates the wall-clock times)", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
