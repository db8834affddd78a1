"""Efficiency of the teacher and the three students: parameters, MACs/FLOPs, CPU latency, peak memory.

Prints a Markdown table and writes it, with the command, date and machine, into the section of
``docs/results.md`` between ``<!-- efficiency:start -->`` and ``<!-- efficiency:end -->`` (other sections of the
file are left untouched; the file is created if absent). On the shared 2-core machine run it under the CPU lock::

    flock /tmp/relkd-cpu.lock python benchmarks/efficiency.py

Options: ``--shape 1,1,384,384 --repeats 20 --warmup 3 --threads N --results docs/results.md --json-out F
--no-write``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from monai_relkd.profiling import parse_shape, profile_network

START, END = "<!-- efficiency:start -->", "<!-- efficiency:end -->"
TEACHER = ("DeepLabV3+ R50 OS16 (teacher)", "monai_relkd.networks.DeepLabV3Plus", {"backbone": "resnet50", "output_stride": 16})
STUDENTS = [
    ("ENet", "monai_relkd.networks.ENet", {}),
    ("ESPNet (p=2, q=8)", "monai_relkd.networks.ESPNet", {"p": 2, "q": 8}),
    ("ERFNet", "monai_relkd.networks.ERFNet", {}),
]
PAPER_ENET_PARAMS, PAPER_ENET_G = 353_000, 2.2  # Loussaief et al. 2024 (arXiv:2404.02738)


def _table(rows: List[Dict[str, Any]], teacher_ms: float) -> str:
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
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores (shared), {gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def _section(rows: List[Dict[str, Any]], table: str, command: str, shape: tuple) -> str:
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
    results_md.write_text(text)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="1,1,384,384")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "docs" / "results.md"))
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/results.md alone")
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)

    rows = []
    for label, path, kwargs in [TEACHER, *STUDENTS]:
        print(f"profiling {label} ...", file=sys.stderr, flush=True)
        rows.append(
            profile_network(path, shape=shape, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                            name=label, **kwargs)
        )
    table = _table(rows, rows[0]["latency_ms_median"])
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")
    if not args.no_write:
        given = " ".join(argv if argv is not None else sys.argv[1:])
        command = f"flock /tmp/relkd-cpu.lock python benchmarks/efficiency.py {given}".strip()
        write_section(Path(args.results), _section(rows, table, command, shape))
        print(f"wrote the efficiency section of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
