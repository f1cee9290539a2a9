"""Plug-ins named by `package.module:attribute`: loading, the methods a role needs, the model's fit."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks import (
    DigitsTask,
    TabularTask,
    TaskSpec,
    load_object,
    load_spec,
    load_task,
    parse_spec,
    tensor_shapes,
)

DATA = """
[data]
label = { name = "outcome", classes = ["no", "yes"] }
features = [
  { name = "a", min = 0, max = 1 },
  { name = "b", min = 0, max = 1 },
  { name = "c", min = 0, max = 1 },
]
"""

TASK_CLASSES = """
import torch
from fedledger.tasks import BaseTask

DATA = (torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]))

class FullTask(BaseTask):
    def load_data(self, source):
        return DATA

    def load_validation(self, source):
        return DATA

class ValidatorOnly(BaseTask):
    def load_validation(self, source):
        return DATA

class Bare:
    def __init__(self, spec):
        self.spec = spec

    def build_model(self, seed=0):
        return torch.nn.Linear(3, 2)

    def load_validation(self, source):
        return DATA

    def score(self, model, params, data):
        return {}

def make_full(spec):
    return FullTask(spec)

class Exploding(BaseTask):
    def __init__(self, spec):
        raise ValueError("no licence for this task")
"""

MODELS = """
import torch

def tiny(inputs, outputs, hidden=4):
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, outputs)
    )

def not_a_module(inputs, outputs):
    return {"weight": torch.zeros(outputs, inputs)}

def raising(inputs, outputs):
    raise RuntimeError("factory broke")

def too_wide(inputs, outputs):
    return torch.nn.Linear(inputs + 2, outputs)

def too_many_outputs(inputs, outputs):
    return torch.nn.Linear(inputs, outputs + 1)
"""

Writer = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Writer]:
    """Write a module with a unique name into ``tmp_path``; sys.path and sys.modules are restored."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    names: list[str] = []

    def write(source: str) -> str:
        name = f"plugin_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        importlib.invalidate_caches()
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def spec_file(
    tmp_path: Path,
    *,
    task: str = "",
    model: str = 'builtin = "linear"',
    data: str = DATA,
    plugin_dir: str = ".",
) -> TaskSpec:
    """A spec file in ``tmp_path`` that imports plug-ins from its own folder."""
    text = (
        f'[task]\nname = "t"\nkind = "classification"\nplugin_dir = "{plugin_dir}"\n{task}\n'
        f"[model]\n{model}\n{data}"
    )
    path = tmp_path / "spec.toml"
    path.write_text(text, encoding="utf-8")
    return load_spec(path)


def refused(spec: TaskSpec, code: ErrorCode, role: str = "node") -> str:
    with pytest.raises(TaskError) as info:
        load_task(spec, "node" if role == "node" else "validator")
    assert info.value.code == code, str(info.value)
    return str(info.value)


def test_model_plugin_builds_the_model_with_its_params(
    tmp_path: Path, write_module: Writer
) -> None:
    module = write_module(MODELS)
    spec = spec_file(tmp_path, model=f'plugin = "{module}:tiny"\n[model.params]\nhidden = 5')
    task = load_task(spec, "node")
    assert isinstance(task, TabularTask)
    assert tensor_shapes(task.build_model(seed=0)) == {
        "0.weight": [5, 3],
        "0.bias": [5],
        "2.weight": [2, 5],
        "2.bias": [2],
    }
    first, second = task.build_model(seed=3).state_dict(), task.build_model(seed=3).state_dict()
    assert all(first[n].equal(second[n]) for n in first)  # deterministic from the seed


@pytest.mark.parametrize("attribute", ["FullTask", "make_full"], ids=["class", "factory"])
def test_task_plugin_loads_for_both_roles(
    tmp_path: Path, write_module: Writer, attribute: str
) -> None:
    module = write_module(TASK_CLASSES)
    spec = spec_file(tmp_path, task=f'plugin = "{module}:{attribute}"')
    node = load_task(spec, "node")
    validator = load_task(spec, "validator")
    full_task = sys.modules[module].FullTask
    assert isinstance(node, full_task) and isinstance(validator, full_task)
    assert node.spec is spec
    assert node.load_data("anything")[0].shape == (4, 3)
    assert validator.load_validation(None)[1].tolist() == [0, 1, 0, 1]


