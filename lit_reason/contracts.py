"""What the callbacks need from a LightningModule, as ``typing.Protocol`` classes in one place.

The callbacks work with any LightningModule that has the members below, not only with the
library's methods. Each callback checks its contract at fit start with :func:`require`, which
names every missing member and what it is for, instead of failing later inside a hook.

============================  ===============================================  ========================
protocol                      members                                           checked by
============================  ===============================================  ========================
:class:`HasPolicy`            ``policy``, ``tokenizer``, ``task``               EvalAccuracy, ExportPolicy
:class:`HasStateValues`       + ``state_values(prompt_ids, partial_ids, ex)``   ValueCalibration
:class:`ExportsValue`         + ``value_model``                                 ExportPolicy(value_dirpath)
:class:`RoundsCapable`        ``use_dataset(path)``                             RoundSchedule
:class:`Recollects`           + ``recollect(output, seed, round_index)``        IterativeRounds
:class:`RefreshesTargets`     + ``refresh_targets(output, seed, tag, sims)``    MCTSTargetRefresh
============================  ===============================================  ========================

The online methods (:class:`~lit_reason.methods.online.OnlineRL`) and OREO, DQO, DVO and DVPO are
:class:`HasStateValues`; every :class:`~lit_reason.methods.offline.OfflineRL` is
:class:`Recollects`; DVO is :class:`RefreshesTargets`. ``tests/test_recipes.py`` checks each
recipe's module against the contracts of the callbacks the recipe uses.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class HasPolicy(Protocol):
    """A module with a policy to sample from and the task it is trained on."""

    policy: torch.nn.Module  # the causal LM being trained (``generate``-free forward is enough)
    tokenizer: Any  # the policy's tokenizer (``pad_token_id``, ``eos_token_id``, ``decode``)
    task: Any  # a :class:`lit_reason.tasks.base.Task` (examples, prompt, reward)


@runtime_checkable
class HasStateValues(HasPolicy, Protocol):
    """A module that predicts the value of a partial response (for value calibration).

    ``value_range`` (optional attribute, default ``(0, 1)``) is the scale of the predictions.
    """

    def state_values(self, prompt_ids: list[list[int]], partial_ids: list[list[int]],
                     examples: list[dict]) -> torch.Tensor:
        """Tensor[N]: the predicted value of each state ``prompt_ids[i] ++ partial_ids[i]``."""


@runtime_checkable
class ExportsValue(HasPolicy, Protocol):
    """A module with a :class:`~lit_reason.models.value.ValueModel` to export (OREO, DQO, DVPO)."""

    value_model: Any  # a ValueModel (it may be built in ``setup``, see DVPO)


@runtime_checkable
class RoundsCapable(Protocol):
    """A module whose training data can be switched between epochs."""

    def use_dataset(self, path: str | Path) -> None:
        """Trains on the dataset folder ``path`` from the next epoch on."""


@runtime_checkable
class Recollects(RoundsCapable, Protocol):
    """A module that collects a new dataset with its current policy (IterativeRounds)."""

    def recollect(self, output: str | Path, seed: int, round_index: int) -> Path:
        """Collects round ``round_index``'s data into ``output``; returns the dataset folder."""


@runtime_checkable
class RefreshesTargets(RoundsCapable, Protocol):
    """A module that re-runs its target search with the current policy (DVO's MCTS)."""

    def refresh_targets(self, output: str | Path, seed: int, tag: str, simulations: int | None = None) -> Path:
        """Builds fresh targets into ``output``; returns the dataset folder."""


_PROTOCOL_BASES = {"Protocol", "Generic", "object"}


def members(protocol: type) -> dict[str, bool]:
    """The public members of ``protocol`` (its bases included): ``{name: is_method}``."""
    out: dict[str, bool] = {}
    for klass in reversed(protocol.__mro__):
        if klass.__name__ in _PROTOCOL_BASES or not getattr(klass, "_is_protocol", False):
            continue
        for name in getattr(klass, "__annotations__", {}):
            out.setdefault(name, False)
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                out[name] = True
    return out


def missing(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` (an instance or a class) lacks.

    A method must be callable. A data member must be present and not None on an instance;
    a property or class attribute of its class also counts (it may be filled in ``setup``).
    For a class only the methods can be checked (data members are set in ``__init__``).
    """
    cls = obj if isinstance(obj, type) else type(obj)
    lacking = []
    for name, is_method in members(protocol).items():
        if is_method:
            if not callable(getattr(obj, name, None)):
                lacking.append(name)
        elif not isinstance(obj, type) and not hasattr(cls, name) and getattr(obj, name, None) is None:
            lacking.append(name)
    return lacking


def satisfies(obj: Any, protocol: type) -> bool:
    """True when ``obj`` (instance or class) has every member of ``protocol``."""
    return not missing(obj, protocol)


def require(obj: Any, protocol: type, user: str, hint: str = "", error: type[Exception] = AttributeError) -> None:
    """Raises ``error`` naming what ``obj`` lacks of ``protocol``, which ``user`` needs.

    Args:
        obj: The LightningModule.
        protocol: One of the protocols above.
        user: Who needs it (a callback's name), for the message.
        hint: A fix appended to the message (e.g. which method class provides the member).
        error: The exception type (AttributeError for data members, TypeError for methods).
    """
    lacking = missing(obj, protocol)
    if lacking:
        name = type(obj).__name__
        wanted = ", ".join(f"`{m}`" for m in members(protocol))
        raise error(f"{user} needs the LightningModule to provide {wanted} ({protocol.__name__}); "
                    f"{name} has no " + ", ".join(f"`{m}`" for m in lacking) + (f". {hint}" if hint else ""))
