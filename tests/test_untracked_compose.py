"""UntrackedCompose: the random part of the training preprocessing without MONAI's metadata tracking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, MetaTensor, get_track_meta
from monai.transforms import (
    Compose,
    CopyItemsd,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    SqueezeDimd,
    Transform,
)

from monai_relkd.data import UntrackedCompose


def _transforms() -> list:
    """The bundles' training pipeline in small: one deterministic transform, then the random ones."""
    keys = ["image", "label"]
    return [NormalizeIntensityd(keys="image"),
            RandCropByPosNegLabeld(keys, label_key="label", spatial_size=(8, 8, 1), pos=2, neg=1, num_samples=3),
            SqueezeDimd(keys, dim=-1), RandFlipd(keys, prob=0.5, spatial_axis=0),
            CopyItemsd(keys="image", names="teacher_image"), RandScaleIntensityd(keys="image", factors=0.1, prob=0.5)]


def _volume(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    label = (torch.rand(1, 8, 8, 6, generator=g) > 0.7).float()
    affine = torch.diag(torch.tensor([0.5, 0.5, 3.0, 1.0], dtype=torch.float64))
    return {"image": MetaTensor(torch.rand(1, 8, 8, 6, generator=g) * 100, affine=affine),
            "label": MetaTensor(label, affine=affine)}


def test_same_values_and_draws_as_compose_on_plain_tensors():
    tracked, untracked = Compose(_transforms()), UntrackedCompose(_transforms())
    tracked.set_random_state(seed=7)
    untracked.set_random_state(seed=7)
    for i in range(6):
        a, b = tracked(_volume(i)), untracked(_volume(i))
        assert len(a) == len(b) == 3
        for sa, sb in zip(a, b):
            for key in ("image", "label", "teacher_image"):
                assert isinstance(sa[key], MetaTensor)
                assert type(sb[key]) is torch.Tensor  # no MetaTensor left
                assert torch.equal(sa[key].as_tensor(), sb[key])  # bit for bit, so the draws were the same
    assert get_track_meta()


def test_tracking_is_restored_when_a_transform_fails():
    class Fails(Transform):
        def __call__(self, data):
            assert not get_track_meta()  # it runs untracked
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):  # MONAI re-raises it as "applying transform ..."
        UntrackedCompose([NormalizeIntensityd(keys="image"), RandFlipd("image", prob=1.0), Fails()])(_volume())
    assert get_track_meta()


def test_cache_dataset_caches_the_tracked_part_only():
    data = [_volume(0), _volume(1)]
    dataset = CacheDataset(data, transform=UntrackedCompose(_transforms()), cache_rate=1.0, progress=False)
    assert dataset.transform.first_random() == 1
    cached = dataset._cache[0]
    assert isinstance(cached["image"], MetaTensor)  # normalised, with its affine
    assert torch.allclose(cached["image"].affine, data[0]["image"].affine)
    crops = [dataset[0] for _ in range(4)]
    assert all(type(c["image"]) is torch.Tensor for crop in crops for c in crop)
    stacks = [torch.stack([c["image"] for c in crop]) for crop in crops]
    assert any(not torch.equal(stacks[0], s) for s in stacks[1:])  # the random part runs on every read
    assert isinstance(dataset._cache[0]["image"], MetaTensor)  # and never alters the cache


def test_without_random_transforms_everything_is_tracked():
    out = UntrackedCompose([NormalizeIntensityd(keys="image")])(_volume())
    assert isinstance(out["image"], MetaTensor)
    np.testing.assert_allclose(float(out["image"].mean()), 0.0, atol=1e-5)
