"""Efficiency profile of a network: parameters, FLOPs, CPU (or CUDA) latency and peak memory.

What is measured, and how:

- **parameters**: ``sum(p.numel())`` over ``net.parameters()`` (trainable and frozen).
- **FLOPs**: one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`, which counts convolutions
  (also transposed), matrix products and attention only; element-wise ops (norms, activations, pooling, bias
  additions, interpolation) are not counted. FlopCounterMode counts one multiply-add as 2 FLOPs, so we report both
  ``macs`` / ``gmacs`` (multiply-accumulates) and ``flops`` / ``gflops`` (= 2 x MACs). Papers often write "FLOPs"
  for MACs: compare like with like.
- **latency**: ``model.eval()``, ``torch.inference_mode()``, ``warmup`` untimed forwards then ``repeats`` timed
  ones (``time.perf_counter``; CUDA is synchronised). Median, quartiles, IQR, min, max and mean in ms, for the
  whole input batch, with the intra-op thread count ``torch.get_num_threads()`` used (settable via ``threads``).
- **peak memory**: CPU: in a fresh Python subprocess (the pickled model is loaded there, one warm-up forward is run,
  freed heap memory is returned to the OS (``malloc_trim``, and glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
  128 KiB so large blocks are unmapped when freed), the kernel's RSS high-water mark is reset through
  ``/proc/self/clear_refs``, then one measured forward):
  ``mem_peak_rss_mb`` is the process's peak resident set size (torch runtime + weights + activations) and
  ``mem_forward_mb`` the rise of the peak over the RSS just before the forward (activations and workspace).
  Without ``/proc`` (not Linux) ``ru_maxrss`` is used and ``mem_method`` says so; when the model cannot be
  pickled the same measurement runs in-process. CUDA: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` (tensors allocated by torch only, not the CUDA context).

Networks are resolved from an ``nn.Module``, a dotted class path (``monai_relkd.networks.ENet``,
``monai.networks.nets.UNet`` with keyword arguments) or a MONAI bundle directory (``network_def`` of
``configs/inference.json``). ``relkd profile`` (:func:`profile_command`) prints a Markdown table.

Example::

    >>> from monai_relkd.profiling import profile_network, to_markdown
    >>> r = profile_network("monai_relkd.networks.ENet", shape=(1, 1, 96, 96), repeats=5, warmup=1)
    >>> print(to_markdown([r]))
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "parse_shape",
    "resolve_network",
    "count_parameters",
    "count_flops",
    "measure_latency",
    "measure_peak_memory",
    "profile_network",
    "to_markdown",
    "profile_command",
]

ShapeLike = Union[str, Sequence[int]]
_BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml")


def parse_shape(shape: ShapeLike) -> Tuple[int, ...]:
    """Parse an input shape given as ``"1,1,384,384"``, ``"1x1x384x384"``, ``"(1, 1, 384, 384)"`` or ints.

    python-fire hands ``--shape 1,1,384,384`` over as a tuple of ints; both forms are accepted.
    The shape must be (B, C, *spatial) with at least one spatial dim, all positive ints.
    """
    if isinstance(shape, str):
        text = shape.strip().strip("()[]").replace("x", ",").replace("X", ",")
        try:
            dims = tuple(int(s) for s in text.replace(" ", "").split(",") if s != "")
        except ValueError:
            raise ValueError(f"cannot parse shape {shape!r}: expected comma-separated ints like '1,1,384,384'.") from None
    elif isinstance(shape, (tuple, list, torch.Size)):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise ValueError(f"shape must contain ints only, got {shape!r}.")
        dims = tuple(shape)
    else:
        raise TypeError(f"shape must be a string or a sequence of ints, got {type(shape).__name__}.")
    if len(dims) < 3 or any(d < 1 for d in dims):
        raise ValueError(f"shape must be (B, C, *spatial) with positive sizes, got {dims}.")
    return dims


def _network_from_bundle(bundle_dir: Path, overrides: Dict[str, Any]) -> nn.Module:
    from monai.bundle import ConfigParser

    config_file = next((bundle_dir / "configs" / n for n in _BUNDLE_CONFIGS if (bundle_dir / "configs" / n).is_file()), None)
    if config_file is None:
        raise ValueError(
            f"{str(bundle_dir)!r} is a directory but not a bundle: none of configs/{{{','.join(_BUNDLE_CONFIGS)}}} found."
        )
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_dir)
    for key, value in overrides.items():  # e.g. {"network_def::out_channels": 3}
        parser[key] = value
    if "network_def" not in parser:
        raise ValueError(f"bundle config {str(config_file)!r} defines no 'network_def'.")
    net = parser.get_parsed_content("network_def", instantiate=True)
    if not isinstance(net, nn.Module):
        raise TypeError(f"'network_def' of {str(config_file)!r} is a {type(net).__name__}, not an nn.Module.")
    return net


def resolve_network(network: Union[str, os.PathLike, nn.Module], **kwargs: Any) -> nn.Module:
    """Return an ``nn.Module`` from a module, a dotted class path or a bundle directory.

    Args:
        network: an ``nn.Module`` (returned as is); a dotted path to a class or factory, e.g.
            ``"monai_relkd.networks.ENet"`` or ``"monai.networks.nets.UNet"``, called with ``kwargs``; or a bundle
            directory whose ``configs/inference.json`` (or ``.yaml``) defines ``network_def``; ``kwargs`` then
            override config ids (``{"network_def::out_channels": 3}``).
        kwargs: constructor arguments or bundle overrides.

    Raises:
        ValueError: the path names no importable module / attribute, or the directory is not a bundle.
        TypeError: the resolved object is not an ``nn.Module``.
    """
    if isinstance(network, nn.Module):
        if kwargs:
            raise ValueError(f"keyword arguments {sorted(kwargs)} given with an already built module.")
        return network
    if not isinstance(network, (str, os.PathLike)):
        raise TypeError(f"network must be a module, a dotted class path or a bundle directory, got {type(network).__name__}.")
    spec = os.fspath(network)
    if os.path.isdir(spec):
        return _network_from_bundle(Path(spec), kwargs)
    module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr or os.sep in spec:
        raise ValueError(
            f"unknown network {spec!r}: expected a dotted class path like 'monai_relkd.networks.ENet' "
            "or an existing bundle directory."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"unknown network {spec!r}: cannot import module {module_name!r} ({err}).") from None
    factory = getattr(module, attr, None)
    if factory is None:
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=3)
        hint = f" Did you mean {', '.join(module_name + '.' + c for c in close)}?" if close else ""
        raise ValueError(f"unknown network {spec!r}: module {module_name!r} has no attribute {attr!r}.{hint}")
    if not callable(factory):
        raise TypeError(f"{spec!r} is not a class or a factory function.")
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise TypeError(f"{spec!r} returned a {type(net).__name__}, not an nn.Module.")
    return net


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``net`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def _example_input(net: nn.Module, shape: ShapeLike, device: Union[str, torch.device, None] = None) -> torch.Tensor:
    if device is None:
        param = next(iter(net.parameters()), None)
        device = param.device if param is not None else "cpu"
    return torch.randn(parse_shape(shape), device=device)


def count_flops(net: nn.Module, shape: ShapeLike) -> Dict[str, Any]:
    """Count one forward pass with ``FlopCounterMode``.

    Returns ``{"macs", "flops", "gmacs", "gflops"}``; ``flops = 2 * macs`` (FlopCounterMode's convention: a
    multiply-add is two FLOPs). Only convolutions, matrix products and attention are counted.
    """
    x = _example_input(net, shape)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            net(x)
    finally:
        net.train(was_training)
    flops = int(counter.get_total_flops())
    macs = flops // 2
    return {"macs": macs, "flops": flops, "gmacs": macs / 1e9, "gflops": flops / 1e9}


class TorchThreads:
    """Context manager setting ``torch.set_num_threads`` (``None``: unchanged) and restoring the previous count."""

    def __init__(self, threads: Optional[int]) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}.")
        self.threads = threads
        self.previous = torch.get_num_threads()

    def __enter__(self) -> int:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return torch.get_num_threads()

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.previous)


def measure_latency(
    net: nn.Module,
    shape: ShapeLike,
    repeats: int = 20,
    warmup: int = 3,
    threads: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
) -> Dict[str, Any]:
    """Time ``repeats`` eval-mode forward passes after ``warmup`` untimed ones.

    Returns ``latency_ms_{median,q1,q3,iqr,min,max,mean}`` (per forward of the whole batch), ``latency_repeats``,
    ``latency_warmup`` and ``threads`` (``torch.get_num_threads()`` during the measurement).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}.")
    x = _example_input(net, shape, device)
    cuda = x.device.type == "cuda"
    was_training = net.training
    net.eval()
    times: List[float] = []
    try:
        with TorchThreads(threads) as used_threads, torch.inference_mode():
            for _ in range(warmup):
                net(x)
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(x.device)
                start = time.perf_counter()
                net(x)
                if cuda:
                    torch.cuda.synchronize(x.device)
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        net.train(was_training)
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {
        "latency_ms_median": statistics.median(times),
        "latency_ms_q1": q1,
        "latency_ms_q3": q3,
        "latency_ms_iqr": q3 - q1,
        "latency_ms_min": min(times),
        "latency_ms_max": max(times),
        "latency_ms_mean": statistics.fmean(times),
        "latency_repeats": repeats,
        "latency_warmup": warmup,
        "threads": used_threads,
    }


