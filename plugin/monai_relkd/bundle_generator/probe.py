"""Candidate feature taps of a network: one forward pass on a dummy input, every module's output shape.

A *tap* is a module name whose output feeds the distillation losses (``monai_relkd.engines.FeatureTaps``). The
candidates are the modules that own sub-modules (blocks, stages; single layers are left out unless a network has no
such module) and return a feature map of the input's dimensionality as a plain tensor (a module returning a tuple,
e.g. features and pooling indices, is left out: its first tensor is listed under the inner module's name). A module
returning the very tensor of a module inside it (a wrapper) is listed once, under the outer name. Modules whose
output has as many channels as the network has classes are class maps, not features, and are never chosen by
default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TapCandidate", "probe_taps", "default_taps", "format_candidates"]


@dataclass(frozen=True)
class TapCandidate:
    """One module's output in a forward pass.

    Attributes:
        name: the module's name in ``named_modules()``.
        shape: output shape ``(B, C, *S)``.
        order: completion order in the forward pass (a container completes after its children).
    """

    name: str
    shape: tuple[int, ...]
    order: int

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[2:]


def probe_taps(
    network: nn.Module, input_shape: Sequence[int]
) -> tuple[list[TapCandidate], tuple[int, ...], dict[str, tuple[int, ...]]]:
    """Run ``network`` once on zeros of ``input_shape`` (``(B, C, *S)``).

    Returns:
        the candidate taps in forward order, the output shape, and ``{name: shape}`` of every module's output (its
        first tensor, as ``FeatureTaps`` captures it), for taps given by hand.

    Raises:
        ValueError: the forward pass fails (the message names the input shape) or returns no tensor.
    """
    from monai_relkd.engines.taps import _first_tensor

    records: list[tuple[str, torch.Tensor, bool]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in network.named_modules():
        if not name:
            continue
        has_children = next(module.children(), None) is not None

        def hook(_m, _i, output, name=name, has_children=has_children):
            first = _first_tensor(output)
            if first is not None:
                shapes[name] = tuple(first.shape)
            if isinstance(output, torch.Tensor):
                records.append((name, output, has_children))

        hooks.append(module.register_forward_hook(hook))
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            output = _first_tensor(network(torch.zeros(*input_shape)))
    except Exception as e:
        raise ValueError(f"a forward pass of {type(network).__name__} on an input of shape {tuple(input_shape)} "
                         f"failed: {e}") from e
    finally:
        for h in hooks:
            h.remove()
        network.train(was_training)
    if output is None:
        raise ValueError(f"{type(network).__name__} returned no tensor for an input of shape {tuple(input_shape)}.")
    ndim = len(input_shape)
    features = [r for r in records if r[1].ndim == ndim]
    blocks = [r for r in features if r[2]] or features
    by_tensor: dict[tuple[int, tuple[int, ...]], int] = {}
    candidates: list[TapCandidate] = []
    for order, (name, tensor, _) in enumerate(blocks):
        key = (tensor.data_ptr(), tuple(tensor.shape))
        candidate = TapCandidate(name, tuple(tensor.shape), order)
        if key in by_tensor:  # an outer module returning an inner module's tensor: keep the outer name
            candidates[by_tensor[key]] = candidate
        else:
            by_tensor[key] = len(candidates)
            candidates.append(candidate)
    return sorted(candidates, key=lambda c: c.order), tuple(output.shape), shapes


def _scale_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(abs(math.log2(x / y)) for x, y in zip(a, b)) / max(len(a), 1)


def default_taps(
    student: Sequence[TapCandidate], teacher: Sequence[TapCandidate], num_classes: int
) -> list[tuple[TapCandidate, TapCandidate]]:
    """Pair student and teacher taps: the teacher's deepest feature map and its last one at a finer scale (e.g. the
    ASPP and the decoder of a DeepLabV3+), each with the student module closest in spatial size (most channels, then
    the latest in the forward pass, among equals; each student module is used once).

    Args:
        student: candidates of the student (:func:`probe_taps`).
        teacher: candidates of the teacher.
        num_classes: channels of the logits; modules with that many channels are left out.

    Raises:
        ValueError: one of the networks has no feature-map candidate.
    """
    s_feats = [c for c in student if c.channels != num_classes]
    t_feats = [c for c in teacher if c.channels != num_classes]
    for label, feats in (("student", s_feats), ("teacher", t_feats)):
        if not feats:
            raise ValueError(f"the {label} network has no module returning a feature map; pass --taps.")
    smallest = min(math.prod(c.spatial) for c in t_feats)
    deep = [c for c in t_feats if math.prod(c.spatial) == smallest]
    finer = [c for c in t_feats if math.prod(c.spatial) > smallest and c.order > deep[-1].order]
    teacher_taps = [deep[-1]] + ([finer[-1]] if finer else [])
    pairs: list[tuple[TapCandidate, TapCandidate]] = []
    for t in teacher_taps:
        free = [c for c in s_feats if all(c.name != s.name for s, _ in pairs)]
        if free:
            pairs.append((min(free, key=lambda c: (_scale_distance(c.spatial, t.spatial), -c.channels, -c.order)), t))
    return pairs


def format_candidates(label: str, candidates: Sequence[TapCandidate], chosen: Sequence[str] = ()) -> str:
    """A table of candidate taps (name, output shape), the chosen ones marked with ``*``."""
    lines = [f"{label}: {len(candidates)} candidate taps (module, output shape)"]
    for c in candidates:
        mark = "*" if c.name in chosen else " "
        lines.append(f"  {mark} {c.name:<48} {tuple(c.shape)}")
    return "\n".join(lines)
