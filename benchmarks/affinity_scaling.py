"""Time and peak memory of AdaptiveAffinityLoss: exact linear path vs the naive N×N path.

For square feature grids of growing size (C = 128 channels for student and teacher, batch 2, float32, label
pair weights, 2 classes) it measures forward + backward of each path and prints a Markdown table. Every
measurement runs in a fresh subprocess so the peak memory of one does not hide another's:

- CPU: the peak resident set size of the measured forward + backward minus the resident set size just before it
  (after imports and input creation). The peak is reset before the run by writing 5 to /proc/self/clear_refs and
  read from VmHWM (Linux >= 4.0); where that is not possible, ``resource.getrusage`` ``ru_maxrss`` is used
  instead (then a run that peaks below the import-time peak reads as 0).
- CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the run.

The naive path runs only while its estimated memory (about 6 live N×N float32 buffers per sample during
forward + backward) fits the limit (8 GiB by default). Time is the median of ``--repeats`` runs after one
warm-up run (the memory run); the libraries are initialised on a tiny
problem before the memory run.

On a shared machine run it under the CPU lock::

    flock /tmp/relkd-cpu.lock python benchmarks/affinity_scaling.py
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

GIB = 1024**3
MIB = 1024**2
NAIVE_BUFFERS = 6  # live N×N float32 matrices per sample in forward + backward (about 5 measured at 64² and 96²)


def naive_estimate_bytes(n: int, batch: int) -> int:
    return NAIVE_BUFFERS * batch * n * n * 4


# ------------------------------------------------------------------------------------------------ worker side
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def run_worker(size: int, path: str, channels: int, batch: int, repeats: int, device: str) -> dict:
    import torch

    from monai_relkd.losses import AdaptiveAffinityLoss

    dev = torch.device(device)
    torch.manual_seed(0)
    loss = AdaptiveAffinityLoss(pair_weights="label", num_classes=2, naive=(path == "naive"))
    f_s = torch.randn(batch, channels, size, size, device=dev, requires_grad=True)
    f_t = torch.randn(batch, channels, size, size, device=dev)
    label = (torch.rand(batch, 1, size, size, device=dev) < 0.2).long()

    def step() -> float:
        f_s.grad = None
        value = loss(f_s, f_t, label=label)
        value.backward()
        return float(value)

    # initialise the libraries (thread pools, BLAS, autograd engine) on a tiny problem first
    tiny = torch.randn(1, channels, 4, 4, device=dev, requires_grad=True)
    loss(tiny, tiny.detach() + 1, label=torch.zeros(1, 1, 4, 4, dtype=torch.long, device=dev)).backward()

    # memory (this is also the warm-up run)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    else:
        use_hwm = _reset_peak()
        base = _rss_bytes()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        value = step()
        if use_hwm:
            peak, method = _hwm_bytes() - base, "VmHWM after clear_refs"
        else:
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peak, method = (after - base if after > before else 0), "ru_maxrss"
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "peak_bytes": int(peak), "value": value, "method": method}


# ------------------------------------------------------------------------------------------------ driver side
def measure(size: int, path: str, channels: int, batch: int, repeats: int, device: str) -> dict:
    """Run :func:`run_worker` in a fresh subprocess (this script with ``--worker``) and return its result."""
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--size", str(size), "--path", path,
        "--channels", str(channels), "--batch", str(batch), "--repeats", str(repeats), "--device", device,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {size} {path} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(
    sizes: Sequence[int] = (16, 32, 64, 96, 128),
    channels: int = 128,
    batch: int = 2,
    repeats: int = 5,
    limit_gib: float = 8.0,
    device: str | None = None,
    worker: bool = False,
    size: int | None = None,
    path: str | None = None,
) -> None:
    """Print the table (``--sizes 16,32,64``; ``--limit-gib`` or ``--limit_gib``).

    Args:
        sizes: square grid sizes to measure.
        channels, batch: feature channels of student and teacher, and samples per batch.
        repeats: timed runs per measurement (median).
        limit_gib: largest estimated memory of the naive path to run it.
        device: cpu or cuda (default: cuda if available).
        worker, size, path: internal, one measurement (``path``: linear or naive) in this process.
    """
    if isinstance(sizes, int):
        sizes = [sizes]
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if worker:
        if path not in ("linear", "naive") or size is None:
            raise ValueError(f"--worker needs --size and --path linear|naive, got size={size!r} path={path!r}")
        print(json.dumps(run_worker(size, path, channels, batch, repeats, device)))
        return

    import torch

    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"AdaptiveAffinityLoss forward+backward, label weights, C={channels}, batch {batch}, float32, "
        f"{device} ({dev_name}), torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}; time = median of {repeats} runs\n"
    )
    print("| grid | N | linear time (ms) | linear peak (MiB) | naive time (ms) | naive peak (MiB) | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    method = None
    for size in sizes:
        n = size * size
        lin = measure(size, "linear", channels, batch, repeats, device)
        method = lin["method"]
        row = [f"{size}×{size}", str(n), f"{lin['time_s'] * 1e3:.1f}", f"{lin['peak_bytes'] / MIB:.1f}"]
        need = naive_estimate_bytes(n, batch)
        if need <= limit_gib * GIB:
            nai = measure(size, "naive", channels, batch, repeats, device)
            rel = abs(lin["value"] - nai["value"]) / abs(nai["value"])
            row += [f"{nai['time_s'] * 1e3:.1f}", f"{nai['peak_bytes'] / MIB:.1f}", f"{rel:.1e}"]
        else:
            row += [f"skipped: needs {need / GIB:.1f} GiB > {limit_gib:g} GiB", "", ""]
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\npeak memory: {method}, minus the baseline just before the measured run")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
