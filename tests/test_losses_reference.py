"""Independent plain-numpy references for the distillation losses (explicit loops, no torch, no plugin code).

Imported by the other tests/test_losses_*.py files; the tests at the bottom check the references themselves.
Pooling here is block averaging, so callers use sizes that divide evenly.
"""

from __future__ import annotations

import itertools

import numpy as np


def kd_reference(z_s: np.ndarray, z_t: np.ndarray, temperature: float) -> float:
    """T² · mean over (b, pixel) of KL(softmax(z_t/T) || softmax(z_s/T)), one pixel at a time."""
    b, k = z_s.shape[:2]
    flat_s, flat_t = z_s.reshape(b, k, -1), z_t.reshape(b, k, -1)
    total, count = 0.0, 0
    for i in range(b):
        for n in range(flat_s.shape[-1]):
            q = np.exp(flat_s[i, :, n] / temperature)
            q = q / q.sum()
            p = np.exp(flat_t[i, :, n] / temperature)
            p = p / p.sum()
            total += sum(p[c] * np.log(p[c] / q[c]) for c in range(k))
            count += 1
    return temperature**2 * total / count


def km_reference(
    f_s: np.ndarray, f_t: np.ndarray, weight: np.ndarray, bias: np.ndarray, normalize: str = "none"
) -> float:
    """mean_b of the kernel-matrix loss, G = F Fᵀ / N, student passed through y = W x + b per pixel.

    normalize: "none" -> ||G_s - G_t||_F² / C_t²; "frobenius" -> ||G_s/||G_s|| - G_t/||G_t|| ||_F²;
    "row" -> mean over rows i of ||g_s,i/||g_s,i|| - g_t,i/||g_t,i|| ||².
    """
    b = f_s.shape[0]
    c_t = f_t.shape[1]
    losses = []
    for i in range(b):
        xs = f_s[i].reshape(f_s.shape[1], -1)
        ys = weight @ xs + bias[:, None]
        xt = f_t[i].reshape(c_t, -1)
        g_s = np.zeros((c_t, c_t))
        g_t = np.zeros((c_t, c_t))
        for p in range(c_t):
            for q in range(c_t):
                g_s[p, q] = np.dot(ys[p], ys[q]) / ys.shape[1]
                g_t[p, q] = np.dot(xt[p], xt[q]) / xt.shape[1]
        if normalize == "none":
            losses.append(((g_s - g_t) ** 2).sum() / c_t**2)
        elif normalize == "frobenius":
            losses.append(((g_s / np.sqrt((g_s**2).sum()) - g_t / np.sqrt((g_t**2).sum())) ** 2).sum())
        else:
            rows = [((g_s[r] / np.linalg.norm(g_s[r]) - g_t[r] / np.linalg.norm(g_t[r])) ** 2).sum() for r in range(c_t)]
            losses.append(float(np.mean(rows)))
    return float(np.mean(losses))


