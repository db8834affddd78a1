"""monai_relkd.evaluation.fsd: Fréchet distance against closed forms and scipy, pooled features, the bundle path."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from scipy import linalg

from conftest import BUNDLES
from monai_relkd.engines import FeatureTaps
from monai_relkd.evaluation import frechet_distance, fsd_command, fsd_for_bundle, gaussian_fit, pooled_features



def _scipy_reference(mu1, c1, mu2, c2) -> float:
    covmean = linalg.sqrtm(c1 @ c2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean.real))


def test_identical_sets_give_zero():
    feats = np.random.default_rng(0).normal(size=(200, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, cov = gaussian_fit(feats)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)


def test_grows_with_shift_and_equals_squared_mean_shift():
    feats = np.random.default_rng(0).normal(size=(300, 8))
    mu, cov = gaussian_fit(feats)
    values = []
    for shift in (0.1, 0.5, 1.0, 2.0):
        mu2, cov2 = gaussian_fit(feats + shift)  # every channel shifted: same covariance
        values.append(frechet_distance(mu, cov, mu2, cov2))
        assert values[-1] == pytest.approx(8 * shift**2, rel=1e-6)
    assert all(v > 0 for v in values) and values == sorted(values)


def test_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3.0, size=5), rng.uniform(0.1, 3.0, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # tensors are accepted too
    got = frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(s1)), torch.tensor(mu2), torch.tensor(np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-10)


def test_full_covariances_match_scipy_and_rank_deficient_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(100, 6)), rng.normal(size=(100, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, c1), (m2, c2) = gaussian_fit(a), gaussian_fit(b)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(_scipy_reference(m1, c1, m2, c2), rel=1e-6)
    # fewer samples than channels: singular covariances, still finite and >= 0
    (m1, c1), (m2, c2) = gaussian_fit(rng.normal(size=(4, 12))), gaussian_fit(rng.normal(size=(5, 12)))
    d = frechet_distance(m1, c1, m2, c2)
    assert np.isfinite(d) and d >= 0


def test_argument_errors():
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_fit(np.zeros((1, 3)))


def test_pooled_features_on_unet_tap():
    net = UNet(2, 1, 2, (8, 16, 32), (2, 2))
    net.train()
    x = torch.rand(5, 1, 32, 32)
    feats = pooled_features(net, x, "model.1.submodule.0", batch_size=2)
    assert feats.shape == (5, 16) and feats.dtype == torch.float32
    assert net.training  # mode restored
    net.eval()
    with FeatureTaps(net, ["model.1.submodule.0"]) as taps, torch.no_grad():
        net(x)
        expected = taps.features()[0].mean(dim=(2, 3))
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    # an iterable of dict batches (a DataLoader) gives the same
    batches = [{"image": x[:3]}, {"image": x[3:]}]
    torch.testing.assert_close(pooled_features(net, batches, "model.1.submodule.0"), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown tap"):
        pooled_features(net, x, "model.1.submodul.0")


def _tiny_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    entries = {"training": [], "validation": [], "test": []}
    for site, split, offset in (("RUNMC", "training", 0.0), ("BMC", "validation", 0.0), ("HK", "test", 2.0)):
        (root / site).mkdir(parents=True)
        for c in range(2):
            img = (rng.normal(size=(24, 24, 6)) + offset).astype(np.float32)
            lab = np.zeros((24, 24, 6), np.uint8)
            lab[8:16, 8:16, 1:5] = 1
            img[lab > 0] += 3.0
            aff = np.diag([0.5, 0.5, 3.0, 1.0])
            ip, lp = root / site / f"Case0{c}.nii.gz", root / site / f"Case0{c}_segmentation.nii.gz"
            nib.save(nib.Nifti1Image(img, aff), str(ip))
            nib.save(nib.Nifti1Image(lab, aff), str(lp))
            entries[split].append({"image": str(ip), "label": str(lp), "site": site, "case": f"Case0{c}"})
    path = root / "datalist.json"
    path.write_text(json.dumps(entries))
    return path


def test_fsd_for_bundle_with_random_weights(tmp_path, capsys):
    from monai_relkd.networks import ENet

    datalist = _tiny_dataset(tmp_path / "data")
    ckpt = tmp_path / "model.pt"
    torch.save(ENet(1, 2).state_dict(), ckpt)
    bundle = BUNDLES / "prostate_mri_student_enet"
    r = fsd_for_bundle(bundle, datalist, "encoder.stage3", ckpt=ckpt, image_size=32, max_slices=6)
    assert r["fsd"] >= 0 and np.isfinite(r["fsd"])
    assert r["channels"] == 128 and r["n_train"] == 6 and r["n_test"] == 6  # 4 prostate slices x 4 cases, capped
    assert r["train_sites"] == ["BMC", "RUNMC"] and r["test_sites"] == ["HK"]
    r_all = fsd_for_bundle(bundle, datalist, "encoder.stage3", ckpt=ckpt, image_size=32, max_slices=None,
                           slices="all")
    assert r_all["n_train"] == 24 and r_all["n_test"] == 12
    out = tmp_path / "fsd.json"
    fsd_command(str(bundle), str(datalist), "encoder.stage3", ckpt=str(ckpt), image_size=32, out=str(out))
    assert "FSD" in capsys.readouterr().out and json.loads(out.read_text())["tap"] == "encoder.stage3"
    with pytest.raises(ValueError, match="Unknown tap"):
        fsd_for_bundle(bundle, datalist, "encoder.stage9", ckpt=ckpt, image_size=32)
    with pytest.raises(FileNotFoundError, match="train the bundle first"):
        fsd_for_bundle(bundle, datalist, "encoder.stage3", ckpt=tmp_path / "missing.pt", image_size=32)
    with pytest.raises(ValueError, match="slices must be"):
        fsd_for_bundle(bundle, datalist, "encoder.stage3", ckpt=ckpt, slices="some")
