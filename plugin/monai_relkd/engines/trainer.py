"""``DistillationTrainer``: MONAI ``SupervisedTrainer`` with a frozen teacher and feature taps."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer
from monai.utils import CommonKeys as Keys
from monai.utils import optional_import

# as MONAI's own engines do: without pytorch-ignite this module still imports (MONAI's component scan walks every
# monai* package), and using the trainer raises MONAI's OptionalImportError naming ignite
Events, _ = optional_import("ignite.engine", name="Events")

from .cache import TeacherOutputCache
from .taps import FeatureTaps, _first_tensor, unwrap_module
from .teacher import freeze, strip_wrappers, teacher_required

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = [
    "DistillationTrainer",
    "DistillationLossAdapter",
    "LOSS_TERM_KEYS",
    "loss_terms_from_engine",
    "distillation_parameters",
]

logger = logging.getLogger(__name__)

#: keys of the loss dict returned by ``RelationalDistillationLoss`` (besides the total ``"loss"``); a
#: ``WeightedDistillationLoss`` may add further term names, which are logged the same way.
LOSS_TERMS: tuple[str, ...] = ("seg", "logits", "km", "aa")
#: keys written into the iteration output (``engine.state.output``) for those terms: the total and one per term.
LOSS_TERM_KEYS: tuple[str, ...] = (Keys.LOSS,) + tuple(f"loss_{t}" for t in LOSS_TERMS)
#: prefixes of the per-term keys in the iteration output: raw values and shares of the total
TERM_PREFIX, SHARE_PREFIX = "loss_", "share_"
#: a weighted term above this multiple of ``L_seg`` at the first iteration is warned about
DOMINANCE_RATIO = 10.0


def loss_terms_from_engine(output: Any) -> dict[str, float] | None:
    """
    ``output_transform`` for ``StatsHandler`` / ``TensorBoardStatsHandler``: the total loss, each distillation
    term and each term's share of the total of a ``DistillationTrainer`` iteration, as ``{"loss": ..,
    "loss_seg": .., "loss_logits": .., "loss_km": .., "loss_aa": .., "share_seg": .., "share_logits": .., ...}``
    of Python floats (``loss_<term>`` unweighted, ``share_<term> = λ·L_term / L``; keys absent from the output are
    left out).

    Works on the decollated output (a list of per-sample dicts, ``decollate=True``, where MONAI replicates the
    scalar values into every item: the first item is read) and on the plain output dict (``decollate=False``).

    Bundle config::

        {"_target_": "StatsHandler", "tag_name": "train_loss",
         "output_transform": "$monai_relkd.engines.loss_terms_from_engine"}

    Returns:
        the dict, or ``None`` for an empty output (handlers then log nothing).
    """
    if isinstance(output, (list, tuple)):
        output = output[0] if len(output) > 0 else None
    if not isinstance(output, dict):
        return None
    terms: dict[str, float] = {}
    keys = [Keys.LOSS] + [k for k in output if isinstance(k, str) and k.startswith((TERM_PREFIX, SHARE_PREFIX))]
    for key in keys:
        if key in output and output[key] is not None:
            value = output[key]
            if isinstance(value, torch.Tensor):
                value = value.detach().float().mean().item()
            terms[key] = float(value)
    return terms or None


def distillation_parameters(network: nn.Module, loss_function: Any) -> list[nn.Parameter]:
    """
    The trainable parameters of the student and of the loss (e.g. the kernel-matrix 1×1 connectors), without
    duplicates, for the optimizer. Use it in bundle configs so learning-rate schedulers see every group::

        "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3,
                      "params": "$monai_relkd.engines.distillation_parameters(@network, @loss)"}
    """
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    modules = [network] + ([loss_function] if isinstance(loss_function, nn.Module) else [])
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class DistillationLossAdapter:
    """
    The ``loss_function(pred, label)`` callable handed to ``SupervisedTrainer``: it completes the distillation
    inputs and calls the real loss as
    ``loss(student_logits, teacher_logits, student_features, teacher_features, label)``.

    ``SupervisedTrainer._iteration`` (MONAI 1.5.x and 1.6.x) runs the student through the inferer, stores the
    input batch as ``engine.state.output[Keys.IMAGE]`` and calls ``engine.loss_function(pred, label)`` inside the
    same autocast context. Here the student features are read from the student taps (captured during that
    forward), the teacher runs on ``engine.state.output[Keys.IMAGE]`` (or the batch's ``teacher_input_key``,
    through a ``TeacherOutputCache`` when one is given) under ``torch.no_grad()`` in eval mode, and
    every term of the returned dict is stored in ``engine.state.output`` as ``loss_<term>`` (detached). The
    total ``out["loss"]`` is returned; MONAI stores it as ``Keys.LOSS`` and back-propagates it. When the loss has
    ``term_weights`` (``{name: λ}``, as :class:`monai_relkd.losses.WeightedDistillationLoss`), each term's share of
    the total, ``λ·L_term / L``, is stored as ``share_<term>``, and at the first iteration a weighted term larger
    than ``DOMINANCE_RATIO`` × ``L_seg`` is warned about once (it would drown the supervised loss).

    A model output that is a tuple/list/dict (e.g. deep supervision) contributes its first tensor.
    """

    def __init__(
        self,
        loss: Callable[..., dict],
        teacher: nn.Module | None,
        student_taps: FeatureTaps,
        teacher_taps: FeatureTaps,
        teacher_cache: TeacherOutputCache | None = None,
        teacher_input_key: str | None = None,
    ) -> None:
        self.loss = loss
        self.teacher = teacher
        self.student_taps = student_taps
        self.teacher_taps = teacher_taps
        self.teacher_cache = teacher_cache
        self.teacher_input_key = teacher_input_key
        self.engine: SupervisedTrainer | None = None
        self._budget_checked = False

    def _teacher_forward(self, image: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Teacher logits and tapped features of ``image`` (B, C, *S) under ``no_grad``."""
        with torch.no_grad():
            self.teacher_taps.clear()
            logits = _first_tensor(self.teacher(image))
            return logits, self.teacher_taps.features()

    def _teacher_input(self, engine: SupervisedTrainer) -> torch.Tensor:
        """The student's input batch, or the batch's ``teacher_input_key`` entry on the same device."""
        image = engine.state.output[Keys.IMAGE]
        if self.teacher_input_key is None:
            return image
        batch = engine.state.batch
        if not isinstance(batch, dict) or self.teacher_input_key not in batch:
            raise KeyError(
                f"teacher_input_key {self.teacher_input_key!r} is not in the training batch (keys: "
                f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}); add a transform that "
                "writes it, e.g. CopyItemsd(keys='image', names='teacher_image') before intensity augmentation."
            )
        return torch.as_tensor(batch[self.teacher_input_key]).to(image.device, image.dtype)

    def attach(self, engine: SupervisedTrainer) -> None:
        self.engine = engine

    def __call__(self, pred: Any, label: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        if engine is None:
            raise RuntimeError("DistillationLossAdapter is not attached to a trainer.")
        student_logits = _first_tensor(pred)
        student_features = self.student_taps.features()
        teacher_logits, teacher_features = None, []
        if self.teacher is not None:  # None: no distillation term is on (the baseline), nothing to run
            self.teacher.eval()  # re-asserted every iteration: a handler may have called .train() on everything
            image = self._teacher_input(engine)
            if self.teacher_cache is not None:
                teacher_logits, teacher_features = self.teacher_cache(self._teacher_forward, image)
            else:
                teacher_logits, teacher_features = self._teacher_forward(image)
        try:
            out = self.loss(student_logits, teacher_logits, student_features, teacher_features, label)
        finally:
            self.student_taps.clear()
            self.teacher_taps.clear()
        if not isinstance(out, dict) or Keys.LOSS not in out:
            raise TypeError(
                "the distillation loss must return a dict with a 'loss' key (and 'seg', 'logits', 'km', 'aa'), "
                f"got {type(out).__name__}."
            )
        terms = {k: _scalar(v) for k, v in out.items() if k != Keys.LOSS}
        for term in LOSS_TERMS:
            terms.setdefault(term, torch.zeros(()))
        for name, value in terms.items():
            engine.state.output[f"{TERM_PREFIX}{name}"] = value
        weights = getattr(self.loss, "term_weights", None)
        if isinstance(weights, dict):
            total = _scalar(out[Keys.LOSS])
            for name, weight in weights.items():
                if name in terms:
                    share = weight * terms[name] / total if float(total) != 0 else torch.zeros(())
                    engine.state.output[f"{SHARE_PREFIX}{name}"] = share
            if not self._budget_checked:
                self._budget_checked = True
                warn_dominant_terms(terms, weights)
        return out[Keys.LOSS]


def _scalar(value: Any) -> torch.Tensor:
    """A detached float scalar tensor of a loss value (a tensor of any shape is averaged)."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return torch.zeros(()) if value is None else torch.tensor(float(value))


def warn_dominant_terms(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> list[str]:
    """Log one warning per weighted term ``λ·L`` above ``DOMINANCE_RATIO`` × ``L_seg``; return their names."""
    seg = float(terms.get("seg", torch.zeros(())))
    dominant = []
    for name, weight in weights.items():
        if name == "seg" or name not in terms:
            continue
        weighted = weight * float(terms[name])
        if seg > 0 and weighted > DOMINANCE_RATIO * seg:
            dominant.append(name)
            logger.warning(
                "DistillationTrainer: at the first iteration the weighted term %s = %.4g x %.4g = %.4g is %.0fx "
                "L_seg = %.4g: it will drown the segmentation loss; lower its weight (lambda_%s).",
                name, weight, float(terms[name]), weighted, weighted / seg, seg, name,
            )
    return dominant


class DistillationTrainer(SupervisedTrainer):
    """
    Knowledge distillation on MONAI's ``SupervisedTrainer``: the student (``network``) is trained, a frozen
    teacher provides logits and feature maps, and the loss sees
    ``(student_logits, teacher_logits, student_features, teacher_features, label)``.

    MONAI's own iteration (amp, gradient accumulation, compile, events, decollate) is kept: the trainer hands
    ``SupervisedTrainer`` a :py:class:`DistillationLossAdapter` as ``loss_function`` (the real loss stays available
    as ``trainer.distillation_loss``).

    Teacher: DDP/DataParallel wrappers are removed (the teacher is never DDP-wrapped), moved to ``device``,
    ``requires_grad=False``, eval mode (re-asserted at every iteration) and run under ``torch.no_grad()`` on the
    same input batch as the student (the extra ``args``/``kwargs`` of a 4-tuple ``prepare_batch`` are not passed).

    Taps: ``student_taps[i]`` is paired with ``teacher_taps[i]``; names are those of ``named_modules()`` of the
    unwrapped models (DDP ``.module`` / ``torch.compile`` ``._orig_mod`` are looked through) and are validated
    here. Both may be empty when the loss uses no features (``lambda_km == lambda_aa == 0``). Features are
    captured by forward hooks during the student's forward pass through the inferer: use ``SimpleInferer``
    (the default) for training; with a sliding-window inferer only the last window's features would be kept.

    Iteration output (``engine.state.output``, per item after decollation): MONAI's ``image``, ``label``,
    ``pred``, ``loss`` plus ``loss_seg``, ``loss_logits``, ``loss_km``, ``loss_aa``. Log them with
    ``StatsHandler(output_transform=monai_relkd.engines.loss_terms_from_engine)``.

    Trainable loss parameters (the KM connectors): ``loss_function`` is moved to ``device``; its parameters
    missing from ``optimizer`` are added as a new param group (logged). Learning-rate schedulers built before
    the trainer do not know that group: prefer building the optimizer with
    :py:func:`distillation_parameters`. Under DDP (``torch.distributed`` initialised, world size > 1) the loss
    module is not DDP-wrapped, so the connector gradients are all-reduced (averaged) here after each backward.

    Example::

        loss = RelationalDistillationLoss(lambda_km=1.0, lambda_aa=1.0, student_channels=[16],
                                          teacher_channels=[64])
        trainer = DistillationTrainer(
            device=torch.device("cpu"), max_epochs=10, train_data_loader=loader, network=student,
            optimizer=torch.optim.Adam(distillation_parameters(student, loss), 1e-3), loss_function=loss,
            teacher=load_teacher(teacher_net, "models/teacher.pt"),
            student_taps=["model.1.submodule.0"], teacher_taps=["model.1.submodule.1"],
        )
        trainer.run()

    Args:
        device: training device (the teacher and the loss module are moved there).
        max_epochs, train_data_loader, network, optimizer: as ``SupervisedTrainer``; ``network`` is the student.
        loss_function: a ``RelationalDistillationLoss``-compatible callable
            ``(student_logits, teacher_logits, student_features, teacher_features, label) -> dict`` with keys
            ``"loss"`` (total) and ``"seg"``, ``"logits"``, ``"km"``, ``"aa"``.
        teacher: the teacher network (e.g. from :py:func:`monai_relkd.engines.load_teacher`).
        student_taps: student module names whose outputs are the student features.
        teacher_taps: teacher module names, paired by position with ``student_taps``.
        teacher_cache: a :py:class:`monai_relkd.engines.TeacherOutputCache`: the teacher runs only on input slices
            it has not seen (bit-identical inputs); logits and features are read back from the cache otherwise.
        teacher_input_key: the batch key the teacher reads (e.g. ``"teacher_image"``, the slice before intensity
            augmentation, so that cached entries are hit); default None: the student's own input.
        kwargs: any other ``SupervisedTrainer`` argument (``epoch_length``, ``inferer``, ``train_handlers``,
            ``amp``, ``decollate``, ``accumulation_steps``, ...).

    Raises:
        TypeError: ``teacher`` is not an ``nn.Module`` or ``loss_function`` is not callable.
        ValueError: unknown tap names; unequal numbers of student and teacher taps; taps missing while the loss
            has ``lambda_km``/``lambda_aa`` > 0 or a ``student_channels`` length that differs from the taps; the
            teacher is the student; teacher parameters in the optimizer.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: Callable,
        teacher: nn.Module | None,
        student_taps: Sequence[str] = (),
        teacher_taps: Sequence[str] = (),
        teacher_cache: TeacherOutputCache | None = None,
        teacher_input_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        student_taps, teacher_taps = self._checked_taps(teacher, loss_function, student_taps, teacher_taps)
        device = torch.device(device) if isinstance(device, str) else device
        if teacher is not None:
            teacher = self._frozen_teacher(teacher, network, optimizer, device)
        if isinstance(loss_function, nn.Module):
            loss_function.to(device)
        self._add_loss_params_to_optimizer(optimizer, loss_function)
        inferer = kwargs.get("inferer")
        if student_taps and inferer is not None and not isinstance(inferer, SimpleInferer):
            logger.warning(
                "DistillationTrainer: taps keep the features of the last forward call; with %s the student "
                "features may not match the whole prediction. Use SimpleInferer for training.",
                type(inferer).__name__,
            )

        # hooks go on the plain student before SupervisedTrainer may wrap it with torch.compile
        self.student_taps = FeatureTaps(network, student_taps)
        self.teacher_taps = FeatureTaps(teacher if teacher is not None else nn.Identity(), teacher_taps, detach=True)
        self.teacher = teacher
        self.distillation_loss = loss_function
        adapter = DistillationLossAdapter(loss_function, teacher, self.student_taps, self.teacher_taps,
                                          teacher_cache=teacher_cache, teacher_input_key=teacher_input_key)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=adapter,
            **kwargs,
        )
        adapter.attach(self)
        self.add_event_handler(Events.ITERATION_STARTED, DistillationTrainer._start_iteration)
        if isinstance(loss_function, nn.Module) and any(p.requires_grad for p in loss_function.parameters()):
            self.add_event_handler(IterationEvents.BACKWARD_COMPLETED, DistillationTrainer._all_reduce_loss_grads)

    @classmethod
    def _checked_taps(
        cls, teacher: nn.Module | None, loss_function: Callable, student_taps: Sequence[str],
        teacher_taps: Sequence[str],
    ) -> tuple[list[str], list[str]]:
        """Check the teacher, the loss and the tap lists against each other; returns the tap lists to hook (empty
        without a teacher)."""
        if teacher is None:
            if teacher_required(loss_function):
                raise ValueError(
                    "teacher is None but the loss has a distillation term on (lambda_logits, lambda_km or "
                    "lambda_aa > 0): give a teacher, or set every lambda to 0 to train without distillation."
                )
            if student_taps or teacher_taps:
                logger.info("DistillationTrainer: no teacher (every lambda is 0): the feature taps are not used.")
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}.")
        if not callable(loss_function):
            raise TypeError(f"loss_function must be callable, got {type(loss_function).__name__}.")
        student_taps, teacher_taps = list(student_taps or ()), list(teacher_taps or ())
        if teacher is None:
            student_taps, teacher_taps = [], []
        if len(student_taps) != len(teacher_taps):
            raise ValueError(
                f"student_taps and teacher_taps are paired by position and must have the same length, got "
                f"{len(student_taps)} student and {len(teacher_taps)} teacher taps."
            )
        cls._check_loss_taps(loss_function, len(student_taps))
        return student_taps, teacher_taps

    @staticmethod
    def _frozen_teacher(
        teacher: nn.Module, network: nn.Module, optimizer: Optimizer, device: torch.device
    ) -> nn.Module:
        """The teacher without DDP/compile wrappers, frozen on ``device``; refuses a teacher that is the student or
        whose parameters the optimizer holds."""
        teacher = strip_wrappers(teacher)
        if unwrap_module(teacher) is unwrap_module(network):
            raise ValueError("teacher and network (the student) are the same module.")
        teacher_ids = {id(p) for p in teacher.parameters()}
        if any(id(p) in teacher_ids for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer holds teacher parameters: build it from the student (and loss) only.")
        freeze(teacher.to(device))
        return teacher

    @staticmethod
    def _start_iteration(engine: DistillationTrainer) -> None:
        if engine.teacher is not None:
            engine.teacher.eval()
        engine.student_taps.clear()
        engine.teacher_taps.clear()

    @staticmethod
    def _all_reduce_loss_grads(engine: DistillationTrainer) -> None:
        """Average the loss module's gradients (KM connectors) across ranks: the loss is not DDP-wrapped."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        world = dist.get_world_size()
        for p in engine.distillation_loss.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)

    @staticmethod
    def _check_loss_taps(loss_function: Any, n_taps: int) -> None:
        lambdas = {k: getattr(loss_function, k, 0.0) for k in ("lambda_km", "lambda_aa")}
        active = [k for k, v in lambdas.items() if isinstance(v, (int, float)) and v > 0]
        if active and n_taps == 0:
            raise ValueError(f"the loss has {', '.join(f'{k}>0' for k in active)} but no feature taps were given.")
        # RelationalDistillationLoss builds one KM connector per feature pair (``km_losses``)
        connectors = getattr(loss_function, "km_losses", None)
        channels = getattr(loss_function, "student_channels", None)
        expected = None
        if isinstance(connectors, nn.ModuleList) and len(connectors) > 0:
            expected = len(connectors)
        elif isinstance(channels, Sequence) and len(channels) > 0:
            expected = len(channels)
        if active and expected is not None and expected != n_taps:
            raise ValueError(
                f"the loss was built for {expected} feature pair(s) (student_channels/teacher_channels) "
                f"but {n_taps} tap pair(s) were given."
            )
        needed = getattr(loss_function, "num_feature_pairs", None)  # WeightedDistillationLoss: any further term
        if isinstance(needed, int) and needed > n_taps:
            raise ValueError(f"the loss's feature terms read {needed} tap pair(s) but {n_taps} were given.")

    @staticmethod
    def _add_loss_params_to_optimizer(optimizer: Optimizer, loss_function: Any) -> None:
        if not isinstance(loss_function, nn.Module):
            return
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [p for p in loss_function.parameters() if p.requires_grad and id(p) not in held]
        if not missing:
            return
        group: dict[str, Any] = {"params": missing}
        optimizer.add_param_group(group)
        scheduled = any("initial_lr" in g for g in optimizer.param_groups[:-1])
        if scheduled:
            optimizer.param_groups[-1].setdefault("initial_lr", optimizer.param_groups[-1]["lr"])
        logger.info(
            "DistillationTrainer: added %d trainable loss parameter(s) (%d values, e.g. KM connectors) to the "
            "optimizer as a new param group.",
            len(missing),
            sum(p.numel() for p in missing),
        )
        if scheduled:
            logger.warning(
                "DistillationTrainer: a learning-rate scheduler was created before the loss parameters were added "
                "to the optimizer; it may not schedule them. Build the optimizer with "
                "monai_relkd.engines.distillation_parameters(network, loss) instead."
            )
