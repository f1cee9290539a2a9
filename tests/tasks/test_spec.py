"""Task spec files: strict parsing, the keccak hash, defaults, diffs and the built-in digits spec."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_hash.auto import keccak

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks import (
    BUILTIN_DIGITS,
    DigitsTask,
    NodeTask,
    ValidatorTask,
    diff_specs,
    load_spec,
    load_task,
    parse_spec,
)

CLASSIFICATION_DATA = """
[data]
label = { name = "outcome", classes = ["no", "yes"] }
features = [
  { name = "age", type = "int", min = 0, max = 120 },
  { name = "weight", min = 0, max = 300 },
]
"""

REGRESSION_DATA = """
[data]
label = { name = "price" }
features = [{ name = "area", min = 0, max = 500 }]
"""


def spec_text(
    kind: str = "classification",
    *,
    head: str = "",
    task: str = "",
    model: str = 'builtin = "linear"',
    training: str = "",
    validation: str = "",
    data: str | None = None,
) -> str:
    """A tabular spec; each argument is the body of its section (``head``: top-level keys)."""
    if data is None:
        data = CLASSIFICATION_DATA if kind == "classification" else REGRESSION_DATA
    return (
        f'# a test spec\n{head}\n[task]\nname = "t"\nkind = "{kind}"\n{task}\n'
        f"[model]\n{model}\n[training]\n{training}\n[validation]\n{validation}\n{data}"
    )


def refused(text: str | bytes) -> str:
    """The message of the BAD_SPEC error that parsing ``text`` raises."""
    raw = text.encode() if isinstance(text, str) else text
    with pytest.raises(TaskError) as info:
        parse_spec(raw)
    assert info.value.code == ErrorCode.BAD_SPEC
    return str(info.value)


def test_minimal_classification_spec_parses_with_defaults() -> None:
    spec = parse_spec(spec_text().encode())
    assert spec.task.name == "t"
    assert spec.task.plugin is None
    assert spec.model.builtin == "linear"
    assert spec.metric == "neg_log_loss"
    assert spec.loss == "cross_entropy"
    assert (spec.training.lr, spec.training.epochs, spec.training.optimiser) == (0.05, 1, "sgd")
    assert spec.data is not None
    assert spec.data.columns == ["age", "weight", "outcome"]
    assert spec.source is None


def test_regression_defaults_to_mse() -> None:
    spec = parse_spec(spec_text("regression").encode())
    assert spec.metric == "neg_mse"
    assert spec.loss == "mse"


def test_explicit_metric_overrides_the_default() -> None:
    spec = parse_spec(spec_text(validation='metric = "accuracy"').encode())
    assert spec.metric == "accuracy"


def test_hash_is_keccak_of_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    raw = spec_text().encode()
    path.write_bytes(raw)
    spec = load_spec(path)
    assert spec.raw == raw
    assert spec.hash == bytes(keccak(raw))
    assert len(spec.hash) == 32
    assert spec.source == path.resolve()
    assert parse_spec(raw).hash == spec.hash  # the source path is not part of the hash


def test_changing_a_comment_changes_the_hash() -> None:
    raw = spec_text().encode()
    edited = raw.replace(b"# a test spec", b"# a test sped")
    assert edited != raw and len(edited) == len(raw)
    assert parse_spec(edited).hash != parse_spec(raw).hash
    assert parse_spec(edited).hash == bytes(keccak(edited))


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (spec_text(head='colour = "blue"'), ["colour: unknown key", "known keys"]),
        (
            spec_text(training="epoch = 3"),
            ["training.epoch: unknown key", "did you mean 'epochs'?"],
        ),
        (spec_text(training="batchsize = 8"), ["training.batchsize", "did you mean 'batch_size'?"]),
        (spec_text(task="plugn = 'x:y'"), ["task.plugn: unknown key", "did you mean 'plugin'?"]),
        (spec_text(training='epochs = "three"'), ["training.epochs", "valid integer"]),
        (spec_text(training="lr = 0"), ["training.lr", "greater than 0"]),
        (spec_text(training='optimiser = "rmsprop"'), ["training.optimiser"]),
        (spec_text(training='loss = "mse"'), ["training.loss", "'mse'", "classification"]),
        (spec_text(model='builtin = "linear"\nhidden = [8]'), ["model.hidden"]),
        (spec_text(head="version = 2"), ["version"]),
    ],
    ids=[
        "unknown-top-level",
        "did-you-mean-epochs",
        "did-you-mean-batch_size",
        "unknown-task-key",
        "epochs-string",
        "lr-zero",
        "optimiser-unknown",
        "loss-of-other-kind",
        "hidden-without-mlp",
        "version",
    ],
)
def test_bad_fields_are_named(text: str, fragments: list[str]) -> None:
    message = refused(text)
    for fragment in fragments:
        assert fragment in message


def test_unknown_training_key_points_at_lr() -> None:
    message = refused(spec_text(training="learning_rate = 0.1"))
    assert "training.learning_rate: unknown key (did you mean 'lr'?)" in message


def test_a_feature_error_names_the_column_and_drops_pydantic_s_prefix() -> None:
    data = CLASSIFICATION_DATA.replace('{ name = "weight", min = 0', '{ name = "weight", min = 400')
    message = refused(spec_text(data=data))
    assert "data.features[1] (column 'weight'): feature 'weight': min (400" in message
    assert "Value error" not in message


@pytest.mark.parametrize(
    "value", ["lr = true", 'epochs = "3"'], ids=["bool-as-float", "str-as-int"]
)
def test_a_value_of_the_wrong_toml_type_is_refused(value: str) -> None:
    """The module promises strict parsing: a TOML value of another type is not coerced."""
    field = value.split(" ")[0]
    assert f"training.{field}" in refused(spec_text(training=value))


def test_an_unknown_key_named_like_a_type_is_still_named() -> None:
    """pydantic tags union branches with type names; a real key of that name must stay."""
    assert "training.float: unknown key" in refused(spec_text(training="float = 1"))


def test_invalid_toml_is_refused() -> None:
    assert "not valid TOML" in refused(spec_text() + "\n[training\n")


def test_non_utf8_bytes_are_refused() -> None:
    assert "not UTF-8" in refused(b"\xff\xfe[task]\n")


def test_feature_range_must_be_increasing() -> None:
    data = CLASSIFICATION_DATA.replace("min = 0, max = 120", "min = 5, max = 5")
    message = refused(spec_text(data=data))
    assert "data.features[0]" in message and "'age'" in message and "min" in message


def test_repeated_column_names_are_refused() -> None:
    data = CLASSIFICATION_DATA.replace('name = "weight"', 'name = "age"')
    message = refused(spec_text(data=data))
    assert "repeated" in message and "'age'" in message
    label_clash = CLASSIFICATION_DATA.replace('name = "weight"', 'name = "outcome"')
    assert "'outcome'" in refused(spec_text(data=label_clash))


def test_classification_needs_two_classes() -> None:
    data = CLASSIFICATION_DATA.replace('classes = ["no", "yes"]', 'classes = ["yes"]')
    assert "data.label.classes" in refused(spec_text(data=data))
    no_classes = CLASSIFICATION_DATA.replace(', classes = ["no", "yes"]', "")
    assert "data.label.classes" in refused(spec_text(data=no_classes))


def test_repeated_classes_are_refused() -> None:
    data = CLASSIFICATION_DATA.replace('["no", "yes"]', '["no", "yes", "no"]')
    assert "repeated" in refused(spec_text(data=data))


def test_classes_are_for_classification_only() -> None:
    data = REGRESSION_DATA.replace('name = "price"', 'name = "price", classes = [0, 1]')
    message = refused(spec_text("regression", data=data))
    assert "data.label.classes" in message and "classification" in message


def test_regression_metric_on_a_classification_task() -> None:
    message = refused(spec_text(validation='metric = "neg_mse"'))
    assert "validation.metric" in message and "'neg_mse'" in message
    assert "validation.report" in refused(spec_text(validation='report = ["r2"]'))


def test_tabular_task_needs_data() -> None:
    assert "[data]" in refused(spec_text(data=""))


def test_builtin_and_plugin_model_are_exclusive() -> None:
    message = refused(spec_text(model='builtin = "linear"\nplugin = "m:f"'))
    assert "model.builtin" in message and "model.plugin" in message


def test_every_bad_field_is_listed() -> None:
    with pytest.raises(TaskError) as info:
        parse_spec(spec_text(training="epochs = 0\nbatch_size = 0").encode())
    fields = info.value.details["fields"]
    assert len(fields) == 2
    assert any(f.startswith("training.epochs") for f in fields)
    assert any(f.startswith("training.batch_size") for f in fields)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError) as info:
        load_spec(tmp_path / "missing.toml")
    assert info.value.code == ErrorCode.BAD_SPEC
    assert "missing.toml" in str(info.value)


def test_diff_lists_exactly_the_differing_fields() -> None:
    ours = parse_spec(spec_text(training="lr = 0.05").encode())
    theirs = parse_spec(spec_text(training="lr = 0.1\nmomentum = 0.9").encode())
    assert diff_specs(ours, theirs) == [
        "training.lr: 0.05 != 0.1",
        "training.momentum: (unset) != 0.9",
    ]
    assert diff_specs(theirs, ours) == [
        "training.lr: 0.1 != 0.05",
        "training.momentum: 0.9 != (unset)",
    ]


def test_diff_names_fields_inside_the_feature_list() -> None:
    ours = parse_spec(spec_text().encode())
    data = CLASSIFICATION_DATA.replace("max = 300", "max = 400")
    theirs = parse_spec(spec_text(data=data).encode())
    assert diff_specs(ours, theirs) == ["data.features[1].max: 300 != 400"]


def test_diff_of_a_comment_only_change_says_layout() -> None:
    raw = spec_text()
    ours = parse_spec(raw.encode())
    theirs = parse_spec(raw.replace("# a test spec", "# another comment").encode())
    assert diff_specs(ours, ours) == []
    assert diff_specs(ours, theirs) == [
        "(same fields; the files differ in layout or comments only)"
    ]


def test_builtin_spec_is_the_digits_task() -> None:
    spec = load_spec()
    assert spec.source == BUILTIN_DIGITS.resolve()
    assert spec.task.name == "digits"
    assert spec.task.plugin == "fedledger.tasks.digits:DigitsTask"
    assert spec.hash == bytes(keccak(BUILTIN_DIGITS.read_bytes()))
    node = load_task(spec, "node")
    validator = load_task(spec, "validator")
    assert isinstance(node, DigitsTask) and isinstance(node, NodeTask)
    assert isinstance(validator, DigitsTask) and isinstance(validator, ValidatorTask)
    x, y = validator.load_validation(None)
    assert tuple(x.shape) == (360, 64) and tuple(y.shape) == (360,)
    assert set(
        validator.score(validator.build_model(0), validator.build_model(0).state_dict(), (x, y))
    ) == {
        "neg_log_loss",
        "accuracy",
    }


def test_compression_defaults_to_none() -> None:
    spec = parse_spec(spec_text().encode())
    assert (spec.compression.scheme, spec.compression.fraction) == ("none", None)


@pytest.mark.parametrize(
    ("body", "scheme", "fraction"),
    [
        ('scheme = "int8"', "int8", None),
        ('scheme = "topk"\nfraction = 0.1', "topk", 0.1),
        ('scheme = "topk"\nfraction = 1', "topk", 1.0),
    ],
    ids=["int8", "topk-tenth", "topk-integer-one"],
)
def test_a_compression_section_parses(body: str, scheme: str, fraction: float | None) -> None:
    spec = parse_spec((spec_text() + f"\n[compression]\n{body}\n").encode())
    assert (spec.compression.scheme, spec.compression.fraction) == (scheme, fraction)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ('scheme = "zstd"', ["compression.scheme", "'none', 'int8' or 'topk'"]),
        ('scheme = "topk"', ["compression.fraction is required", "scheme = 'topk'"]),
        ('scheme = "int8"\nfraction = 0.1', ["compression.fraction is only for", "'int8'"]),
        ("fraction = 0.1", ["compression.fraction is only for", "'none'"]),
        ('scheme = "topk"\nfraction = 0', ["compression.fraction", "greater than 0"]),
        ('scheme = "topk"\nfraction = 1.5', ["compression.fraction", "less than or equal to 1"]),
        ('scheme = "topk"\nfraction = "0.1"', ["compression.fraction", "valid number"]),
        ('schema = "int8"', ["compression.schema: unknown key", "did you mean 'scheme'?"]),
    ],
    ids=[
        "unknown-scheme",
        "topk-without-fraction",
        "fraction-with-int8",
        "fraction-with-default-none",
        "fraction-zero",
        "fraction-above-one",
        "fraction-string",
        "misspelt-scheme",
    ],
)
def test_bad_compression_fields_are_named(body: str, fragments: list[str]) -> None:
    message = refused(spec_text() + f"\n[compression]\n{body}\n")
    for fragment in fragments:
        assert fragment in message
