"""Learning tasks: the consortium's spec, the plug-in interface, and the built-in tasks.

``load_task(spec, role)`` turns a parsed spec into the object its role calls: the built-in
tabular task when the spec names no plug-in, else the plug-in's object (a class or factory
called with the spec), checked for the methods the role needs and for a model that fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, overload

import torch

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks.base import (
    NODE_METHODS,
    VALIDATOR_METHODS,
    BaseTask,
    Dataset,
    NodeTask,
    ValidatorTask,
)
from fedledger.tasks.digits import DigitsTask, dirichlet_partition, make_split
from fedledger.tasks.plugin import (
    check_data,
    check_model,
    load_object,
    require_methods,
    tensor_shapes,
)
from fedledger.tasks.spec import BUILTIN_DIGITS, TaskSpec, diff_specs, load_spec, parse_spec
from fedledger.tasks.tabular import TabularTask, read_table

Role = Literal["node", "validator"]


@overload
def load_task(spec: TaskSpec, role: Literal["node"]) -> NodeTask: ...
@overload
def load_task(spec: TaskSpec, role: Literal["validator"]) -> ValidatorTask: ...
def load_task(spec: TaskSpec, role: Role) -> NodeTask | ValidatorTask:
    """The task object of ``spec`` for ``role`` (a node, or the coordinator and auditors)."""
    reference = spec.task.plugin
    if reference is None:
        task: object = TabularTask(spec)
    else:
        factory = load_object(reference, spec, what="task.plugin")
        try:
            task = factory(spec) if callable(factory) else factory
        except TaskError:
            raise
        except Exception as exc:  # the consortium's code: report it, with its name
            raise TaskError(
                ErrorCode.BAD_PLUGIN,
                f"task.plugin {reference!r}: calling it with the spec raised "
                f"{type(exc).__name__}: {exc}",
            ) from exc
    methods = NODE_METHODS if role == "node" else VALIDATOR_METHODS
    require_methods(task, methods, role=role, reference=reference or "builtin tabular")
    check_model(spec, task.build_model(seed=0))  # type: ignore[attr-defined]
    if not hasattr(task, "spec"):
        task.spec = spec  # type: ignore[attr-defined]
    return task  # type: ignore[return-value]


def load_data(task: NodeTask, source: str) -> Dataset:
    """The node's data from ``source``, checked against the task's model (``check_data``)."""
    return _checked(task, source, lambda: task.load_data(source), "load_data")


def load_validation(task: ValidatorTask, source: str | None) -> Dataset:
    """The validation set from ``source``, checked against the task's model."""
    shown = source if source is not None else "the task's validation set"
    return _checked(task, shown, lambda: task.load_validation(source), "load_validation")


def _checked(
    task: NodeTask | ValidatorTask, shown: str, load: Callable[[], Dataset], method: str
) -> Dataset:
    try:
        data = load()
    except TaskError:
        raise
    except Exception as exc:  # the consortium's code: report it, with its name
        raise TaskError(
            ErrorCode.DATA_FILE,
            f"{shown}: the task's {method} raised {type(exc).__name__}: {exc}",
        ) from exc
    if not (isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data)):
        raise TaskError(
            ErrorCode.BAD_PLUGIN,
            f"{shown}: the task's {method} must return (features, labels) tensors",
        )
    check_data(task.spec, task.build_model(seed=0), data, shown)
    return data


__all__ = [
    "BUILTIN_DIGITS",
    "BaseTask",
    "Dataset",
    "DigitsTask",
    "NodeTask",
    "TabularTask",
    "TaskSpec",
    "ValidatorTask",
    "check_data",
    "check_model",
    "diff_specs",
    "dirichlet_partition",
    "load_data",
    "load_object",
    "load_spec",
    "load_task",
    "load_validation",
    "make_split",
    "parse_spec",
    "read_table",
    "tensor_shapes",
]