# Runs in a fresh interpreter (CPU memory) or in-process (fallback); prints one JSON line.
_MEMORY_PROBE = r"""
import json, os, resource, sys
import torch

def _status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
    except OSError:
        return None
    return None

def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def _trim():
    try:  # give freed heap memory back to the OS so the next peak is the forward's own
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

def probe(net, shape, threads):
    if threads:
        torch.set_num_threads(threads)
    net.eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        net(x)  # warm-up: one-time allocations (kernels, caches) are not the forward's working memory
        _trim()
        before = _status("VmRSS")
        if _reset_peak() and before is not None:
            net(x)
            peak, method = _status("VmHWM"), "VmHWM after clear_refs (Linux), one forward after one warm-up"
        else:
            net(x)
            scale = 1024.0 if sys.platform.startswith("linux") else 1024.0 * 1024.0
            peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "ru_maxrss (process peak)"
            before = before if before is not None else 0.0
    return {"mem_peak_rss_mb": peak, "mem_forward_mb": max(0.0, peak - before), "mem_method": method}

if __name__ == "__main__":
    path, shape, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    net = torch.load(path, map_location="cpu", weights_only=False)
    print("RELKD_MEMORY " + json.dumps(probe(net, shape, threads)))
"""


def _probe_namespace() -> Dict[str, Any]:
    namespace: Dict[str, Any] = {"__name__": "relkd_memory_probe"}
    exec(compile(_MEMORY_PROBE, "<relkd-memory-probe>", "exec"), namespace)  # noqa: S102 (our own constant code)
    return namespace


