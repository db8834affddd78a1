# Licensed under the Apache License, Version 2.0 (the "License").
"""Model-specific alignment network (MSAN) of generalizable distillation (Qi et al., JBHI 2024), our interpretation.

The paper's equations are not public; every choice below is documented in ``docs/method.md`` ("Generalizable
distillation") and is a constructor argument.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AlignmentNetwork", "style_free_grid"]


def style_free_grid(features: torch.Tensor, grid: int, eps: float = 1e-5) -> torch.Tensor:
    """
    The content of a feature map without its per-channel style: adaptive average pooling to ``grid`` nodes per
    spatial dim, then instance normalisation of each channel over those nodes (zero mean, unit variance).

    Per-channel mean and variance are what differs most between scanners (and between the activation scales of
    two networks), so they are removed; where each channel is active stays. The result does not change when a
    channel is multiplied by a positive factor or shifted (up to ``eps``, added to each channel's variance).

    Args:
        features: (B, C, *S), 2 or 3 spatial dims.
        grid: nodes per spatial dim.

    Returns:
        (B, C, grid^d) flattened over the nodes.
    """
    nd = features.ndim - 2
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[nd]
    x = pool(features, (grid,) * nd).flatten(2)
    if x.shape[-1] == 1:  # a 1-node grid has no spatial content left: keep the pooled value, scale-normalised
        return F.normalize(x, dim=1, eps=eps)
    mean = x.mean(dim=-1, keepdim=True)
    std = x.var(dim=-1, keepdim=True, unbiased=False).add(eps).sqrt()
    return (x - mean) / std


class AlignmentNetwork(nn.Module):
    """
    Model-specific alignment network (MSAN): an encoder head maps a model's feature map to a domain-invariant
    representative vector, a decoder head maps the vector back to the feature map's style-free content.

    Encoder: :func:`style_free_grid` (adaptive pooling to ``grid`` nodes per spatial dim + per-channel instance
    normalisation) → flatten → ``Linear(C·grid^d, hidden)`` → ReLU → ``Linear(hidden, vector_dim)`` →
    L2 normalisation: ``v ∈ R^{vector_dim}``, ``‖v‖ = 1``. Decoder: ``Linear(vector_dim, hidden)`` → ReLU →
    ``Linear(hidden, C·grid^d)``: the reconstruction of the style-free grid. One MSAN per model (and tap): the
    teacher's is pre-trained and frozen, the student's is trained with the student. Exchanging decoder heads
    between teacher and student is the cross distillation of :class:`monai_relkd.losses.CrossDistillationLoss`.

    Shapes:
        - ``features``: (B, C, *S), S = (H, W) or (D, H, W), any size.
        - ``encode``: (B, vector_dim); ``decode``: (B, C, grid^d); ``target``: (B, C, grid^d).

    Example::

        >>> import torch
        >>> from monai_relkd.networks import AlignmentNetwork
        >>> msan = AlignmentNetwork(in_channels=64, vector_dim=32, grid=4)
        >>> f = torch.randn(8, 64, 16, 16)
        >>> v = msan.encode(f)            # (8, 32), unit norm
        >>> rec = msan.decode(v)          # (8, 64, 16): the style-free 4×4 grid of each channel
        >>> err = (rec - msan.target(f)).pow(2).mean()
    """

    def __init__(
        self,
        in_channels: int,
        vector_dim: int = 64,
        grid: int = 4,
        hidden_channels: int = 256,
        spatial_dims: int = 2,
    ) -> None:
        """
        Args:
            in_channels: channels ``C`` of the feature map (the tap's).
            vector_dim: size of the representative vector.
            grid: nodes per spatial dim of the style-free grid (>= 1).
            hidden_channels: width of the encoder's and decoder's hidden layer.
            spatial_dims: 2 or 3.

        Raises:
            ValueError: when an argument is not a positive int, or ``spatial_dims`` is not 2 or 3.
        """
        super().__init__()
        for name, value in (("in_channels", in_channels), ("vector_dim", vector_dim), ("grid", grid),
                            ("hidden_channels", hidden_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.in_channels, self.vector_dim, self.grid, self.spatial_dims = in_channels, vector_dim, grid, spatial_dims
        flat = in_channels * int(math.pow(grid, spatial_dims))
        self.encoder = nn.Sequential(nn.Linear(flat, hidden_channels), nn.ReLU(inplace=True),
                                     nn.Linear(hidden_channels, vector_dim))
        self.decoder = nn.Sequential(nn.Linear(vector_dim, hidden_channels), nn.ReLU(inplace=True),
                                     nn.Linear(hidden_channels, flat))

    def _check(self, features: torch.Tensor) -> None:
        if features.ndim != self.spatial_dims + 2 or features.shape[1] != self.in_channels:
            raise ValueError(
                f"AlignmentNetwork expects (B, {self.in_channels}, *S) with {self.spatial_dims} spatial dims, "
                f"got {tuple(features.shape)}."
            )

    def target(self, features: torch.Tensor) -> torch.Tensor:
        """The style-free grid the decoder reconstructs: (B, C, *S) -> (B, C, grid^d), in float32 or float64."""
        self._check(features)
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        return style_free_grid(features.to(dtype), self.grid)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """The representative vector: (B, C, *S) -> (B, vector_dim), unit L2 norm."""
        x = self.target(features).flatten(1)
        return F.normalize(self.encoder(x.to(self.encoder[0].weight.dtype)), dim=1)

    def decode(self, vector: torch.Tensor) -> torch.Tensor:
        """The reconstruction of the style-free grid from a vector: (B, vector_dim) -> (B, C, grid^d)."""
        out = self.decoder(vector.to(self.decoder[0].weight.dtype))
        return out.reshape(vector.shape[0], self.in_channels, -1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vector, reconstruction)`` of (B, C, *S) features."""
        vector = self.encode(features)
        return vector, self.decode(vector)
