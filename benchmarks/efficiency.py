"""Efficiency of the teacher and the three students: parameters, MACs/FLOPs, CPU latency, peak memory.

Prints a Markdown table and writes it, with the command, date and machine, into the section of
``docs/results.md`` between ``<!-- efficiency:start -->`` and ``<!-- efficiency:end -->`` (other sections of the
file are left untouched; the file is created if absent). On the shared 2-core machine run it under the CPU lock::

    flock /tmp/relkd-cpu.lock python benchmarks/efficiency.py

Options (python-fire; see ``--help``; ``--json-out`` and ``--json_out`` are the same option): ``--shape 1,1,384,384
--repeats 20 --warmup 3 --threads N --results docs/results.md --json-out F --no-write``.

Two more tables (issue 17), both measured in the same run as the first:

- **backends**: the latency of one slice per network and backend - ``eager`` (PyTorch), ``eager_folded`` (BatchNorm
  folded into the convolutions, :func:`monai_relkd.networks.fold.fold_batchnorm`), ``eager_cl`` (folded and
  channels-last), ``torchscript`` (``torch.jit.script``), ``ort_basic`` / ``ort_all`` (the ``relkd export`` ONNX
  model in ONNX Runtime on the CPU with graph optimisation ``basic`` / ``all``), and the teacher/student latency
  ratio per backend and with each network on its best backend (``--backends`` picks some);
- **whole volume**: a ``--volume 24,384,384`` (D,H,W) NIfTI on disk to its segmentation on disk, end to end, through
  the bundle's own ``configs/inference.json`` (eager) or ``+ configs/inference_onnx.json`` (ONNX Runtime), for each
  ``--sw_batch_sizes`` (slices per forward of ``SliceInferer``), ``--volume_repeats`` timed runs after one warm-up.
  The time runs from the start of the workflow (config parsing, weights / ONNX session loading) to the written mask;
  the interpreter's start and imports are not in it. ``--volume_image_size`` sets the bundle's in-plane network size
  (default: the bundle's own ``image_size``). The weights are random (speed does not depend on them).

``--networks enet,espnet,erfnet,teacher`` restricts all tables; ``--no-volume`` skips the whole-volume table.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import fire
import numpy as np
import torch

from monai_relkd.data._io import atomic_write_text
from monai_relkd.profiling import TorchThreads, measure_latency, parse_shape, profile_network, resolve_network

START, END = "<!-- efficiency:start -->", "<!-- efficiency:end -->"
TEACHER = ("DeepLabV3+ R50 OS16 (teacher)", "monai_relkd.networks.DeepLabV3Plus", {"backbone": "resnet50", "output_stride": 16})
STUDENTS = [
    ("ENet", "monai_relkd.networks.ENet", {}),
    ("ESPNet (p=2, q=8)", "monai_relkd.networks.ESPNet", {"p": 2, "q": 8}),
    ("ERFNet", "monai_relkd.networks.ERFNet", {}),
]
#: --networks key -> (label, bundle folder name)
KEYS = {"teacher": (TEACHER[0], "prostate_mri_teacher"), "enet": (STUDENTS[0][0], "prostate_mri_student_enet"),
        "espnet": (STUDENTS[1][0], "prostate_mri_student_espnet"),
        "erfnet": (STUDENTS[2][0], "prostate_mri_student_erfnet")}
BACKENDS = ("eager", "eager_folded", "eager_cl", "torchscript", "ort_basic", "ort_all")
BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
PAPER_ENET_PARAMS, PAPER_ENET_G = 353_000, 2.2  # Loussaief et al. 2024 (arXiv:2404.02738)
RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "results.md"
#: a comma-separated option as python-fire hands it over: ``"a,b"``, ``("a", "b")``, ``"a"`` or ``2``
ListArg = Union[str, int, Sequence[Union[str, int]]]


def _table(rows: List[Dict[str, Any]], teacher_ms: float) -> str:
    """The Markdown efficiency table of ``rows`` (the last column divides ``teacher_ms`` by each latency)."""
    lines = [
        "| network | params (M) | GMACs | GFLOPs (= 2×MACs) | CPU latency / slice, ms: median [IQR; min–max] "
        "| threads | peak RSS (MiB) | forward mem (MiB) | teacher / student latency |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['network']} | {r['params_m']:.3f} | {r['gmacs']:.2f} | {r['gflops']:.2f} "
            f"| {r['latency_ms_median']:.1f} [{r['latency_ms_iqr']:.1f}; {r['latency_ms_min']:.1f}–{r['latency_ms_max']:.1f}] "
            f"| {r['threads']} | {r['mem_peak_rss_mb']:.0f} | {r['mem_forward_mb']:.0f} "
            f"| {teacher_ms / r['latency_ms_median']:.1f}× |"
        )
    return "\n".join(lines)


def _machine() -> str:
    """One line describing the OS, CPU cores, GPU, torch and Python versions."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores (shared), {gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def _section(rows: List[Dict[str, Any]], table: str, command: str, shape: tuple) -> str:
    """The efficiency section of ``docs/results.md``, markers included: command, machine, tables and notes."""
    enet = next(r for r in rows if r["network"] == "ENet")
    side = shape[-1] * math.sqrt(PAPER_ENET_G / enet["gmacs"])  # MACs scale with H*W
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    params_diff = 100.0 * (enet["params"] - PAPER_ENET_PARAMS) / PAPER_ENET_PARAMS
    flops_diff = 100.0 * (enet["gflops"] - PAPER_ENET_G) / PAPER_ENET_G
    shape_s = "×".join(str(d) for d in shape)
    return f"""{START}
## Efficiency (teacher vs students)

Command: `{command}`
Date: {now}. Machine: {_machine()}. Input {shape_s} (one slice), eval mode, `torch.inference_mode()`,
{rows[0]['latency_warmup']} warm-up + {rows[0]['latency_repeats']} timed forwards per network; the latency spread is
the inter-quartile range and min–max. The two cores are shared with other jobs, so latencies are indicative
(medians are robust to the occasional slow run, maxima are not); ratios measured in the same run are more reliable.

{table}

The backend table times one slice per forward on each backend in the same run (see the script's docstring:
`eager_folded` folds BatchNorm into the convolutions, `eager_cl` adds channels-last, `ort_*` is the `relkd export`
ONNX model in ONNX Runtime with that graph optimisation level); its last column divides the teacher's latency on its
fastest backend by the student's on the student's fastest (issue 17's goal: ENet ≥ 15×). The whole-volume table runs
the bundle's own inference config from a NIfTI file on disk to the mask on disk (issue 17's goal: ≤ 2 s for
24×384×384 on 2 cores), with random weights, after one warm-up run; it excludes the interpreter's start and imports.

How it is measured (`monai_relkd.profiling`): parameters = `sum(p.numel())`; FLOPs from
`torch.utils.flop_counter.FlopCounterMode`, which counts convolutions (incl. transposed) and matrix products only
(no norms, activations, pooling, bias or interpolation) and counts a multiply-add as 2 FLOPs, so GMACs =
GFLOPs / 2. Peak memory: a fresh subprocess loads the model, runs one warm-up forward, resets the kernel's RSS
high-water mark (`/proc/self/clear_refs`) and runs one forward: *peak RSS* is the whole process (torch runtime +
weights + activations), *forward mem* the rise over the RSS just before that forward. No GPU on this machine
(with CUDA the profiler uses `torch.cuda.max_memory_allocated`).

Comparison with the paper (Loussaief et al., arXiv:2404.02738: ENet with 353 k parameters and about 2.2 GFLOPs):
our ENet has {enet['params']:,} parameters ({params_diff:+.1f} %). At {shape_s} it costs {enet['gmacs']:.2f} GMACs
= {enet['gflops']:.2f} GFLOPs (2×MACs). We could not confirm from the paper whether its "FLOPs" are multiply-adds or
2×MACs, nor the input size behind that figure: if they are 2×MACs, our count at {shape[-2]}×{shape[-1]}
differs from theirs by {flops_diff:+.0f} %; if they are MACs, our ENet reaches 2.2 GMACs at about
{side:.0f}×{side:.0f} (MACs grow with H·W). Counters also differ in what they include (ours ignores element-wise
ops), so agreement within ~10 % is as close as such figures can be compared.
{END}"""