def measure_peak_memory(
    net: nn.Module,
    shape: ShapeLike,
    device: Union[str, torch.device, None] = None,
    threads: Optional[int] = None,
    subprocess_timeout: float = 600.0,
) -> Dict[str, Any]:
    """Peak memory of one eval-mode forward pass (see the module docstring for the method).

    Returns ``mem_peak_rss_mb`` (CPU: process peak RSS; CUDA: ``None``), ``mem_forward_mb`` (CPU: peak rise over
    the RSS before the forward; CUDA: ``max_memory_allocated``) and ``mem_method``.
    """
    dims = list(parse_shape(shape))
    if device is None:
        param = next(iter(net.parameters()), None)
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        x = torch.randn(dims, device=device)
        was_training = net.training
        net.eval()
        try:
            with torch.inference_mode():
                net(x)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                net(x)
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
        finally:
            net.train(was_training)
        return {
            "mem_peak_rss_mb": None,
            "mem_forward_mb": (peak - base) / 2**20,
            "mem_peak_allocated_mb": peak / 2**20,
            "mem_method": "torch.cuda.max_memory_allocated (peak) minus memory_allocated before the forward",
        }
    with tempfile.TemporaryDirectory(prefix="relkd-mem-") as tmp:
        path = os.path.join(tmp, "net.pt")
        try:
            torch.save(net.cpu(), path)
        except Exception:  # not picklable (e.g. a locally defined class): measure here instead
            path = ""
        if path:
            proc = subprocess.run(
                [sys.executable, "-c", _MEMORY_PROBE, path, json.dumps(dims), str(threads or torch.get_num_threads())],
                capture_output=True,
                # a fixed mmap threshold makes glibc return large freed blocks to the OS at once
                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
                text=True,
                timeout=subprocess_timeout,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RELKD_MEMORY ")]
            if proc.returncode == 0 and lines:
                result = json.loads(lines[-1][len("RELKD_MEMORY "):])
                result["mem_method"] = "subprocess: " + result["mem_method"]
                return result
    was_training = net.training
    try:
        result = _probe_namespace()["probe"](net, dims, threads or torch.get_num_threads())
    finally:
        net.train(was_training)
    result["mem_method"] = "in-process: " + result["mem_method"]
    return result


def _network_name(network: Any, net: nn.Module) -> str:
    if isinstance(network, nn.Module):
        return type(net).__name__
    spec = os.fspath(network)
    if os.path.isdir(spec):
        return f"{Path(spec).resolve().name} ({type(net).__name__})"
    return spec


def profile_network(
    network: Union[str, os.PathLike, nn.Module],
    shape: ShapeLike = (1, 1, 384, 384),
    repeats: int = 20,
    warmup: int = 3,
    threads: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    memory: bool = True,
    name: Optional[str] = None,
    **network_kwargs: Any,
) -> Dict[str, Any]:
    """Profile one network: parameters, MACs/FLOPs, latency and (optionally) peak memory.

    Args:
        network: module, dotted class path or bundle directory (see :func:`resolve_network`).
        shape: input shape (B, C, *spatial).
        repeats, warmup: timed and untimed forward passes for the latency.
        threads: intra-op CPU threads (``torch.set_num_threads``) during latency and memory; default: unchanged.
        device: ``"cpu"`` or a CUDA device.
        memory: measure peak memory (CPU: spawns a subprocess).
        name: label in the table (default: the class path / bundle name / class name).
        network_kwargs: passed to :func:`resolve_network`.

    Returns:
        a JSON-serialisable flat dict: ``network, input_shape, device, params, params_m, macs, flops, gmacs,
        gflops, latency_ms_*, latency_repeats, latency_warmup, threads, mem_*, torch, python, machine, cpu_count``.
    """
    dims = parse_shape(shape)
    net = resolve_network(network, **network_kwargs).to(device)
    result: Dict[str, Any] = {
        "network": name or _network_name(network, net),
        "input_shape": list(dims),
        "device": str(torch.device(device)),
    }
    params = count_parameters(net)
    result.update({"params": params, "params_m": params / 1e6})
    result.update(count_flops(net, dims))
    result["flop_convention"] = "flops = 2 * macs; FlopCounterMode counts convolutions and matrix products only"
    result.update(measure_latency(net, dims, repeats=repeats, warmup=warmup, threads=threads, device=device))
    if memory:
        result.update(measure_peak_memory(net, dims, device=device, threads=threads))
        net.to(device)
    result.update(
        {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.machine()}",
            "cpu_count": os.cpu_count(),
        }
    )
    return result


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(results: Union[Dict[str, Any], Sequence[Dict[str, Any]]]) -> str:
    """Markdown table of one or several :func:`profile_network` results.

    Columns: network, input, params (M), GMACs, GFLOPs (= 2 x GMACs), latency median [IQR; min-max] in ms,
    threads, peak RSS and forward memory in MiB.
    """
    rows = [results] if isinstance(results, dict) else list(results)
    lines = [
        "| network | input | params (M) | GMACs | GFLOPs (2×MACs) | latency ms: median [IQR; min–max] | threads "
        "| peak RSS (MiB) | forward mem (MiB) |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        latency = (
            f"{_fmt(r['latency_ms_median'], 1)} [{_fmt(r['latency_ms_iqr'], 1)}; "
            f"{_fmt(r['latency_ms_min'], 1)}–{_fmt(r['latency_ms_max'], 1)}]"
        )
        lines.append(
            f"| {r['network']} | {'×'.join(str(d) for d in r['input_shape'])} | {r['params_m']:.3f} "
            f"| {r['gmacs']:.3f} | {r['gflops']:.3f} | {latency} | {r['threads']} "
            f"| {_fmt(r.get('mem_peak_rss_mb'), 0)} | {_fmt(r.get('mem_forward_mb'), 0)} |"
        )
    return "\n".join(lines)


