"""Checkpoints that never lose a model, a training that resumes after a kill, and one training per bundle at a time.

Three handlers with MONAI's ``attach(engine)`` protocol, named by dotted path in the bundles' ``train.json``::

    "checkpoint": {
        "lock": {"_target_": "monai_relkd.engines.TrainingLock", "path": "$os.path.join(@ckpt_dir, 'training.lock')"},
        "best": {"_target_": "monai_relkd.engines.BestModelCheckpoint", "save_dir": "@ckpt_dir", "network": "@network"},
        "last": {"_target_": "monai_relkd.engines.TrainingStateCheckpoint", "save_dir": "@ckpt_dir",
                 "save_dict": {"network": "@network", "loss": "@loss", "optimizer": "@optimizer"},
                 "best": "@checkpoint#best", "interval": "@checkpoint_interval", "resume": "@resume"}
    }

``checkpoint#best`` goes into the evaluator's handlers, ``checkpoint#lock`` and ``checkpoint#last`` into the
trainer's. What lands in the models folder:

- ``model.pt``: the best validated weights, a flat state dict (what inference, MONAI Label and releases load). It is
  replaced only by a model with a better key metric than the best ever recorded for this folder, through a temporary
  file and ``os.replace`` (never deleted first: MONAI's ``CheckpointSaver`` and ignite's ``Checkpoint`` remove the
  previous best before writing the new one).
- ``model.json``: the record of ``model.pt`` (metric name and value, epoch, sha256 of the file). It is written just
  *before* ``model.pt``, so a kill between the two leaves a record whose score is at least that of ``model.pt``:
  the bar a later model must beat never drops. Repeated and resumed runs read it at start.
- ``checkpoint_last.pt``: the full training state (network, loss module with its KM connectors, optimizer, LR
  scheduler, AMP scaler, trainer iteration/epoch, Python/NumPy/torch RNG states, best-model record, whether the run
  completed), every ``interval`` epochs (or iterations) and when training ends. With ``resume="auto"`` a run that
  finds an incomplete one continues from it; ``resume=False`` starts afresh; ``resume=True`` requires it.
- ``training.lock``: JSON with the PID and host of the training that owns the folder; a second training fails at
  once. A lock whose process is gone is taken over, with a log line.

Every file goes through :func:`monai_relkd.data._io.atomic_write` (temporary file in the same folder, fsync,
``os.replace``). Under ``torch.distributed`` only rank 0 writes; every rank resumes from the same file.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import io
import json
import logging
import os
import random
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import optional_import
from torch import nn

# as MONAI's own handlers do: without pytorch-ignite this module still imports (MONAI's component scan walks every
# monai* package, so inference must not need ignite), and using a handler raises OptionalImportError naming ignite
Engine, _ = optional_import("ignite.engine", name="Engine")
Events, _ = optional_import("ignite.engine", name="Events")
Checkpoint, _ = optional_import("ignite.handlers", name="Checkpoint")
BaseSaveHandler, _ = optional_import("ignite.handlers.checkpoint", name="BaseSaveHandler", as_type="base")

from monai_relkd.data._io import atomic_write_bytes, atomic_write_json, remove_stale_temporaries

__all__ = [
    "AtomicSaver",
    "BestModelCheckpoint",
    "TrainingStateCheckpoint",
    "TrainingLock",
    "TrainingLockedError",
    "RandomStates",
    "read_model_record",
]

logger = logging.getLogger(__name__)

_RESUME_HOWTO = (
    "Start a new training instead with --resume false (the file is then overwritten at the first save), or move it "
    "away."
)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


class AtomicSaver(BaseSaveHandler):
    """ignite save handler: ``torch.save`` through the package's atomic writer, on one rank, never deleting first.

    ignite's ``Checkpoint`` calls ``remove(old)`` before ``save(new)``; with a fixed file name that deletes the only
    good copy. Here ``remove`` does nothing: the next save replaces the file atomically.

    Args:
        dirname: folder of the files (created).
        save_on_rank: the rank that writes (others do nothing).
        before_write: ``f(path, data, metadata)`` called with the serialised bytes just before they are written
            (``BestModelCheckpoint`` writes its record there).
    """

    def __init__(self, dirname: str | os.PathLike, save_on_rank: int = 0, before_write: Any = None) -> None:
        self.dirname = Path(dirname)
        self.save_on_rank = save_on_rank
        self.before_write = before_write

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() != self.save_on_rank:
            return
        path = self.dirname / filename
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        if self.before_write is not None:
            self.before_write(path, data, metadata)
        atomic_write_bytes(path, data)

    def remove(self, filename: str) -> None:
        """Keep the file: its successor replaces it atomically (see the class docstring)."""


def read_model_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record (``model.json``) of a models folder's ``model.pt``, or ``None`` when absent or unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable model record %s (%s)", path, e)
        return None
    return record if isinstance(record, dict) else None


class BestModelCheckpoint:
    """Evaluator handler: ``model.pt`` = the best validated weights, never replaced by a worse model.

    ignite's ``Checkpoint`` (``n_saved=1``, score = the evaluator's key metric) decides; :class:`AtomicSaver` writes.
    The best score is persisted in ``model.json`` (written before ``model.pt``) and read back at construction, so a
    repeated or resumed run compares against the best ever saved in this folder, not only against its own.

    A ``model.pt`` without a record (e.g. copied there by hand) has no known score: it is copied to
    ``model_unscored.pt`` before a validated model replaces it. A record whose sha256 does not match ``model.pt``
    (a kill between the two writes) keeps its score as the bar, which is then at least that of ``model.pt``.

    Args:
        save_dir: the models folder.
        network: the network whose ``state_dict`` is saved (DDP/DataParallel unwrapped).
        filename: weights file name; the record is the same name with ``.json``.
        metric_name: metric of ``engine.state.metrics`` to compare; default the evaluator's key metric.
        mode: ``"max"`` (higher is better, e.g. Dice) or ``"min"``.
        save_on_rank: the rank that writes.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: nn.Module,
        filename: str = "model.pt",
        metric_name: str | None = None,
        mode: str = "max",
        save_on_rank: int = 0,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / filename
        self.record_path = self.path.with_suffix(".json")
        self.network = network
        self.metric_name = metric_name
        self.sign = 1.0 if mode == "max" else -1.0
        self.validations = 0
        self._engine: Engine | None = None
        self._unscored = False
        self.saver = AtomicSaver(save_dir, save_on_rank, before_write=self._write_record)
        self.checkpoint = Checkpoint(
            {"model": network},
            self.saver,
            score_function=self._score,
            score_name=metric_name,
            n_saved=1,
            filename_pattern=filename,
            save_on_rank=save_on_rank,
        )
        self._load_record()

    # -- the persisted best -----------------------------------------------------------------------------------------
    def _load_record(self) -> None:
        record = read_model_record(self.record_path)
        if not self.path.is_file():
            if record is not None:
                logger.info("%s has no %s beside it: its score is not a bar any more.", self.record_path, self.path.name)
            return
        if record is None:
            self._unscored = True
            logger.warning(
                "%s has no record (%s): its score is unknown; it is copied to %s before a validated model replaces it.",
                self.path, self.record_path.name, self.path.with_name(self.path.stem + "_unscored.pt").name,
            )
            return
        if record.get("sha256") and record["sha256"] != _sha256_file(self.path):
            logger.warning(
                "%s does not match its record %s (a save was interrupted between the two): the recorded score %s "
                "stays the bar to beat.", self.path, self.record_path.name, record.get("metric"),
            )
        metric = record.get("metric")
        if isinstance(metric, (int, float)):
            self._set_bar(self.sign * float(metric))
            logger.info("%s: best %s so far %.6g (epoch %s); only a better model replaces it.", self.path,
                        record.get("metric_name"), metric, record.get("epoch"))

    def _set_bar(self, priority: float) -> None:
        saved = self.checkpoint._saved
        if not saved or priority > saved[0].priority:
            self.checkpoint.load_state_dict({"_saved": [(priority, self.path.name)]})

    @property
    def best_metric(self) -> float | None:
        """The best score recorded for this folder (``None`` before any validated model)."""
        saved = self.checkpoint._saved
        return self.sign * float(saved[0].priority) if saved else None

    def state_dict(self) -> dict[str, Any]:
        """The best score, for the last-state checkpoint."""
        return {"best_priority": [float(self.checkpoint._saved[0].priority)] if self.checkpoint._saved else []}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the best score from a last-state checkpoint, keeping the better of it and ``model.json``'s."""
        for priority in state.get("best_priority", []):
            self._set_bar(float(priority))

    # -- saving -----------------------------------------------------------------------------------------------------
    def _score(self, engine: Engine) -> float:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise KeyError(f"BestModelCheckpoint: metric {name!r} not in {sorted(engine.state.metrics)}.")
        self._engine, self._metric_used = engine, name
        self.validations += 1
        value = float(engine.state.metrics[name])
        if not np.isfinite(value):
            logger.warning("validation %s is %s: model.pt is not replaced.", name, value)
            return -float("inf")
        return self.sign * value

    def _write_record(self, path: Path, data: bytes, metadata: Mapping | None) -> None:
        if self._unscored and path.is_file():
            keep = path.with_name(path.stem + "_unscored.pt")
            atomic_write_bytes(keep, path.read_bytes())
            logger.warning("kept the unscored %s as %s before replacing it.", path.name, keep.name)
            self._unscored = False
        priority = None if metadata is None else metadata.get("priority")
        validated = priority is not None
        engine = self._engine
        record = {
            "file": path.name,
            "validated": validated,
            "metric_name": getattr(self, "_metric_used", self.metric_name) if validated else None,
            "metric": self.sign * float(priority) if validated else None,
            "mode": "max" if self.sign > 0 else "min",
            "epoch": int(engine.state.epoch) if validated and engine is not None else (metadata or {}).get("epoch"),
            "iteration": (metadata or {}).get("iteration"),
            "sha256": hashlib.sha256(data).hexdigest(),
            "saved_at": _now(),
        }
        atomic_write_json(self.record_path, record)
        if validated:
            logger.info("new best %s %.6g at epoch %s: writing %s", record["metric_name"], record["metric"],
                        record["epoch"], path)

    def save_unvalidated(self, epoch: int, iteration: int) -> None:
        """Write the current weights as ``model.pt`` (record ``validated: false``); only when there is none."""
        if self.path.exists():
            return
        state = _unwrap(self.network).state_dict()
        self.saver(state, self.path.name, {"priority": None, "epoch": epoch, "iteration": iteration})

    def attach(self, engine: Engine) -> None:
        """Save after every run of the evaluator (``Events.COMPLETED``) when the key metric improved."""
        engine.add_event_handler(Events.COMPLETED, self.checkpoint)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RandomStates:
    """The global Python, NumPy and torch (CPU and CUDA) RNG states as a ``weights_only``-loadable state dict.

    MONAI's random transforms keep their own generators (``Randomizable.R``), which are not captured: after a resume
    the crops and flips differ from those of an uninterrupted run; the step count, weights and optimizer do not.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        _, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": [version, list(internal), gauss],
            "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: Mapping) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class _RunInfo:
    """Whether the run that wrote the last-state checkpoint completed."""

    def __init__(self) -> None:
        self.completed = False

    def state_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "saved_at": _now()}

    def load_state_dict(self, state: Mapping) -> None:
        self.completed = bool(state.get("completed", False))


def _parse_resume(resume: Any) -> bool | str:
    if isinstance(resume, str):
        text = resume.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise ValueError(f"resume must be 'auto', true or false, got {resume!r}.")
    return bool(resume)


def _lr_schedulers(engine: Engine) -> list[Any]:
    """LR schedulers attached to ``engine`` as handlers (MONAI ``LrScheduleHandler``, ignite ``ParamScheduler``)."""
    from ignite.handlers.param_scheduler import ParamScheduler

    found: list[Any] = []
    for handlers in engine._event_handlers.values():
        for func, _, _ in handlers:
            target = getattr(func, "__self__", func)
            scheduler = getattr(target, "lr_scheduler", None)
            if scheduler is None and isinstance(target, ParamScheduler):
                scheduler = target
            if scheduler is not None and hasattr(scheduler, "state_dict") and all(s is not scheduler for s in found):
                found.append(scheduler)
    return found


class TrainingStateCheckpoint:
    """Trainer handler: the full training state in ``checkpoint_last.pt``, and resuming from it.

    Saved (ignite ``Checkpoint`` gathers the state dicts, :class:`AtomicSaver` writes, rank 0 only) every
    ``interval`` epochs (``epoch_level=True``) or iterations, and when training completes: the objects of
    ``save_dict`` (network - unwrapped from DDP -, loss module with its connectors, optimizer, ``lr_scheduler`` if
    the config defines one), and, added here, the trainer's iteration/epoch (``"trainer"``), the RNG states, the
    best-model record of ``best``, the AMP grad scaler when the trainer has one, any LR scheduler attached to the
    trainer as a handler that ``save_dict`` does not already hold, and whether the run completed.

    At ``Events.STARTED``, with ``resume="auto"`` and an incomplete ``checkpoint_last.pt`` present (or
    ``resume=True``), every object is restored through MONAI's ``CheckpointLoader`` (the engine continues from the
    saved iteration; its ``max_epochs`` is the current config's). A completed one is not resumed under ``"auto"``: the
    run starts afresh and overwrites it at its first save. When training ends before any validation of this run,
    the final weights are written to ``model.pt`` if there is none (``validated: false`` in ``model.json``), and
    the log says so.

    Args:
        save_dir: the models folder.
        save_dict: ``{name: object with state_dict/load_state_dict}``; include ``"lr_scheduler"`` when the config
            has one.
        best: the evaluator's :class:`BestModelCheckpoint`, whose record travels with the state.
        interval: save every ``interval`` epochs (or iterations).
        epoch_level: count ``interval`` in epochs (``True``) or iterations.
        resume: ``"auto"``, ``True`` or ``False`` (strings ``"true"``/``"false"`` accepted).
        filename: file name in ``save_dir``.
        map_location: where tensors are loaded on resume.
        save_on_rank: the rank that writes.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        best: BestModelCheckpoint | None = None,
        interval: int = 1,
        epoch_level: bool = True,
        resume: bool | str = "auto",
        filename: str = "checkpoint_last.pt",
        map_location: Any = "cpu",
        save_on_rank: int = 0,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        reserved = {"trainer", "random_states", "run", "best_model", "scaler"} & set(save_dict)
        if reserved:
            raise ValueError(f"save_dict keys {sorted(reserved)} are reserved (added by the handler).")
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / filename
        self.save_dict = dict(save_dict)
        self.best = best
        self.interval = int(interval)
        self.epoch_level = bool(epoch_level)
        self.resume = _parse_resume(resume)
        self.map_location = map_location
        self.save_on_rank = save_on_rank
        self.run_info = _RunInfo()
        self.resumed_from: int | None = None
        self.checkpoint: Checkpoint | None = None

    def objects(self, engine: Engine) -> dict[str, Any]:
        """Everything saved and restored, by name."""
        objects: dict[str, Any] = dict(self.save_dict)
        objects["trainer"] = engine
        objects["random_states"] = RandomStates()
        objects["run"] = self.run_info
        if self.best is not None:
            objects["best_model"] = self.best
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and hasattr(scaler, "state_dict"):
            objects["scaler"] = scaler
        held = [id(v) for v in objects.values()]
        for i, scheduler in enumerate(_lr_schedulers(engine)):
            if id(scheduler) not in held:
                objects["lr_scheduler" if i == 0 and "lr_scheduler" not in objects else f"lr_scheduler_{i}"] = scheduler
        return objects

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        every = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(every(every=self.interval), self._save)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _start(self, engine: Engine) -> None:
        objects = self.objects(engine)
        self.checkpoint = Checkpoint(
            objects,
            AtomicSaver(self.save_dir, self.save_on_rank),
            filename_pattern=self.path.name,
            n_saved=None,
            global_step_transform=lambda e, _: e.state.iteration,
            save_on_rank=self.save_on_rank,
        )
        self.run_info.completed = False
        if self.resume is False:
            return
        if not self.path.is_file():
            if self.resume is True:
                raise FileNotFoundError(f"resume is true but {self.path} does not exist: nothing to resume from.")
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(
                f"{self.path}: cannot read the last training state to resume from ({type(e).__name__}: {e}). "
                + _RESUME_HOWTO
            ) from e
        if self.resume == "auto" and bool(state.get("run", {}).get("completed")):
            logger.info(
                "%s is from a completed training (iteration %s): starting a new training, resume false. "
                "model.pt is replaced only by a better model than its recorded best (%s).",
                self.path, state.get("trainer", {}).get("iteration"),
                None if self.best is None else self.best.best_metric,
            )
            return
        missing = [k for k in objects if k not in state]
        del state
        loadable = {k: v for k, v in objects.items() if k not in missing}
        if missing:
            logger.warning("%s holds no %s: those start afresh.", self.path, ", ".join(missing))
        from monai.handlers import CheckpointLoader

        try:
            CheckpointLoader(load_path=str(self.path), load_dict=loadable, map_location=self.map_location)(engine)
        except Exception as e:
            raise RuntimeError(
                f"{self.path}: cannot resume from it ({type(e).__name__}: {e}); it was written by a different "
                "configuration (network, loss, optimizer or schedule). " + _RESUME_HOWTO
            ) from e
        self.run_info.completed = False
        self.resumed_from = int(engine.state.iteration)
        logger.info(
            "resumed from %s: iteration %d, epoch %d (best so far %s); continuing to max_epochs %s.",
            self.path, engine.state.iteration, engine.state.epoch,
            None if self.best is None else self.best.best_metric, engine.state.max_epochs,
        )

    def _save(self, engine: Engine) -> None:
        if self.checkpoint is not None:
            self.checkpoint(engine)

    def _complete(self, engine: Engine) -> None:
        self.run_info.completed = True
        self._save(engine)
        if _rank() != self.save_on_rank:
            return
        logger.info("final checkpoint: %s (iteration %d, epoch %d).", self.path, engine.state.iteration,
                    engine.state.epoch)
        best = self.best
        if best is None or best.validations > 0:
            return
        if not best.path.exists():
            best.save_unvalidated(int(engine.state.epoch), int(engine.state.iteration))
            logger.warning(
                "training ended at iteration %d (epoch %d) before its first validation (see val_interval): wrote the "
                "final, unvalidated weights to %s (model.json says validated: false).",
                engine.state.iteration, engine.state.epoch, best.path,
            )
        else:
            logger.warning(
                "training ended at iteration %d (epoch %d) without a validation in this run: %s (best %s) is kept; "
                "the final weights are in %s.", engine.state.iteration, engine.state.epoch, best.path,
                best.best_metric, self.path,
            )


