"""Bundle configs read as a maintainer would: handlers switched on and off by name (``is_rank0``), never by their
position in a list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "multi_gpu_train.json").is_file())
RANK0_ONLY = {"ProgressBar", "StatsHandler", "TensorBoardStatsHandler"}
TRAIN_ALL_RANKS = {"ValidationHandler", "LrScheduleHandler", "TrainingStateCheckpoint", "TrainingLock"}


def _handlers(bundle: Path, rank: int, tmp_path: Path, monkeypatch, extra: dict | None = None) -> tuple[list, list]:
    """Instantiate ``train#handlers`` and ``validate#handlers`` of train.json + multi_gpu_train.json as rank ``rank``
    (``torch.distributed.get_rank`` patched; the network is not DDP-wrapped and the evaluator not built)."""
    from monai.bundle import ConfigParser

    import monai_relkd  # noqa: F401  (the configs' imports)

    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")])
    parser.update({"bundle_root": str(bundle), "ckpt_dir": str(tmp_path / f"models{rank}"),
                   "log_dir": str(tmp_path / f"runs{rank}"), "network": "$@network_def", "validate#evaluator": None,
                   "teacher": None, "image_size": 32, **(extra or {})})
    return parser.get_parsed_content("train#handlers"), parser.get_parsed_content("validate#handlers")


def _types(handlers: list) -> set[str]:
    assert all(h is not None for h in handlers), handlers
    return {type(h).__name__ for h in handlers}


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_multi_gpu_handlers_are_switched_by_is_rank0_not_by_position(bundle, tmp_path, monkeypatch):
    train0, val0 = _handlers(bundle, 0, tmp_path, monkeypatch)
    assert _types(train0) == TRAIN_ALL_RANKS | RANK0_ONLY
    assert _types(val0) == {"StatsHandler", "TensorBoardStatsHandler", "BestModelCheckpoint"}
    train1, val1 = _handlers(bundle, 1, tmp_path, monkeypatch)
    # checkpoints and the lock stay on every rank: they write (and lock) on rank 0 only, by their own check
    assert _types(train1) == TRAIN_ALL_RANKS
    assert _types(val1) == {"BestModelCheckpoint"}

    # a handler inserted at the front does not shift which handlers rank 1 drops
    first = {"_target_": "ignite.handlers.TerminateOnNan"}
    handlers = [first] + _raw(bundle, "train#handlers")
    train1, _ = _handlers(bundle, 1, tmp_path, monkeypatch, {"train#handlers": handlers})
    assert _types(train1) == TRAIN_ALL_RANKS | {"TerminateOnNan"}


def _raw(bundle: Path, key: str) -> list:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    return parser[key]


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_single_process_training_keeps_every_handler(bundle, tmp_path):
    from monai.bundle import ConfigParser

    import monai_relkd  # noqa: F401

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), "ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "runs"),
                   "validate#evaluator": None, "teacher": None, "image_size": 32})
    assert _types(parser.get_parsed_content("train#handlers")) == TRAIN_ALL_RANKS | RANK0_ONLY
    assert parser.get("is_rank0") is True