def test_malformed_reference(tmp_path: Path) -> None:
    message = refused(spec_file(tmp_path, task='plugin = "nocolon"'), ErrorCode.BAD_PLUGIN)
    assert "'nocolon'" in message and "package.module:attribute" in message
    with pytest.raises(TaskError) as info:
        load_object("a.b:", spec_file(tmp_path), what="model.plugin")
    assert info.value.code == ErrorCode.BAD_PLUGIN and "model.plugin" in str(info.value)


def test_missing_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"absent_{uuid.uuid4().hex}"
    message = refused(spec_file(tmp_path, task=f'plugin = "{name}:Task"'), ErrorCode.BAD_PLUGIN)
    assert f"no module named {name!r}" in message
    assert str(tmp_path) in message  # where it looked


def test_module_that_raises_on_import(tmp_path: Path, write_module: Writer) -> None:
    module = write_module("raise RuntimeError('broken at import')\n")
    message = refused(spec_file(tmp_path, task=f'plugin = "{module}:Task"'), ErrorCode.BAD_PLUGIN)
    assert "RuntimeError: broken at import" in message


def test_missing_attribute(tmp_path: Path, write_module: Writer) -> None:
    module = write_module(TASK_CLASSES)
    message = refused(spec_file(tmp_path, task=f'plugin = "{module}:Nope"'), ErrorCode.BAD_PLUGIN)
    assert "no attribute 'Nope'" in message


def test_missing_plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = spec_file(tmp_path, task='plugin = "m:Task"', plugin_dir="nowhere")
    message = refused(spec, ErrorCode.BAD_PLUGIN)
    assert "task.plugin_dir 'nowhere'" in message


def test_node_needs_load_data(tmp_path: Path, write_module: Writer) -> None:
    module = write_module(TASK_CLASSES)
    spec = spec_file(tmp_path, task=f'plugin = "{module}:ValidatorOnly"')
    message = refused(spec, ErrorCode.BAD_PLUGIN)
    assert "without load_data;" in message and "a node calls" in message
    assert isinstance(load_task(spec, "validator"), sys.modules[module].ValidatorOnly)


def test_object_without_base_task_lists_every_missing_method(
    tmp_path: Path, write_module: Writer
) -> None:
    module = write_module(TASK_CLASSES)
    spec = spec_file(tmp_path, task=f'plugin = "{module}:Bare"')
    assert "without load_data, train, evaluate;" in refused(spec, ErrorCode.BAD_PLUGIN)
    assert load_task(spec, "validator").spec is spec


def test_task_plugin_that_raises_on_construction(tmp_path: Path, write_module: Writer) -> None:
    module = write_module(TASK_CLASSES)
    spec = spec_file(tmp_path, task=f'plugin = "{module}:Exploding"')
    assert "ValueError: no licence for this task" in refused(spec, ErrorCode.BAD_PLUGIN)


@pytest.mark.parametrize(
    ("factory", "code", "fragment"),
    [
        ("not_a_module", ErrorCode.BAD_PLUGIN, "returned a dict, not a torch.nn.Module"),
        ("raising", ErrorCode.BAD_PLUGIN, "RuntimeError: factory broke"),
        ("too_wide", ErrorCode.MODEL_MISMATCH, "cannot take the 3 features"),
        ("too_many_outputs", ErrorCode.MODEL_MISMATCH, "outputs of shape (2, 3)"),
    ],
)
def test_model_factory_problems(
    tmp_path: Path, write_module: Writer, factory: str, code: ErrorCode, fragment: str
) -> None:
    module = write_module(MODELS)
    spec = spec_file(tmp_path, model=f'plugin = "{module}:{factory}"')
    assert fragment in refused(spec, code)


def test_regression_model_needs_one_output(tmp_path: Path, write_module: Writer) -> None:
    module = write_module(MODELS)
    text = (
        f'[task]\nname = "r"\nkind = "regression"\nplugin_dir = "."\n'
        f'[model]\nplugin = "{module}:tiny"\n'
        '[data]\nlabel = { name = "y" }\nfeatures = [{ name = "x", min = 0, max = 1 }]\n'
    )
    (tmp_path / "spec.toml").write_text(text, encoding="utf-8")
    assert tensor_shapes(load_task(load_spec(tmp_path / "spec.toml"), "node").build_model())[
        "2.weight"
    ] == [1, 4]