class TrainingLockedError(RuntimeError):
    """Another live process trains into the same models folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class TrainingLock:
    """A lock file holding the owner's PID, so that a second training on the same models folder fails at once.

    ``acquire()`` creates ``path`` exclusively (``O_EXCL``). If it exists and its PID runs on this host, it raises
    :class:`TrainingLockedError` naming the PID and the file; if that process is gone (killed), the stale lock is
    taken over with a warning, and the temporary files of its interrupted saves are removed. The lock is released
    when training completes and at interpreter exit. Only rank 0 of a distributed run takes it.

    Use it twice in a bundle: ``"training": ["$@checkpoint#lock.acquire()", "$@train#trainer.run()"]`` fails before
    the datasets are cached, and listing it in the trainer's handlers releases it when training completes.

    Args:
        path: the lock file, e.g. ``models/training.lock``.
        clean: file names in the lock's folder whose stale ``.<name>.*.tmp`` files are removed on acquiring.
    """

    def __init__(
        self, path: str | os.PathLike, clean: tuple[str, ...] = ("model.pt", "model.json", "checkpoint_last.pt")
    ) -> None:
        self.path = Path(path)
        self.clean = tuple(clean)
        self.held = False
        self._atexit = False

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> TrainingLock:
        """Take the lock (idempotent); see the class docstring."""
        if self.held or _rank() != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if pid == os.getpid() and host == me["host"]:
                    break  # our own lock, left by an earlier training in this process
                if isinstance(pid, int) and (host != me["host"] or _pid_alive(pid)):
                    raise TrainingLockedError(
                        f"{self.path.parent} is being trained by another process (PID {pid} on {host}, started "
                        f"{owner.get('started')}; lock file {self.path}). Wait for it to finish or stop it; if no "
                        "such training runs any more, delete the lock file."
                    ) from None
                logger.warning("taking over the stale training lock %s of PID %s (no longer running).", self.path,
                               pid if pid is not None else "unknown")
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            break
        else:
            raise TrainingLockedError(f"could not take the training lock {self.path} (contended).")
        if self._owner().get("pid") != os.getpid():
            self.path.write_text(json.dumps(me))  # our own lock from an earlier training in this process
        self.held = True
        for tmp in remove_stale_temporaries(self.path.parent, self.clean):
            logger.warning("removed %s, left by an interrupted save.", tmp)
        if not self._atexit:
            atexit.register(self.release)
            self._atexit = True
        return self

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        self.held = False
        if self._owner().get("pid") == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def attach(self, engine: Engine) -> None:
        """Take the lock now (if not yet) and release it when ``engine`` completes."""
        self.acquire()
        engine.add_event_handler(Events.COMPLETED, lambda _: self.release())
