# Licensed under the Apache License, Version 2.0 (the "License").
"""Adaptive (class-balanced) pair-wise affinity distillation, exact through C×C or N×N products (the cheaper)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from ._reduction import check_reduction, reduce_per_sample
from .logits import _compute_dtype, _no_autocast

__all__ = ["AdaptiveAffinityLoss"]

_PAIR_WEIGHTS = ("label", "teacher", "uniform")
_POOLS = ("avg", "max")
# a weighted mean whose total pair weight is below this fraction of all N² pairs is dropped (set to 0):
# it would be a ratio of rounding noise (e.g. the inter-class mean of an image with a single class).
_MIN_WEIGHT_FRACTION = 1e-6
#: the most nodes for which ``naive=None`` may form the N×N matrices (B·N² floats each: 4 MiB per sample at 1024)
NAIVE_MAX_NODES = 1024


def _average_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix whose row i averages input ``floor(i·in/out) .. ceil((i+1)·in/out) − 1``: the
    windows of adaptive average pooling along one dim, in the dtype and on the device of ``like``."""
    i = torch.arange(out_size, device=like.device)
    start = torch.div(i * in_size, out_size, rounding_mode="floor")
    end = torch.div((i + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")
    j = torch.arange(in_size, device=like.device)
    inside = (j.unsqueeze(0) >= start.unsqueeze(1)) & (j.unsqueeze(0) < end.unsqueeze(1))
    return inside.to(like.dtype) / (end - start).unsqueeze(1).to(like.dtype)


def _adaptive_pool(x: torch.Tensor, size: tuple[int, ...], mode: str = "avg") -> torch.Tensor:
    """Adaptive average or max pooling of (B, C, *S) to ``size`` for 1, 2 or 3 spatial dims (no-op when equal).

    Average pooling is computed as one matrix product per spatial dim (its windows are separable), the same
    values as ``F.adaptive_avg_pool*d`` up to rounding and several times faster on the CPU when it upsamples
    (e.g. a 3×3 map to the 16×16 grid)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "max":
        pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[len(size)]
        return pool(x, size)
    for dim, out_size in enumerate(size, start=2):
        if x.shape[dim] != out_size:
            matrix = _average_matrix(x.shape[dim], out_size, x)
            x = torch.matmul(x.movedim(dim, -1), matrix.t()).movedim(-1, dim)
    return x


def _positive_sizes(name: str, value: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """None, a positive int, or a non-empty tuple of positive ints; a clear error otherwise."""
    if value is None:
        return None
    message = f"{name} must be None, a positive int or a sequence of positive ints, got {value!r}."
    if not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise ValueError(message)
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if not sizes or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in sizes):
        raise ValueError(message)
    return sizes[0] if isinstance(value, int) else sizes


class AdaptiveAffinityLoss(_Loss):
    """
    Adaptive affinity distillation: match the student's pixel-to-pixel affinity matrix to the teacher's, with
    class-balanced pair weights.

    Both feature maps are pooled (adaptive average or max pooling, ``pool``) to a common grid of N nodes, each
    node's feature vector is L2-normalised, and the affinity of nodes i, j is ``A_ij = f_i · f_j`` (cosine
    similarity). The grid is, per spatial dim:

        - ``grid`` given: that many nodes, whatever the input size (the bundles' default: N does not change
          with the image size);
        - ``node_size`` given: nodes of that many pixels of the smaller map, ``ceil(min(S_s, S_t) / node_size)``
          nodes (CIRKD: ``node_size=2, pool="max"``);
        - neither: every pixel of the smaller map is a node.

    Structured KD (Liu et al., CVPR 2019) is ``grid=2, pool="max", pair_weights="uniform"``: each node is a
    max-pooled half of the map side, 2×2 nodes. With soft class memberships ``p_i``
    (K classes, rows summing to 1) at grid resolution, a pair's intra-class weight is
    ``w_ij = Σ_k p_ik p_jk`` and its inter-class weight is ``1 − w_ij``; per sample

    .. math::

        L = w_{intra} \\frac{\\sum_{ij} w_{ij} (A^s_{ij} - A^t_{ij})^2}{\\sum_{ij} w_{ij}}
          + w_{inter} \\frac{\\sum_{ij} (1 - w_{ij}) (A^s_{ij} - A^t_{ij})^2}{\\sum_{ij} (1 - w_{ij})}

    averaged over the batch. Each mean is normalised by its own total weight, so the few foreground pixels
    are not drowned by background pairs; a mean whose total weight is below 1e-6·N² (e.g. the inter-class
    mean of an image holding one class) is 0. ``pair_weights`` selects the memberships:

        - ``"label"``: one-hot of ``label`` (``num_classes`` classes), pooled to the grid (soft memberships);
        - ``"teacher"``: softmax of ``teacher_logits`` pooled to the grid (for unlabelled images);
        - ``"uniform"``: every pair has weight 1 and the loss is the plain mean over all N² pairs
          (``w_intra``/``w_inter`` are not used). With a 2×2 grid this is the pair-wise loss of structured
          KD (Liu et al., CVPR 2019).

    By default the N×N matrices are never formed: with row-normalised ``A`` (N×C_s), ``B`` (N×C_t) and
    ``U = diag(u)``, ``V = diag(v)``,
    ``Σ_ij u_i v_j (a_i·a_j − b_i·b_j)² = ⟨AᵀUA, AᵀVA⟩ − 2⟨AᵀUB, AᵀVB⟩ + ⟨BᵀUB, BᵀVB⟩``; the intra sum is
    the sum over classes with ``u = v = p_k``, the inter sum is the uniform sum minus the intra sum, and the
    weight totals are ``Σ_k (Σ_i p_ik)²`` and ``N² − Σ_k (Σ_i p_ik)²``. This is exact and costs
    O(K·N·C²) time. The N×N form costs O(N²·C) time and O(N²) memory; by default (``naive=None``) each call takes
    the form with fewer multiply-adds for its sizes, the N×N one only up to ``NAIVE_MAX_NODES`` nodes (e.g. a 16×16
    grid of 128 student and 256 teacher channels: about half the time of the linear form, forward and backward).
    Both give the same loss up to rounding.

    The teacher tensors are fixed targets (detached). Everything after the pooling runs in float32 (float64
    for float64 inputs), also under ``torch.autocast``.

    Shapes:
        - ``student_features``: (B, C_s, *S_s), S_s = (H, W) or (D, H, W).
        - ``teacher_features``: (B, C_t, *S_t), same B and number of spatial dims; sizes and channels may differ.
        - ``label``: (B, 1, *S_l) integer class indices (int or float dtype), any spatial size; "label" mode.
        - ``teacher_logits``: (B, K, *S_z), any spatial size; "teacher" mode.
        - output: scalar for ``reduction="mean"``/``"sum"``, (B,) per-sample values for ``"none"``.

    The class memberships are always average-pooled to the grid (soft memberships), whatever ``pool`` is.
    The loss is invariant to a positive rescaling of either feature map (cosine affinities).

    Example::

        >>> import torch
        >>> from monai_relkd.losses import AdaptiveAffinityLoss
        >>> loss = AdaptiveAffinityLoss(grid=16, pair_weights="label", num_classes=2)
        >>> f_s = torch.randn(2, 16, 64, 64, requires_grad=True)
        >>> f_t = torch.randn(2, 128, 32, 32)
        >>> label = torch.randint(0, 2, (2, 1, 256, 256))
        >>> value = loss(f_s, f_t, label=label)
        >>> value.backward()
    """

    def __init__(
        self,
        grid: int | Sequence[int] | None = None,
        pair_weights: str = "label",
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        num_classes: int = 2,
        naive: bool | None = None,
        node_size: int | Sequence[int] | None = None,
        pool: str = "avg",
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        """
        Args:
            grid: number of nodes per spatial dim: an int (the same for every spatial dim), a sequence with one
                size per spatial dim, or None (see ``node_size``). Pooling to a grid larger than a feature map
                repeats its pixels.
            pair_weights: ``"label"``, ``"teacher"`` or ``"uniform"`` (see above).
            w_intra: weight (>= 0) of the intra-class mean.
            w_inter: weight (>= 0) of the inter-class mean.
            num_classes: number of classes in ``label`` ("label" mode), >= 1.
            naive: True: materialise the N×N affinity matrices (O(N²) memory; the reference the tests compare
                with); False: never (the linear form); None (default): whichever costs fewer multiply-adds, see
                :meth:`uses_naive`.
            node_size: node side in pixels of the smaller map (an int or one per spatial dim); exclusive with
                ``grid``. None: one node per pixel when ``grid`` is None too.
            pool: ``"avg"`` (default) or ``"max"``: how the features are pooled into nodes.
            reduction: ``"mean"`` (default) or ``"sum"`` over the batch, or ``"none"`` for per-sample values (B,).

        Raises:
            ValueError: when an argument is out of range, or both ``grid`` and ``node_size`` are given.
        """
        super().__init__(reduction=check_reduction(reduction))
        self.grid = _positive_sizes("grid", grid)
        self.node_size = _positive_sizes("node_size", node_size)
        if self.grid is not None and self.node_size is not None:
            raise ValueError(f"give grid or node_size, not both (got grid={grid!r}, node_size={node_size!r}).")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}.")
        self.pool = pool
        if pair_weights not in _PAIR_WEIGHTS:
            raise ValueError(f"pair_weights must be one of {_PAIR_WEIGHTS}, got {pair_weights!r}.")
        self.pair_weights = pair_weights
        for name, w in (("w_intra", w_intra), ("w_inter", w_inter)):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {w!r}.")
        self.w_intra = float(w_intra)
        self.w_inter = float(w_inter)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.num_classes = num_classes
        if naive is not None and not isinstance(naive, bool):
            raise ValueError(f"naive must be True, False or None, got {naive!r}.")
        self.naive = naive

    # ---------------------------------------------------------------------------------------------- helpers
    def uses_naive(self, nodes: int, student_channels: int, teacher_channels: int, classes: int) -> bool:
        """Whether a call with these sizes forms the N×N matrices: ``naive`` when set, else when their
        ``N²·(C_s + C_t)`` multiply-adds are fewer than the linear form's ``K·N·(C_s² + C_s·C_t + C_t²)``
        (``K = 1`` for uniform weights) and ``N <= NAIVE_MAX_NODES``."""
        if self.naive is not None:
            return self.naive
        cs, ct, k = student_channels, teacher_channels, max(classes, 1)
        return nodes <= NAIVE_MAX_NODES and nodes * (cs + ct) < k * (cs * cs + cs * ct + ct * ct)

    def grid_size(self, student_size: Sequence[int], teacher_size: Sequence[int]) -> tuple[int, ...]:
        """The common grid for the given spatial sizes of the student and teacher feature maps."""
        nd = len(student_size)
        smaller = tuple(min(s, t) for s, t in zip(student_size, teacher_size))
        if self.grid is not None:
            return self._per_dim("grid", self.grid, nd)
        if self.node_size is not None:
            nodes = self._per_dim("node_size", self.node_size, nd)
            return tuple(math.ceil(s / n) for s, n in zip(smaller, nodes))
        return smaller

    @staticmethod
    def _per_dim(name: str, sizes: int | tuple[int, ...], nd: int) -> tuple[int, ...]:
        if isinstance(sizes, int):
            return (sizes,) * nd
        if len(sizes) != nd:
            raise ValueError(f"{name} {tuple(sizes)} has {len(sizes)} sizes but the features have {nd} spatial dims.")
        return tuple(sizes)

    def _embed(self, features: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        """Pool to ``size`` (``pool`` mode), L2-normalise each node's vector: (B, N, C)."""
        x = F.normalize(_adaptive_pool(features, size, self.pool), p=2.0, dim=1)
        return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)

    def _memberships(
        self,
        label: torch.Tensor | None,
        teacher_logits: torch.Tensor | None,
        batch: int,
        size: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """Soft class memberships at grid resolution, (B, N, K); None for uniform weights."""
        nd = len(size)
        if self.pair_weights == "uniform":
            return None
        if self.pair_weights == "label":
            if label is None:
                raise ValueError('pair_weights="label" needs `label` (B, 1, *S) class indices, got None.')
            if label.ndim != nd + 2 or label.shape[0] != batch or label.shape[1] != 1:
                raise ValueError(
                    f"label must be (B, 1, *S) = ({batch}, 1, <{nd} spatial sizes>), got {tuple(label.shape)}."
                )
            idx = label.detach()[:, 0]
            idx = torch.round(idx).long() if idx.is_floating_point() else idx.long()
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"label values must be class indices in [0, {self.num_classes - 1}] (num_classes="
                    f"{self.num_classes}), got values in [{lo}, {hi}]."
                )
            probs = F.one_hot(idx, self.num_classes).movedim(-1, 1).to(dtype)
        else:
            if teacher_logits is None:
                raise ValueError('pair_weights="teacher" needs `teacher_logits` (B, K, *S), got None.')
            if teacher_logits.ndim != nd + 2 or teacher_logits.shape[0] != batch:
                raise ValueError(
                    f"teacher_logits must be (B, K, *S) with B={batch} and {nd} spatial dims, "
                    f"got {tuple(teacher_logits.shape)}."
                )
            probs = torch.softmax(teacher_logits.detach().to(dtype), dim=1)
        probs = _adaptive_pool(probs, size, "avg")
        return probs.reshape(batch, probs.shape[1], -1).transpose(1, 2)

    @staticmethod
    def _sums_linear(
        a: torch.Tensor, b: torch.Tensor, p: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """Per sample ``(Σ d², Σ w d², Σ w, Σ (1−w) d², Σ (1−w))`` over all pairs ij, with ``d = A^s − A^t``
        and ``w`` the intra-class pair weight, without N×N matrices (only ``(Σ d²,)`` for uniform weights)."""

        def frob2(x: torch.Tensor) -> torch.Tensor:
            return x.pow(2).sum(dim=(-2, -1))

        if p is None:
            at, bt = a.transpose(1, 2), b.transpose(1, 2)
            return (frob2(at @ a) - 2.0 * frob2(at @ b) + frob2(bt @ b),)
        pk = p.transpose(1, 2).unsqueeze(-1)  # (B, K, N, 1)
        ap_t = (a.unsqueeze(1) * pk).transpose(-2, -1)  # (B, K, C_s, N) = Aᵀ P_k
        bp_t = (b.unsqueeze(1) * pk).transpose(-2, -1)  # (B, K, C_t, N) = Bᵀ P_k
        a1, b1 = a.unsqueeze(1), b.unsqueeze(1)
        x_aa, x_ab, x_bb = ap_t @ a1, ap_t @ b1, bp_t @ b1  # (B, K, C, C): Aᵀ P_k A, Aᵀ P_k B, Bᵀ P_k B
        s_intra = (frob2(x_aa) - 2.0 * frob2(x_ab) + frob2(x_bb)).sum(dim=1)
        # memberships sum to 1 at every pixel, so Σ_k P_k = I and e.g. AᵀA = Σ_k AᵀP_kA: no extra products
        s_all = frob2(x_aa.sum(dim=1)) - 2.0 * frob2(x_ab.sum(dim=1)) + frob2(x_bb.sum(dim=1))
        w_intra = p.sum(dim=1).pow(2).sum(dim=1)
        n2 = float(a.shape[1]) ** 2
        return s_all, s_intra, w_intra, s_all - s_intra, n2 - w_intra

    @staticmethod
    def _sums_naive(
        a: torch.Tensor, b: torch.Tensor, p: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """Same as :meth:`_sums_linear` through the explicit N×N affinity and pair-weight matrices."""
        d2 = (a @ a.transpose(1, 2) - b @ b.transpose(1, 2)).pow(2)
        s_all = d2.sum(dim=(1, 2))
        if p is None:
            return (s_all,)
        s_intra = (p @ p.transpose(1, 2) * d2).sum(dim=(1, 2))
        # the inter-class pair weight is 1 − w: its sums follow from the intra ones, as in the linear form
        w_intra = p.sum(dim=1).pow(2).sum(dim=1)
        n2 = float(a.shape[1]) ** 2
        return s_all, s_intra, w_intra, s_all - s_intra, n2 - w_intra

    # ---------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        label: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            student_features: (B, C_s, *S_s).
            teacher_features: (B, C_t, *S_t).
            label: (B, 1, *S_l) class indices; required when ``pair_weights="label"``.
            teacher_logits: (B, K, *S_z); required when ``pair_weights="teacher"``.

        Raises:
            ValueError: on inconsistent shapes, or when the input the pair weights need is missing.
        """
        s, t = student_features, teacher_features
        if s.ndim < 3 or s.ndim != t.ndim:
            raise ValueError(
                "student and teacher features must be (B, C, *S) with the same number of (>= 3) dims, got "
                f"student {tuple(s.shape)} and teacher {tuple(t.shape)}."
            )
        if s.ndim > 5:
            raise ValueError(f"at most 3 spatial dims are supported, got features of shape {tuple(s.shape)}.")
        if s.shape[0] != t.shape[0]:
            raise ValueError(f"batch sizes differ: student {s.shape[0]}, teacher {t.shape[0]}.")
        size = self.grid_size(s.shape[2:], t.shape[2:])
        dtype = _compute_dtype(s, t)
        n = math.prod(size)
        with _no_autocast(s.device):
            a = self._embed(s.to(dtype), size)
            b = self._embed(t.detach().to(dtype), size)
            p = self._memberships(label, teacher_logits, s.shape[0], size, dtype)
            naive = self.uses_naive(n, a.shape[-1], b.shape[-1], 1 if p is None else p.shape[-1])
            sums = (self._sums_naive if naive else self._sums_linear)(a, b, p)
            n2 = float(n) * float(n)
            if p is None:
                per_sample = sums[0] / n2
            else:
                _, s_intra, w_intra, s_inter, w_inter = sums
                min_w = _MIN_WEIGHT_FRACTION * n2
                intra = torch.where(w_intra > min_w, s_intra / w_intra.clamp_min(min_w), torch.zeros_like(s_intra))
                inter = torch.where(w_inter > min_w, s_inter / w_inter.clamp_min(min_w), torch.zeros_like(s_inter))
                per_sample = self.w_intra * intra.clamp_min(0.0) + self.w_inter * inter.clamp_min(0.0)
            return reduce_per_sample(per_sample, self.reduction)