def _backend_net(net: torch.nn.Module, backend: str, shape: tuple, threads: int | None, workdir: Path) -> Any:
    """``(callable module, input memory format)`` of ``net`` on ``backend``."""
    net = net.eval()
    if backend == "eager":
        return net, torch.contiguous_format
    if backend in ("eager_folded", "eager_cl"):
        from monai_relkd.networks.fold import fold_batchnorm

        folded = fold_batchnorm(net)
        if backend == "eager_folded":
            return folded, torch.contiguous_format
        return folded.to(memory_format=torch.channels_last), torch.channels_last
    if backend == "torchscript":
        return torch.jit.script(net), torch.contiguous_format
    from monai_relkd.export import _onnx
    from monai_relkd.inference import OnnxRuntimeNetwork

    onnx_file = workdir / f"{type(net).__name__}.onnx"
    if not onnx_file.is_file():
        example = torch.randn(2, *shape[1:])
        onnx_file.write_bytes(_onnx(net, example, 18, 8)[0])
    level = backend.split("_", 1)[1]
    return OnnxRuntimeNetwork(onnx_file, num_threads=threads or 0, graph_optimization_level=level), None


def backend_rows(keys: List[str], backends: List[str], shape: tuple, repeats: int, warmup: int,
                 threads: int | None) -> List[Dict[str, Any]]:
    """One row per network: median latency (ms) of one forward of ``shape`` on each backend."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="relkd_backends_") as tmp:
        for key in keys:
            label = KEYS[key][0]
            _, path, kwargs = next(n for n in [TEACHER, *STUDENTS] if n[0] == label)
            net = resolve_network(path, **kwargs).eval()
            row: Dict[str, Any] = {"network": label, "key": key}
            for backend in backends:
                print(f"latency {label} on {backend} ...", file=sys.stderr, flush=True)
                module, memory_format = _backend_net(net, backend, shape, threads, Path(tmp))
                if memory_format is torch.channels_last:
                    module = _ChannelsLastInput(module)
                row[backend] = measure_latency(module, shape, repeats=repeats, warmup=warmup,
                                               threads=threads)["latency_ms_median"]
            rows.append(row)
    return rows


class _ChannelsLastInput(torch.nn.Module):
    """Runs ``module`` on its input converted to channels-last (the conversion is timed with it)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def _backend_table(rows: List[Dict[str, Any]], backends: List[str]) -> str:
    """The Markdown per-backend latency table of ``rows`` (:func:`backend_rows`) with the teacher/student ratios."""
    teacher = next((r for r in rows if r["key"] == "teacher"), None)
    head = "| network | " + " | ".join(f"{b} (ms)" for b in backends) + " | best | teacher / student, same backend "
    head += "| teacher best / student best |"
    lines = [head, "|---|" + "---:|" * len(backends) + "---|---|---:|"]
    for r in rows:
        best = min(backends, key=lambda b: r[b])
        same = ", ".join(f"{b} {teacher[b] / r[b]:.1f}×" for b in backends) if teacher and r is not teacher else "–"
        ratio = f"{min(teacher[b] for b in backends) / r[best]:.1f}×" if teacher and r is not teacher else "–"
        lines.append(f"| {r['network']} | " + " | ".join(f"{r[b]:.1f}" for b in backends)
                     + f" | {best} | {same} | {ratio} |")
    return "\n".join(lines)


