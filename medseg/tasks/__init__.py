"""Task families: what differs between them, behind one contract (:class:`Task`).

``model.yaml`` names its task (``task.kind``, see :class:`medseg.config.MedsegConfig`); the
generic machinery asks it through :func:`task_of`. BraTS segmentation (:mod:`medseg.tasks.brats`)
is registered here, and is the task of a ``model.yaml`` that names none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg.tasks.base import (
    CaseScore,
    GraphSpec,
    InputSpec,
    LabelMapping,
    OutputSpec,
    Task,
    TaskConfig,
    config_of,
    get_convention,
    get_task,
    known_tasks,
    register_task,
    task_of_convention,
    unregister_task,
)
from medseg.tasks.brats import BRATS
from medseg.tasks.skin import SKIN

if TYPE_CHECKING:
    from medseg.config import MedsegConfig

__all__ = [
    "DEFAULT_TASK",
    "CaseScore",
    "GraphSpec",
    "InputSpec",
    "LabelMapping",
    "OutputSpec",
    "Task",
    "TaskConfig",
    "config_of",
    "default_task",
    "get_convention",
    "get_task",
    "known_tasks",
    "register_task",
    "task_of",
    "task_of_convention",
    "unregister_task",
]

register_task(BRATS)
register_task(SKIN)

#: The task of a ``model.yaml`` without a ``task`` section (every model before tasks existed).
DEFAULT_TASK = BRATS.name


def default_task() -> Task:
    """The task of a config that names none."""
    return get_task(DEFAULT_TASK)


def task_of(cfg: MedsegConfig) -> Task:
    """The task ``cfg`` names (``cfg.task.kind``)."""
    return get_task(cfg.task.kind)