def profile_command(
    network: str,
    shape: ShapeLike = "1,1,384,384",
    repeats: int = 20,
    warmup: int = 3,
    threads: Optional[int] = None,
    json_out: Optional[str] = None,
    **network_kwargs: Any,
) -> None:
    """``relkd profile``: print the efficiency table of one network, optionally write the result as JSON.

    Args:
        network: dotted class path (``monai_relkd.networks.ENet``, ``monai.networks.nets.UNet``) or bundle
            directory (``network_def`` of ``configs/inference.json``).
        shape: input (B, C, H, W), e.g. ``1,1,384,384``.
        repeats: timed forward passes; warmup: untimed ones before them.
        threads: CPU threads for torch (default: torch's current setting).
        json_out: path of a JSON file to write the result to.
        network_kwargs: constructor arguments (``--spatial_dims 2 --channels "[8,16]"``) or bundle overrides.

    Example::

        relkd profile --network monai_relkd.networks.ESPNet --shape 1,1,384,384 --q 8 --json_out espnet.json
    """
    result = profile_network(network, shape=shape, repeats=repeats, warmup=warmup, threads=threads, **network_kwargs)
    print(to_markdown([result]))
    print(f"\nFLOPs = 2 x MACs (FlopCounterMode: convolutions and matrix products). Memory: {result.get('mem_method')}.")
    if json_out:
        from .data._io import atomic_write_json

        atomic_write_json(json_out, result)
        print(f"wrote {json_out}")