def _write_volume(path: Path, dhw: tuple) -> None:
    """A synthetic T2-like volume of (D, H, W) voxels (stored H, W, D, 0.5 x 0.5 x 3.6 mm) as NIfTI."""
    from monai_relkd.data._io import write_nifti

    d, h, w = dhw
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((yy - h / 2) / (h / 6)) ** 2 + ((xx - w / 2) / (w / 5)) ** 2))
    rng = np.random.default_rng(0)
    vol = (200 * blob[..., None] + 40 + 10 * rng.standard_normal((h, w, d))).astype(np.float32)
    write_nifti(path, vol, np.diag([0.5, 0.5, 3.6, 1.0]))


def _scratch_bundle(key: str, root: Path) -> Path:
    """A copy of the bundle's configs with randomly initialised weights saved as models/model.pt."""
    from monai_relkd.export import load_bundle_network  # noqa: F401 - keeps the import error early
    from monai.bundle import ConfigParser

    src = BUNDLES / KEYS[key][1]
    dst = root / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    parser = ConfigParser()
    parser.read_config(str(dst / "configs" / "inference.json"))
    parser["bundle_root"] = str(dst)
    net = parser.get_parsed_content("network_def", instantiate=True)
    (dst / "models").mkdir()
    torch.save(net.state_dict(), dst / "models" / "model.pt")
    return dst


def volume_rows(keys: List[str], backends: List[str], dhw: tuple, sw_batch_sizes: List[int], repeats: int,
                threads: int | None, image_size: int | None) -> List[Dict[str, Any]]:
    """Seconds from a NIfTI volume on disk to its mask on disk through the bundle's inference config (``threads``:
    torch's intra-op threads and ONNX Runtime's ``onnx_threads`` during the runs)."""
    rows: List[Dict[str, Any]] = []
    onnx_config = BUNDLES / KEYS["enet"][1] / "configs" / "inference_onnx.json"  # identical in every student
    with TorchThreads(threads or None):
        return _volume_rows(rows, onnx_config, keys, backends, dhw, sw_batch_sizes, repeats, threads, image_size)


