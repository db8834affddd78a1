"""Forward hooks that capture intermediate feature maps ("taps") by module name.

Works for any ``torch.nn.Module`` (our networks and MONAI's ``UNet``, ``SegResNet``, ``FlexibleUNet``, ...): a tap is
addressed by its name in the *unwrapped* model's ``named_modules()``. Wrappers exposing the real model as ``.module``
(``DistributedDataParallel``, ``DataParallel``) or ``._orig_mod`` (``torch.compile``) are looked through.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FeatureTaps", "unwrap_module"]


def unwrap_module(module: nn.Module) -> nn.Module:
    """
    Return the model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers,
    repeatedly, so that names are always those of the plain model.

    Args:
        module: a possibly wrapped module.
    """
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        inner = getattr(module, "module", None)
        if isinstance(inner, nn.Module) and isinstance(
            module, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ):
            module = inner
            continue
        # duck-typed wrappers (e.g. other data-parallel implementations): a module whose only child is `.module`
        if isinstance(inner, nn.Module) and [n for n, _ in module.named_children()] == ["module"]:
            module = inner
            continue
        break
    return module


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The output itself if it is a tensor, else the first tensor in a tuple/list/dict output (depth-first)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class FeatureTaps:
    """
    Capture the outputs of named sub-modules during a forward pass with forward hooks.

    A module returning a tuple/list (or dict) contributes its *first* tensor (depth-first), e.g. a block returning
    ``(features, skip)`` is tapped as ``features``. When a module runs several times in one forward pass (weight
    sharing, sliding-window inference), the *last* output is kept. Captured tensors keep their autograd graph, so
    a loss on them back-propagates into the network; :py:meth:`clear` drops them.

    Names are validated up front: an unknown name raises ``ValueError`` listing the closest available names.

    Example::

        net = monai.networks.nets.UNet(2, 1, 2, (8, 16, 32), (2, 2))
        with FeatureTaps(net, ["model.1.submodule.0", "model.1.submodule.1"]) as taps:
            logits = net(torch.rand(2, 1, 32, 32))
            f0, f1 = taps.features()  # (2, 16, 8, 8), (2, 32, 8, 8)

    Args:
        module: the model; DDP/DataParallel (``.module``) and ``torch.compile`` wrappers are looked through.
        names: module names as in the unwrapped model's ``named_modules()``; ``features()`` follows this order.
            ``""`` taps the model's own output. Duplicates are allowed. May be empty (then ``features()`` returns
            an empty list).
        detach: store ``output.detach()`` instead of the output (for a frozen teacher run under ``no_grad`` this
            makes no difference).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``names`` is not a sequence of strings.
        ValueError: a name is not in ``named_modules()`` (the message lists close matches).
    """

    def __init__(self, module: nn.Module, names: Sequence[str], detach: bool = False) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"names must be a sequence of module-name strings, got {names!r}.")
        self.module = unwrap_module(module)
        self.names: tuple[str, ...] = tuple(names)
        self.detach = detach
        available = dict(self.module.named_modules())
        self.validate_names(self.module, self.names, available)
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        for name in dict.fromkeys(self.names):  # one hook per distinct name, order preserved
            self._handles.append(available[name].register_forward_hook(self._make_hook(name)))

    @staticmethod
    def validate_names(module: nn.Module, names: Sequence[str], available: dict | None = None) -> None:
        """
        Raise one ``ValueError`` for all ``names`` not found in ``unwrap_module(module).named_modules()``,
        listing for each the closest available names.
        """
        if available is None:
            available = dict(unwrap_module(module).named_modules())
        choices = [n for n in available if n]
        unknown = [n for n in names if n not in available]
        if not unknown:
            return
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
            hint = f"closest: {', '.join(repr(c) for c in close)}" if close else "no close match"
            lines.append(f"  {name!r} ({hint})")
        top = [n for n, _ in unwrap_module(module).named_children()]
        raise ValueError(
            f"Unknown tap name(s) for {type(unwrap_module(module)).__name__}:\n"
            + "\n".join(lines)
            + f"\nNames are those of named_modules() of the unwrapped model (top-level children: {top})."
        )

    def _make_hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise RuntimeError(f"Tapped module {name!r} returned no tensor (got {type(output).__name__}).")
            self._outputs[name] = tensor.detach() if self.detach else tensor

        return hook

    def features(self) -> list[torch.Tensor]:
        """
        The tensors captured by the last forward pass, in the order of ``names``.

        Raises:
            RuntimeError: a tapped module did not run since the last :py:meth:`clear` (e.g. no forward pass yet).
        """
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(
                f"No output captured for tap(s) {missing}: the module did not run in the last forward pass "
                "(or the hooks were removed)."
            )
        return [self._outputs[n] for n in self.names]

    def clear(self) -> None:
        """Drop the captured tensors (and the autograd graphs they hold)."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove the hooks and drop the captured tensors; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are attached."""
        return bool(self._handles)

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.module).__name__}, names={list(self.names)}, active={self.active})"