def test_pinned_tensors_of_other_shapes(tmp_path: Path) -> None:
    pinned = '[model.tensors]\n"0.weight" = [2, 4]\n"0.bias" = [2]'
    message = refused(
        spec_file(tmp_path, model=f'builtin = "linear"\n{pinned}'), ErrorCode.MODEL_MISMATCH
    )
    assert "0.weight is [2, 3], the spec pins [2, 4]" in message
    assert "0.bias" not in message
    renamed = '[model.tensors]\n"1.weight" = [2, 3]\n"0.bias" = [2]'
    message = refused(
        spec_file(tmp_path, model=f'builtin = "linear"\n{renamed}'), ErrorCode.MODEL_MISMATCH
    )
    assert "missing 1.weight [2, 3]" in message and "unexpected 0.weight [2, 3]" in message


def test_tensor_shapes_round_trip_as_the_pinned_table(tmp_path: Path) -> None:
    spec = spec_file(tmp_path, model='builtin = "mlp"\nhidden = [6]')
    shapes = tensor_shapes(TabularTask(spec).build_model())
    assert shapes == {"0.weight": [6, 3], "0.bias": [6], "2.weight": [2, 6], "2.bias": [2]}
    table = "\n".join(f'"{name}" = {shape}' for name, shape in shapes.items())
    pinned = spec_file(tmp_path, model=f'builtin = "mlp"\nhidden = [6]\n[model.tensors]\n{table}')
    assert pinned.model.tensors == shapes
    assert isinstance(load_task(pinned, "validator"), TabularTask)


def test_digits_task_refuses_unknown_options() -> None:
    raw = load_spec().raw.decode()
    assert "seed = 0" in raw
    spec = parse_spec(raw.replace("seed = 0", 'seed = 0\ncolour = "red"').encode())
    with pytest.raises(TaskError) as info:
        load_task(spec, "node")
    assert info.value.code == ErrorCode.BAD_SPEC and "'colour'" in str(info.value)
    with pytest.raises(TaskError) as direct:
        DigitsTask(spec)
    assert direct.value.code == ErrorCode.BAD_SPEC
    tuned = DigitsTask(parse_spec(raw.replace("alpha = 0.5", "alpha = 0.3").encode()))
    assert tuned.alpha == 0.3


BAD_DATA_TASKS = """
import torch
from fedledger.tasks import BaseTask

class Base(BaseTask):
    def build_model(self, seed=0):
        return torch.nn.Linear(3, 2)

class WrongWidth(Base):
    def load_data(self, source):
        return torch.zeros(4, 10), torch.tensor([0, 1, 0, 1])

class LabelTooLarge(Base):
    def load_data(self, source):
        return torch.zeros(4, 3), torch.tensor([0, 1, 7, 1])

class FloatLabels(Base):
    def load_data(self, source):
        return torch.zeros(4, 3), torch.tensor([0.0, 1.0, 0.0, 1.0])

class Crashing(Base):
    def load_data(self, source):
        raise FileNotFoundError(f"no folder {source}")

class NotTensors(Base):
    def load_data(self, source):
        return [[0, 0, 0]], [0]
"""


@pytest.mark.parametrize(
    ("name", "code", "fragment"),
    [
        ("WrongWidth", ErrorCode.DATA_VALUE, "cannot take features of shape (10,)"),
        ("LabelTooLarge", ErrorCode.DATA_LABEL, "labels range over [0, 7], but the model has 2"),
        ("FloatLabels", ErrorCode.DATA_LABEL, "must be a 1-d tensor of class indices"),
        ("Crashing", ErrorCode.DATA_FILE, "the task's load_data raised FileNotFoundError"),
        ("NotTensors", ErrorCode.BAD_PLUGIN, "must return (features, labels) tensors"),
    ],
)
def test_a_plug_in_s_data_is_checked_against_its_model(
    tmp_path: Path, write_module: Writer, name: str, code: ErrorCode, fragment: str
) -> None:
    """A task plug-in has no schema: what its load_data returns is checked against its model
    before anything trains, instead of a shape error deep in the first round."""
    from fedledger.tasks import load_data

    module = write_module(BAD_DATA_TASKS)
    spec = spec_file(tmp_path, task=f'plugin = "{module}:{name}"', model="", data="")
    task = load_task(spec, "node")
    with pytest.raises(TaskError) as info:
        load_data(task, "somewhere")
    assert info.value.code is code
    assert fragment in info.value.message and "somewhere" in info.value.message


def test_a_plug_in_that_imports_a_missing_package_says_so(
    tmp_path: Path, write_module: Writer
) -> None:
    module = write_module("import no_such_package_here  # noqa\n")
    spec = spec_file(tmp_path, task=f'plugin = "{module}:X"', model="", data="")
    with pytest.raises(TaskError, match="it needs the module 'no_such_package_here'") as info:
        load_task(spec, "node")
    assert info.value.code is ErrorCode.BAD_PLUGIN