def _volume_rows(rows: List[Dict[str, Any]], onnx_config: Path, keys: List[str], backends: List[str], dhw: tuple,
                 sw_batch_sizes: List[int], repeats: int, threads: int | None,
                 image_size: int | None) -> List[Dict[str, Any]]:
    """:func:`volume_rows` once torch's threads are set: appends to and returns ``rows``."""
    from monai_relkd.demo import run_bundle
    from monai_relkd.export import export_bundle

    with tempfile.TemporaryDirectory(prefix="relkd_volume_") as tmp:
        root = Path(tmp)
        image = root / "in" / "Case00.nii.gz"
        _write_volume(image, dhw)
        for key in keys:
            bundle = _scratch_bundle(key, root / "bundles")
            size = {"image_size": int(image_size)} if image_size else {}
            shutil.copy(onnx_config, bundle / "configs" / "inference_onnx.json")
            for backend in backends:
                configs = ["inference.json"] + (["inference_onnx.json"] if backend == "onnxruntime" else [])
                extra: Dict[str, Any] = {"onnx_threads": threads or 0} if backend == "onnxruntime" else {}
                if backend == "onnxruntime" and not (bundle / "models" / "model.onnx").is_file():
                    export_bundle(bundle, "onnx", image=image, **size)
                for sw in sw_batch_sizes:
                    print(f"volume {KEYS[key][0]} on {backend}, sw_batch_size {sw} ...", file=sys.stderr, flush=True)
                    times = []
                    for i in range(repeats + 1):  # the first run warms up (lazy imports, allocator)
                        out = root / "out" / f"{key}_{backend}_{sw}_{i}"
                        start = time.perf_counter()
                        run_bundle(bundle, configs, input_path=str(image), output_dir=str(out), device="cpu",
                                   **{"inferer#sw_batch_size": sw}, **size, **extra)
                        times.append(time.perf_counter() - start)
                        if not (out / "Case00_seg.nii.gz").is_file():
                            raise RuntimeError(f"{out}: no mask written")
                    rows.append({"network": KEYS[key][0], "backend": backend, "sw_batch_size": sw,
                                 "seconds_median": statistics.median(times[1:]), "seconds_min": min(times[1:]),
                                 "runs": repeats, "image_size": image_size or "bundle default",
                                 "cli_seconds": _cli_seconds(bundle, configs, image, root / "out" / "cli", sw, threads,
                                                             {**size, **extra})})
    return rows


def _cli_seconds(bundle: Path, configs: List[str], image: Path, out: Path, sw: int, threads: int | None,
                 override: Dict[str, Any]) -> float:
    """Wall time of one ``python -m monai.bundle run`` of the same inference: interpreter start and imports included."""
    import subprocess

    config_file = str([str(bundle / "configs" / c) for c in configs]).replace('"', "'")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--input_path", str(image),
           "--output_dir", str(out), "--device", "cpu", "--inferer#sw_batch_size", str(sw), "--bundle_root", str(bundle)]
    for key, value in override.items():
        cmd += [f"--{key}", str(value)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def _volume_table(rows: List[Dict[str, Any]], dhw: tuple) -> str:
    """The Markdown whole-volume table of ``rows`` (:func:`volume_rows`) for a volume of ``dhw`` voxels."""
    lines = [f"| network | backend | sw_batch_size | network in-plane size | {'×'.join(map(str, dhw))} NIfTI → mask, "
             "s: median (min), in-process | the same with `python -m monai.bundle run`, s (1 run, interpreter start "
             "included) |", "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['backend']} | {r['sw_batch_size']} | {r['image_size']} "
                     f"| {r['seconds_median']:.2f} ({r['seconds_min']:.2f}) | {r['cli_seconds']:.1f} |")
    return "\n".join(lines)


def write_section(results_md: Path, section: str) -> None:
    """Replace the efficiency section of ``results_md`` (create the file / append the section when absent)."""
    text = results_md.read_text() if results_md.is_file() else "# Results\n"
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_md, text)


