"""Loading the consortium's code by module path (``package.module:attribute``) and checking it."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks.spec import TaskSpec

_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def plugin_dir(spec: TaskSpec) -> Path | None:
    """The folder the spec's plug-ins are imported from (``task.plugin_dir``, relative to the file)."""
    if spec.task.plugin_dir is None:
        return None
    return (spec.base_dir / spec.task.plugin_dir).resolve()


def _import(module_name: str, folder: Path | None) -> ModuleType:
    """Import ``module_name``, finding its top-level module or package in ``folder`` first and
    then among the installed packages, without putting ``folder`` on ``sys.path`` (so a plug-in
    of several modules is a package whose modules import each other as its submodules)."""
    top = module_name.partition(".")[0]
    if folder is not None and top not in sys.modules:
        found = importlib.machinery.PathFinder.find_spec(top, [str(folder)])
        if found is not None and found.loader is not None:
            module = importlib.util.module_from_spec(found)
            sys.modules[top] = module  # as the import system does, before running its code
            try:
                found.loader.exec_module(module)
            except BaseException:
                del sys.modules[top]
                raise
    return importlib.import_module(module_name)


def load_object(reference: str, spec: TaskSpec, *, what: str) -> Any:
    """The object ``package.module:attribute`` names, importing from the spec's plug-in folder
    first; a ``TaskError`` (``bad_plugin``) says what could not be found and where it looked."""
    if not _REFERENCE.match(reference):
        raise TaskError(
            ErrorCode.BAD_PLUGIN,
            f"{what} {reference!r} is not of the form 'package.module:attribute'",
        )
    module_name, _, attribute = reference.partition(":")
    folder = plugin_dir(spec)
    if folder is not None and not folder.is_dir():
        raise TaskError(
            ErrorCode.BAD_PLUGIN,
            f"task.plugin_dir {spec.task.plugin_dir!r}: no folder {folder} (an audit on "
            "another machine passes --spec with its copy of the spec, next to its plug-ins)",
        )
    try:
        module = _import(module_name, folder)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not module_name.startswith(exc.name):
            raise TaskError(  # the plug-in was found; something it imports was not
                ErrorCode.BAD_PLUGIN,
                f"{what} {reference!r}: importing {module_name} failed: it needs the module "
                f"{exc.name!r}, which is not installed",
            ) from None
        where = (
            f" (looked in {folder} and the installed packages)"
            if folder
            else (" (set task.plugin_dir to the folder that holds it, or install it)")
        )
        raise TaskError(
            ErrorCode.BAD_PLUGIN, f"{what} {reference!r}: no module named {exc.name!r}{where}"
        ) from None
    except Exception as exc:  # the plug-in's own import failed: say so, with its error
        raise TaskError(
            ErrorCode.BAD_PLUGIN,
            f"{what} {reference!r}: importing {module_name} raised {type(exc).__name__}: {exc}",
        ) from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise TaskError(
                ErrorCode.BAD_PLUGIN,
                f"{what} {reference!r}: {module_name} has no attribute {attribute!r}",
            )
        target = getattr(target, part)
    return target


def require_methods(task: object, methods: Sequence[str], *, role: str, reference: str) -> None:
    """Refuse a task object that lacks a method its role calls."""
    missing = [m for m in methods if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(
            ErrorCode.BAD_PLUGIN,
            f"task.plugin {reference!r} gives a {type(task).__name__} without "
            f"{', '.join(missing)}; a {role} calls {', '.join(methods)} "
            "(subclass fedledger.tasks.BaseTask for defaults)",
        )


def _probe(model: nn.Module, x: torch.Tensor, code: ErrorCode, failure: str) -> torch.Tensor:
    """The model's output on ``x`` (eval mode, no gradients, on the model's device); a model
    that cannot take it is refused with ``code`` and ``failure`` followed by its error."""
    parameter = next(iter(model.parameters()), None)
    probe = x.to(parameter.device) if parameter is not None else x
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output: torch.Tensor = model(probe)
    except Exception as exc:  # a shape error from the consortium's model: name the mismatch
        raise TaskError(code, f"{failure}: {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    return output


def check_data(
    spec: TaskSpec, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], source: str
) -> None:
    """Refuse data its model cannot train on: features the model does not take, and for
    classification labels that are not class indices below the model's outputs (a plug-in's
    data is checked here; a tabular file was already checked against the schema)."""
    x, y = data
    if len(x) == 0 or len(x) != len(y):
        raise TaskError(
            ErrorCode.DATA_FILE,
            f"{source}: {len(x)} feature rows and {len(y)} labels; expected as many, at least one",
        )
    output = _probe(
        model,
        x[:2],
        ErrorCode.DATA_VALUE,
        f"{source}: the model of task {spec.task.name!r} cannot take features of shape "
        f"{tuple(x.shape[1:])}",
    )
    if spec.task.kind == "regression":
        return
    outputs = output.shape[-1] if output.ndim > 1 else 1
    if y.is_floating_point() or y.ndim != 1:
        raise TaskError(
            ErrorCode.DATA_LABEL,
            f"{source}: classification labels must be a 1-d tensor of class indices, got "
            f"{y.dtype} of shape {tuple(y.shape)}",
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= outputs:
        raise TaskError(
            ErrorCode.DATA_LABEL,
            f"{source}: labels range over [{low}, {high}], but the model has {outputs} outputs "
            f"(classes 0 to {outputs - 1})",
        )


def tensor_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The model's state tensors and their shapes: the spec's ``model.tensors`` table."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def check_model(spec: TaskSpec, model: nn.Module) -> None:
    """Refuse a model whose tensors differ from the spec's pinned ``model.tensors`` or whose
    outputs do not fit the data schema (classes, or one value for regression)."""
    pinned = spec.model.tensors
    if pinned is not None:
        built = tensor_shapes(model)
        problems = [f"missing {n} {pinned[n]}" for n in pinned if n not in built]
        problems += [f"unexpected {n} {built[n]}" for n in built if n not in pinned]
        problems += [
            f"{n} is {built[n]}, the spec pins {pinned[n]}"
            for n in pinned
            if n in built and built[n] != pinned[n]
        ]
        if problems:
            raise TaskError(
                ErrorCode.MODEL_MISMATCH,
                f"the model of task {spec.task.name!r} does not match model.tensors: "
                + "; ".join(problems),
            )
    if spec.data is None:
        return
    features = len(spec.data.features)
    classes = spec.data.label.classes
    expected = (2, len(classes)) if classes is not None else (2, 1)
    output = _probe(
        model,
        torch.zeros(2, features, dtype=torch.float32),
        ErrorCode.MODEL_MISMATCH,
        f"the model of task {spec.task.name!r} cannot take the {features} features of the "
        "spec's data schema",
    )
    shape = tuple(output.shape)
    if shape != expected and not (classes is None and shape == (2,)):
        raise TaskError(
            ErrorCode.MODEL_MISMATCH,
            f"the model of task {spec.task.name!r} maps a batch of 2 to outputs of shape "
            f"{shape}; the spec's {'classes need' if classes else 'regression needs'} {expected}",
        )
