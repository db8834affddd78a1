"""Domain gap on the six-site data: train a small 2-D U-Net on one site, report Dice on every site.

Trains MONAI's ``UNet(spatial_dims=2)`` on axial slices of one site (default RUNMC, surface coil) for a fixed
time budget on CPU, then segments every case of every site slice by slice and prints the 3-D Dice per site:
on held-out cases of the training site ("own") and on all cases of the other sites. Without ``--data`` it first
writes the synthetic collection (``monai_relkd.data.synthetic``) to a temporary folder.

Preprocessing is the usual baseline: per-volume intensity scaling of the 1st-99th percentile to [0, 1],
label > 0 as foreground, left-right flips and a mild intensity jitter as augmentation. No resampling: every
site keeps its own in-plane spacing (its field of view at a fixed matrix), as a plain slice-wise model would.

Run it under the shared CPU lock::

    flock /tmp/relkd-cpu.lock python benchmarks/domain_gap.py --train-site RUNMC --minutes 3
"""

from __future__ import annotations

import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import fire

import nibabel as nib
import numpy as np
import torch

from monai_relkd.data.sites import SITES, SITE_INFO, scan_sites
from monai_relkd.data.synthetic import generate_six_site_dataset


def load_volume(rec) -> tuple[np.ndarray, np.ndarray]:
    """Image scaled to [0, 1] by its 1st-99th percentiles, and the binary prostate mask (label > 0)."""
    img = np.asarray(nib.load(rec.image).dataobj, dtype=np.float32)
    lab = np.asarray(nib.load(rec.label).dataobj) > 0
    lo, hi = np.percentile(img, (1.0, 99.0))
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return img, lab


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """3-D Dice of two boolean masks (1.0 when both are empty)."""
    s = pred.sum() + ref.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, ref).sum() / s)


def main(
    train_site: str = "RUNMC",
    data: str | None = None,
    scale: float = 1.0,
    size: int = 96,
    seed: int = 0,
    minutes: float = 3.0,
    epochs: int = 1000,
    own_fraction: float = 0.3,
    batch: int = 16,
    threads: int = 2,
    json: str | None = None,
) -> None:
    """Train on ``train_site`` and print the Dice on every site (options also spelled ``--train-site``, ...).

    Args:
        train_site: site to train on.
        data: six-site root; default: generate the synthetic one.
        scale: synthetic case-count scale.
        size: synthetic in-plane matrix.
        seed: seed of data, split and training.
        minutes: training time budget.
        epochs: maximum epochs (the time budget usually stops first).
        own_fraction: held-out fraction of the training site.
        batch: slices per step.
        threads: CPU threads.
        json: also write the results (JSON) here.
    """
    args = SimpleNamespace(**locals())  # the options, recorded as given in the JSON's "args"

    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t_start = time.perf_counter()

    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="relkd-domain-gap-")
        root = tmp.name
        s = generate_six_site_dataset(root, scale=args.scale, size=args.size, seed=args.seed)
        print(f"synthetic data: {s['n_cases']} cases, size {args.size}, scale {args.scale:g} "
              f"({s['elapsed_s']:.1f} s)")
    scan = scan_sites(root)
    by_site = scan.by_site()
    if args.train_site not in by_site:
        sys.exit(f"unknown --train-site {args.train_site!r}; sites: {', '.join(by_site)}")

    own = list(by_site[args.train_site])
    random.Random(args.seed).shuffle(own)
    n_own = max(1, int(round(args.own_fraction * len(own))))
    own_test, train_cases = own[:n_own], own[n_own:]
    if not train_cases:
        sys.exit(f"{args.train_site} has too few cases to hold some out")

    # training slices: every slice with prostate plus as many empty ones (at most)
    xs, ys = [], []
    rng = np.random.default_rng(args.seed)
    for rec in train_cases:
        img, lab = load_volume(rec)
        fg = lab.any(axis=(0, 1))
        empty = np.flatnonzero(~fg)
        keep = np.concatenate([np.flatnonzero(fg), rng.choice(empty, min(len(empty), int(fg.sum())), replace=False)])
        xs.append(np.moveaxis(img[:, :, keep], 2, 0))
        ys.append(np.moveaxis(lab[:, :, keep], 2, 0))
    X = torch.from_numpy(np.concatenate(xs)[:, None]).float()
    Y = torch.from_numpy(np.concatenate(ys)[:, None].astype(np.int64))
    print(f"training on {args.train_site}: {len(train_cases)} cases, {len(X)} slices of {tuple(X.shape[2:])}; "
          f"{len(own_test)} {args.train_site} cases held out")

    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
               num_res_units=1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    budget = args.minutes * 60.0
    t0 = time.perf_counter()
    step = epoch = 0
    net.train()
    while epoch < args.epochs and time.perf_counter() - t0 < budget:
        perm = torch.randperm(len(X))
        losses = []
        for i in range(0, len(X) - args.batch + 1, args.batch):
            idx = perm[i : i + args.batch]
            xb, yb = X[idx].clone(), Y[idx].clone()
            flip = torch.rand(len(idx)) < 0.5  # left-right flips
            xb[flip] = xb[flip].flip(2)
            yb[flip] = yb[flip].flip(2)
            xb = xb * (1 + 0.1 * (torch.rand(len(idx), 1, 1, 1) - 0.5)) + 0.05 * (torch.rand(len(idx), 1, 1, 1) - 0.5)
            opt.zero_grad()
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            if time.perf_counter() - t0 >= budget:
                break
        epoch += 1
        if epoch % 5 == 0 or time.perf_counter() - t0 >= budget:
            print(f"epoch {epoch:3d} step {step:5d} loss {np.mean(losses):.4f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0

    net.eval()
    results: dict[str, list[float]] = {}
    with torch.no_grad():
        for site, cases in by_site.items():
            cases = own_test if site == args.train_site else cases
            for rec in cases:
                img, lab = load_volume(rec)
                x = torch.from_numpy(np.moveaxis(img, 2, 0)[:, None].copy())
                pred = torch.cat([net(x[i : i + 32]).argmax(1) for i in range(0, len(x), 32)]).numpy()
                results.setdefault(site, []).append(dice(np.moveaxis(pred, 0, 2) > 0, lab))

    rows = []
    print()
    print(f"| site | scanner | cases | Dice mean ± sd |")
    print(f"|---|---|---|---|")
    order = [s for s in SITES if s in results] + [s for s in results if s not in SITES]
    for site in order:
        d = np.array(results[site])
        info = SITE_INFO.get(site, {})
        scanner = f"{info.get('field_T', '?')} T {info.get('vendor', '?')}, {info.get('coil', '?')} coil" if info else "-"
        name = f"{site} (own, held out)" if site == args.train_site else site
        print(f"| {name} | {scanner} | {len(d)} | {d.mean():.3f} ± {d.std():.3f} |")
        rows.append({"site": site, "own": site == args.train_site, "n": len(d), "dice_mean": float(d.mean()),
                     "dice_sd": float(d.std()), "dice": [float(v) for v in d]})
    total = time.perf_counter() - t_start
    print(f"\ntrained {train_s:.0f} s ({epoch} epochs, {step} steps); total {total:.0f} s; "
          f"{args.threads} threads; {platform.processor() or platform.machine()}; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    out = {"args": vars(args), "train_s": train_s, "epochs": epoch, "steps": step, "total_s": total, "sites": rows}
    if args.json:
        from monai_relkd.data._io import atomic_write_json

        atomic_write_json(args.json, out)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    fire.Fire(main)