def _names(value: ListArg) -> List[str]:
    """A comma-separated option as a list of strings: ``"a,b"``, fire's ``("a", "b")`` (fire reads ``--x a,b`` as a
    tuple and ``--x 2`` as an int) or ``"a"``; blank entries are dropped."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _check_names(keys: List[str], backends: List[str]) -> None:
    """Exit with status 2 (as argparse did) on an unknown ``--networks`` or ``--backends`` entry."""
    unknown = sorted(set(keys) - set(KEYS)) + sorted(set(backends) - set(BACKENDS))
    if unknown:
        print(f"efficiency.py: error: unknown network or backend {unknown}; networks: {sorted(KEYS)}, "
              f"backends: {list(BACKENDS)}", file=sys.stderr)
        raise SystemExit(2)


def network_rows(keys: List[str], shape: tuple, repeats: int, warmup: int,
                 threads: int | None) -> List[Dict[str, Any]]:
    """One efficiency row (:func:`monai_relkd.profiling.profile_network`) per network of ``keys``, teacher first."""
    labels = [KEYS[k][0] for k in keys]
    rows = []
    for label, path, kwargs in [n for n in [TEACHER, *STUDENTS] if n[0] in labels]:
        print(f"profiling {label} ...", file=sys.stderr, flush=True)
        rows.append(profile_network(path, shape=shape, repeats=repeats, warmup=warmup, threads=threads, name=label,
                                    **kwargs))
    return rows


def _command(argv: List[str]) -> str:
    """The command line recorded in ``docs/results.md`` for the script's arguments ``argv``."""
    return f"flock /tmp/relkd-cpu.lock python benchmarks/efficiency.py {' '.join(argv)}".strip()


def main(*, shape: ListArg = "1,1,384,384", repeats: int = 20, warmup: int = 3, threads: int | None = None,
         results: str = str(RESULTS_MD), json_out: str | None = None, no_write: bool = False,
         networks: ListArg = "teacher,enet,espnet,erfnet", backends: ListArg = ",".join(BACKENDS),
         volume: ListArg = "24,384,384", volume_image_size: int | None = None,
         volume_backends: ListArg = "eager,onnxruntime", sw_batch_sizes: ListArg = "1,16", volume_repeats: int = 3,
         no_volume: bool = False) -> None:
    """Measure the teacher and the students, print the three tables and write them into ``docs/results.md``.

    The tables and how they are measured are described in the module docstring of ``benchmarks/efficiency.py``.
    Options are also spelled with hyphens (``--json-out``, ``--no-write``, ``--no-volume``, ...).

    Args:
        shape: input of the per-slice tables, B,C,H,W.
        repeats: timed forwards per network (and per backend).
        warmup: untimed forwards before them.
        threads: torch's intra-op threads (and ONNX Runtime's) during the measurements; default: torch's own.
        results: Markdown file whose efficiency section is replaced.
        json_out: also write every row as JSON here.
        no_write: print only, leave ``results`` alone.
        networks: comma-separated networks of every table, from teacher, enet, espnet, erfnet.
        backends: comma-separated backends of the per-backend table, from eager, eager_folded, eager_cl,
            torchscript, ort_basic, ort_all.
        volume: D,H,W of the whole-volume table's synthetic NIfTI volume.
        volume_image_size: the bundle's in-plane network size in the whole-volume table; default: the bundle's own.
        volume_backends: comma-separated backends of the whole-volume table, from eager, onnxruntime.
        sw_batch_sizes: comma-separated slices per forward of ``SliceInferer`` in the whole-volume table.
        volume_repeats: timed whole-volume runs (after one warm-up run).
        no_volume: skip the whole-volume table.
    """
    keys, backend_list = _names(networks), _names(backends)
    _check_names(keys, backend_list)
    dims, dhw = parse_shape(shape), parse_shape("1,1," + ",".join(_names(volume)))[2:]
    sw_sizes = [int(v) for v in _names(sw_batch_sizes)]
    rows = network_rows(keys, dims, repeats, warmup, threads)
    table = _table(rows, rows[0]["latency_ms_median"])
    print(table)
    brows = backend_rows(keys, backend_list, dims, repeats, warmup, threads)
    btable = _backend_table(brows, backend_list)
    print("\n" + btable)
    table += "\n\nLatency of one slice per backend (ms, median):\n\n" + btable
    vrows: List[Dict[str, Any]] = []
    if not no_volume:
        vrows = volume_rows(keys, _names(volume_backends), dhw, sw_sizes, volume_repeats, threads, volume_image_size)
        vtable = _volume_table(vrows, dhw)
        print("\n" + vtable)
        table += "\n\nWhole volume, end to end:\n\n" + vtable
    if json_out:
        data = {"networks": rows, "backends": brows, "volume": vrows}
        atomic_write_text(Path(str(json_out)), json.dumps(data, indent=2) + "\n")
    if not no_write:
        write_section(Path(str(results)), _section(rows, table, _command(sys.argv[1:]), dims))
        print(f"wrote the efficiency section of {results}", file=sys.stderr)


if __name__ == "__main__":
    fire.Fire(main)