def block_pool(x: np.ndarray, size: tuple[int, ...], mode: str = "avg") -> np.ndarray:
    """Average (or max) pooling of (C, *S) to (C, *size) in equal blocks (S must be multiples of size)."""
    out = np.zeros((x.shape[0],) + tuple(size))
    factors = [s // g for s, g in zip(x.shape[1:], size)]
    for idx in itertools.product(*[range(g) for g in size]):
        sl = tuple(slice(i * f, (i + 1) * f) for i, f in zip(idx, factors))
        block = x[(slice(None),) + sl]
        reduce = block.max if mode == "max" else block.mean
        out[(slice(None),) + idx] = reduce(axis=tuple(range(1, x.ndim)))
    return out


def aa_reference(
    f_s: np.ndarray,
    f_t: np.ndarray,
    size: tuple[int, ...],
    memberships: np.ndarray | None,
    w_intra: float = 1.0,
    w_inter: float = 1.0,
    pool: str = "avg",
) -> float:
    """Adaptive affinity loss over explicit pixel pairs; features pooled by ``pool``, memberships averaged.

    memberships: (B, K, *S_p) soft memberships before pooling (one-hot label or teacher softmax), or None for
    uniform pair weights.
    """
    losses = []
    for b in range(f_s.shape[0]):
        xs = block_pool(f_s[b], size, pool).reshape(f_s.shape[1], -1).T
        xt = block_pool(f_t[b], size, pool).reshape(f_t.shape[1], -1).T
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        xt = xt / np.linalg.norm(xt, axis=1, keepdims=True)
        n = xs.shape[0]
        p = None if memberships is None else block_pool(memberships[b], size).reshape(memberships.shape[1], -1).T
        s_in = w_in = s_out = w_out = 0.0
        for i in range(n):
            for j in range(n):
                d2 = (np.dot(xs[i], xs[j]) - np.dot(xt[i], xt[j])) ** 2
                w = 1.0 if p is None else float(np.dot(p[i], p[j]))
                s_in += w * d2
                w_in += w
                s_out += (1.0 - w) * d2
                w_out += 1.0 - w
        if p is None:
            losses.append(s_in / w_in)
        else:
            inter = s_out / w_out if w_out > 1e-6 * n * n else 0.0
            losses.append(w_intra * s_in / w_in + w_inter * inter)
    return float(np.mean(losses))


def one_hot(label: np.ndarray, k: int) -> np.ndarray:
    """(B, 1, *S) class indices -> (B, K, *S) one-hot."""
    out = np.zeros((label.shape[0], k) + label.shape[2:])
    for c in range(k):
        out[:, c] = label[:, 0] == c
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- checks of the references
def test_block_pool_averages_blocks() -> None:
    x = np.arange(16, dtype=float).reshape(1, 4, 4)
    np.testing.assert_allclose(block_pool(x, (2, 2))[0], [[2.5, 4.5], [10.5, 12.5]])


def test_block_pool_max() -> None:
    x = np.arange(16, dtype=float).reshape(1, 4, 4)
    np.testing.assert_allclose(block_pool(x, (2, 2), "max")[0], [[5, 7], [13, 15]])


def test_km_reference_known_values() -> None:
    # one channel each: G is a 1x1 matrix, so both normalised forms are 0 whatever the scales; "none" is (gs-gt)²
    f_s = np.array([1.0, 3.0]).reshape(1, 1, 1, 2)  # G_s = (1 + 9) / 2 = 5
    f_t = np.array([2.0, 0.0]).reshape(1, 1, 1, 2)  # G_t = 4 / 2 = 2
    w, b = np.eye(1), np.zeros(1)
    assert abs(km_reference(f_s, f_t, w, b, "none") - 9.0) < 1e-12
    assert abs(km_reference(f_s, f_t, w, b, "frobenius")) < 1e-12
    assert abs(km_reference(f_s, f_t, w, b, "row")) < 1e-12


def test_kd_reference_known_value() -> None:
    # one pixel, two classes, T = 1: KL([0.5, 0.5] || softmax([log 3, 0]) = [0.75, 0.25])
    z_t = np.zeros((1, 2, 1, 1))
    z_s = np.array([np.log(3.0), 0.0]).reshape(1, 2, 1, 1)
    expected = 0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)
    assert abs(kd_reference(z_s, z_t, 1.0) - expected) < 1e-12


def test_aa_reference_two_pixels() -> None:
    # 2 pixels: student orthogonal unit vectors (A_01 = 0), teacher parallel (A_01 = 1); diagonals agree.
    f_s = np.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    f_t = np.array([[1.0, 2.0]]).reshape(1, 1, 1, 2)
    # uniform: 2 of 4 pairs differ by 1 -> 0.5
    assert abs(aa_reference(f_s, f_t, (1, 2), None) - 0.5) < 1e-12
    # label classes 0 and 1: intra pairs are the diagonal (diff 0), inter pairs the off-diagonal (diff 1)
    memberships = one_hot(np.array([0, 1]).reshape(1, 1, 1, 2), 2)
    assert abs(aa_reference(f_s, f_t, (1, 2), memberships, w_intra=1.0, w_inter=3.0) - 3.0) < 1e-12
