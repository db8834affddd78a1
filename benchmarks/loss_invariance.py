"""How each distillation loss behaves under feature scale, resolution, channel count and batch size — measured.

For every loss, the value and the gradient norm with respect to the student input (features or logits) are
measured on a base case and on perturbed copies, and printed as ratios to the base case (1.00 = unchanged) in
a Markdown table (the table of ``docs/method.md``). Features are ReLU'd Gaussians with a per-channel offset, as
activations of a real network look; every figure is the median over ``repeats`` random draws.

    python benchmarks/loss_invariance.py                 # print the table
    python benchmarks/loss_invariance.py --out table.md  # and write it to a file
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import fire
import torch

from monai_relkd.losses import AdaptiveAffinityLoss, KernelMatrixLoss, LogitsDistillationLoss

#: base case: batch 2, student 64 channels at 32×32, teacher 256 channels at 16×16, 2 classes
BASE = {"batch": 2, "c_s": 64, "c_t": 256, "side_s": 32, "side_t": 16}
PERTURBATIONS = {
    "teacher ×10": {"teacher_scale": 10.0},
    "teacher ×0.01": {"teacher_scale": 0.01},
    "student ×10": {"student_scale": 10.0},
    "resolution ×2": {"upsample": 2},
    "teacher channels ×4": {"c_t": 1024},
    "batch ×4": {"batch": 8},
}


def _features(batch: int, channels: int, side: int, gen: torch.Generator) -> torch.Tensor:
    offset = torch.rand(1, channels, 1, 1, generator=gen)
    return torch.relu(torch.randn(batch, channels, side, side, generator=gen) + offset)


def _case(seed: int, **change) -> dict:
    """Student/teacher features, logits and label for one draw; ``change`` overrides BASE or perturbs."""
    spec = {**BASE, **{k: v for k, v in change.items() if k in BASE}}
    gen = torch.Generator().manual_seed(seed)
    case = {
        "f_s": _features(spec["batch"], spec["c_s"], spec["side_s"], gen),
        "f_t": _features(spec["batch"], spec["c_t"], spec["side_t"], gen),
        "z_s": torch.randn(spec["batch"], 2, 64, 64, generator=gen),
        "z_t": 3 * torch.randn(spec["batch"], 2, 64, 64, generator=gen),
        "label": (torch.rand(spec["batch"], 1, 64, 64, generator=gen) > 0.8).long(),
    }
    case["f_t"] = case["f_t"] * change.get("teacher_scale", 1.0)
    case["f_s"] = case["f_s"] * change.get("student_scale", 1.0)
    case["z_t"] = case["z_t"] * 1.0  # logits are not features: KD's temperature fixes their scale
    factor = change.get("upsample", 1)
    if factor > 1:
        for key in ("f_s", "f_t", "z_s", "z_t", "label"):
            case[key] = case[key].repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    return case


def _losses(c_t: int) -> dict[str, Callable[[dict], torch.Tensor]]:
    torch.manual_seed(0)  # the same connector for every draw and perturbation of a channel count
    km = {norm: KernelMatrixLoss(BASE["c_s"], c_t, normalize=norm) for norm in ("frobenius", "row", "none")}
    aa = AdaptiveAffinityLoss(grid=16, pair_weights="label")
    skd = AdaptiveAffinityLoss(grid=2, pool="max", pair_weights="uniform")
    kd = LogitsDistillationLoss(temperature=4.0)
    return {
        "L_logits (T = 4)": lambda c: kd(c["z_s"], c["z_t"]),
        "L_KM, frobenius (default)": lambda c: km["frobenius"](c["f_s"], c["f_t"]),
        "L_KM, row (ICKD)": lambda c: km["row"](c["f_s"], c["f_t"]),
        "L_KM, none (old)": lambda c: km["none"](c["f_s"], c["f_t"]),
        "L_AA, label, 16×16 avg": lambda c: aa(c["f_s"], c["f_t"], label=c["label"]),
        "L_AA, SKD 2×2 max, uniform": lambda c: skd(c["f_s"], c["f_t"]),
    }


def _measure(name: str, seed: int, **change) -> tuple[float, float]:
    """(value, ‖∂L/∂student input‖) of loss ``name`` on one draw."""
    case = _case(seed, **change)
    key = "z_s" if name.startswith("L_logits") else "f_s"
    case[key].requires_grad_(True)
    value = _losses(change.get("c_t", BASE["c_t"]))[name](case)
    value.backward()
    return value.item(), case[key].grad.norm().item()


def invariance_table(repeats: int = 5) -> str:
    """The Markdown table: per loss, base value and gradient norm, then value / grad-norm ratios per perturbation."""
    names = list(_losses(BASE["c_t"]))
    header = "| loss | base value | base ‖grad‖ | " + " | ".join(PERTURBATIONS) + " |"
    lines = [header, "|---|---:|---:|" + "---:|" * len(PERTURBATIONS)]
    for name in names:
        base = [_measure(name, seed) for seed in range(repeats)]
        cells = []
        for change in PERTURBATIONS.values():
            pert = [_measure(name, seed, **change) for seed in range(repeats)]
            value_ratio = statistics.median(p[0] / b[0] for p, b in zip(pert, base))
            grad_ratio = statistics.median(p[1] / b[1] for p, b in zip(pert, base))
            cells.append(f"{value_ratio:.3g} / {grad_ratio:.3g}")
        value, grad = statistics.median(b[0] for b in base), statistics.median(b[1] for b in base)
        lines.append(f"| {name} | {value:.3g} | {grad:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(repeats: int = 5, out: str | None = None) -> None:
    """Print the invariance table (value ratio / gradient-norm ratio to the base case); write it to ``out``."""
    table = invariance_table(repeats)
    print(f"base: {BASE}; cells: value ratio / gradient-norm ratio to the base case, median of {repeats} draws")
    print(table)
    if out:
        from monai_relkd.data._io import atomic_write_text

        atomic_write_text(out, table + "\n")


if __name__ == "__main__":
    fire.Fire(main)
