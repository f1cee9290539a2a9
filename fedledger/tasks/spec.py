"""The consortium's task specification: one TOML file that every node, coordinator and auditor loads.

The file names the model (a built-in or a plug-in), the local training, the validation metric,
optionally DP-SGD and the compression of updates, and, for tabular data, the feature and label
schema. Its hash, ``spec_hash``, is the keccak-256
of the file's bytes (``cast keccak "0x$(xxd -p spec.toml | tr -d '\n')"`` prints it), recorded
on the ledger (``taskSpec()``): a node refuses to train for a coordinator whose spec is not the
one on the chain. Parsing is strict: an unknown key, a wrong type or an impossible combination
is refused with the field's dotted name.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from eth_hash.auto import keccak
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from fedledger.errors import ErrorCode, TaskError
from fedledger.incentive.onchain import CompressionScheme, Metric

Kind = Literal["classification", "regression"]
Loss = Literal["cross_entropy", "mse"]
Optimiser = Literal["sgd", "adam"]
ReportMetric = Literal["accuracy", "neg_log_loss", "neg_brier", "neg_mse", "mse", "r2"]

CLASSIFICATION_METRICS = frozenset({"accuracy", "neg_log_loss", "neg_brier"})
REGRESSION_METRICS = frozenset({"neg_mse", "mse", "r2"})
DEFAULT_METRIC: dict[str, Metric] = {"classification": "neg_log_loss", "regression": "neg_mse"}
DEFAULT_LOSS: dict[str, Loss] = {"classification": "cross_entropy", "regression": "mse"}

BUILTIN_DIGITS = Path(__file__).with_name("digits.toml")
"""The built-in digits task's spec: what a devnet, a coordinator and a node use by default."""


class _Section(BaseModel):
    # strict: TOML has types, so "3" is not an int and true is not a float
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class TaskSection(_Section):
    """What the task is and which code runs it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Short name.")
    kind: Kind = Field(description="classification (logits out) or regression (one value out).")
    plugin: str | None = Field(
        None,
        description="`package.module:attribute` of a task plug-in (a class or factory called "
        "with the spec); unset: the built-in tabular task, which needs [data].",
    )
    plugin_dir: str | None = Field(
        None, description="Folder, relative to the spec file, to import plug-ins from."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Free-form settings handed to the plug-in."
    )


class ModelSection(_Section):
    """The model every organisation trains: a built-in or a plug-in factory."""

    builtin: Literal["linear", "mlp"] | None = Field(
        None,
        description="linear: one affine layer (logistic or linear regression); mlp: hidden "
        "layers of the given widths with ReLU.",
    )
    hidden: list[int] = Field(default_factory=list, description="Hidden widths of the mlp.")
    plugin: str | None = Field(
        None,
        description="`package.module:attribute` of a factory(inputs, outputs, **params) that "
        "returns a torch.nn.Module.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the plug-in factory."
    )
    tensors: dict[str, list[int]] | None = Field(
        None,
        description="The model's tensors and their shapes, pinned: a model that builds other "
        "tensors is refused (`fedledger task check` prints this table).",
    )

    @model_validator(mode="after")
    def _one_model(self) -> ModelSection:
        if self.builtin is not None and self.plugin is not None:
            raise ValueError("give either model.builtin or model.plugin, not both")
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"model.hidden widths must be >= 1, got {self.hidden}")
        if self.hidden and self.builtin != "mlp":
            raise ValueError("model.hidden is only for model.builtin = 'mlp'")
        return self


class TrainingSection(_Section):
    """Each organisation's local training in a round."""

    loss: Loss | None = Field(None, description="Default: cross_entropy, or mse for regression.")
    optimiser: Optimiser = "sgd"
    lr: float = Field(0.05, gt=0, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1, le=1000, description="Local epochs a round.")
    batch_size: int = Field(32, ge=1)
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal coefficient (0: FedAvg).")


class ValidationSection(_Section):
    """How the coordinator scores a model on its validation set."""

    metric: Metric | None = Field(
        None,
        description="The coalition game's utility; default neg_log_loss, or neg_mse for "
        "regression.",
    )
    report: list[ReportMetric] = Field(
        default_factory=list, description="Further metrics printed to nodes and auditors."
    )


class PrivacySection(_Section):
    """DP-SGD per record on every node (Opacus), and each organisation's privacy budget."""

    noise_multiplier: float = Field(
        gt=0, description="Gaussian noise std as a multiple of max_grad_norm (Opacus's sigma)."
    )
    max_grad_norm: float = Field(gt=0, description="Per-sample gradient clipping bound.")
    epsilon: float = Field(gt=0, description="The budget: epsilon over the whole run, at delta.")
    delta: float = Field(gt=0, lt=1, description="delta of the (epsilon, delta) guarantee.")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="Opacus's accountant: Renyi DP (rdp) or privacy random variables."
    )


class CompressionSection(_Section):
    """How every node compresses its update before committing and uploading it: the
    coordinator decodes with the same scheme and refuses any other encoding (``bad_encoding``)."""

    scheme: CompressionScheme = Field(
        "none",
        description="none: the float32 delta; int8: one symmetric scale per tensor (4x "
        "smaller); topk: the largest |x| of each tensor, as indices and values, with error "
        "feedback on the node.",
    )
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="topk only: the share of each tensor's coordinates sent (0 < fraction <= 1).",
    )

    @model_validator(mode="after")
    def _fraction_for_topk(self) -> CompressionSection:
        if self.scheme == "topk" and self.fraction is None:
            raise ValueError(
                "compression.fraction is required with compression.scheme = 'topk': the share "
                "of each tensor's coordinates sent, e.g. 0.1"
            )
        if self.scheme != "topk" and self.fraction is not None:
            raise ValueError(
                f"compression.fraction is only for compression.scheme = 'topk', not "
                f"{self.scheme!r}: remove it"
            )
        return self


class FeatureColumn(_Section):
    """One feature column of a tabular file and the range the consortium agreed to scale it by."""

    name: str = Field(min_length=1)
    type: Literal["float", "int", "bool"] = "float"
    min: float = Field(description="Agreed lower end: scaled to -1 (a value below is refused).")
    max: float = Field(description="Agreed upper end: scaled to +1 (a value above is refused).")

    @model_validator(mode="after")
    def _range(self) -> FeatureColumn:
        if not self.min < self.max:
            raise ValueError(f"feature {self.name!r}: min ({self.min}) must be below max")
        return self


class LabelColumn(_Section):
    """The label column: class values for classification, a number for regression."""

    name: str = Field(min_length=1)
    classes: list[int | str] | None = Field(
        None, description="Classification: every label value, in the model's output order."
    )
    min: float | None = Field(
        None, description="Regression: agreed lower end of the target, scaled to -1."
    )
    max: float | None = Field(
        None, description="Regression: agreed upper end of the target, scaled to +1."
    )

    @model_validator(mode="after")
    def _range(self) -> LabelColumn:
        if (self.min is None) != (self.max is None):
            raise ValueError(f"label {self.name!r}: give both min and max, or neither")
        if self.min is not None and self.max is not None:
            if self.classes is not None:
                raise ValueError(f"label {self.name!r}: min and max are for regression targets")
            if not self.min < self.max:
                raise ValueError(f"label {self.name!r}: min ({self.min}) must be below max")
        return self


class DataSection(_Section):
    """The schema of a tabular data file (CSV with a header row)."""

    label: LabelColumn
    features: list[FeatureColumn] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> DataSection:
        names = [f.name for f in self.features] + [self.label.name]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"column names must be unique; repeated: {repeated}")
        return self

    @property
    def columns(self) -> list[str]:
        """Every column a data file must have: the features, then the label."""
        return [f.name for f in self.features] + [self.label.name]


class TaskSpec(_Section):
    """A parsed task specification; ``source`` is the file it came from (not part of the hash)."""

    version: Literal[1] = Field(1, description="Spec format version.")
    task: TaskSection
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    data: DataSection | None = None
    privacy: PrivacySection | None = None
    compression: CompressionSection = Field(default_factory=CompressionSection)

    _source: Path | None = PrivateAttr(None)
    _raw: bytes = PrivateAttr(b"")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        kind = self.task.kind
        allowed = CLASSIFICATION_METRICS if kind == "classification" else REGRESSION_METRICS
        for field, metric in [("validation.metric", self.validation.metric)] + [
            ("validation.report", m) for m in self.validation.report
        ]:
            if metric is not None and metric not in allowed:
                raise ValueError(
                    f"{field} {metric!r} does not fit a {kind} task; use one of {sorted(allowed)}"
                )
        if self.training.loss is not None and self.training.loss != DEFAULT_LOSS[kind]:
            raise ValueError(
                f"training.loss {self.training.loss!r} does not fit a {kind} task; "
                f"use {DEFAULT_LOSS[kind]!r}"
            )
        if self.data is not None:
            classes = self.data.label.classes
            if kind == "classification" and (classes is None or len(set(classes)) < 2):
                raise ValueError("data.label.classes must list at least two distinct classes")
            if classes is not None and len(set(map(str, classes))) != len(classes):
                raise ValueError(f"data.label.classes has repeated values: {classes}")
            if kind == "regression" and classes is not None:
                raise ValueError("data.label.classes is for classification tasks only")
        if self.privacy is not None and self.training.prox_mu > 0:
            raise ValueError(
                "training.prox_mu must be 0 with [privacy] (DP-SGD clips the loss's gradient per record)"
            )
        if self.task.plugin is None:
            if self.data is None:
                raise ValueError("the built-in tabular task (no task.plugin) needs a [data] schema")
            if self.model.builtin is None and self.model.plugin is None:
                raise ValueError("name the model: model.builtin ('linear', 'mlp') or model.plugin")
        return self

    @property
    def metric(self) -> Metric:
        """The coalition game's metric (the spec's, or the kind's default)."""
        return self.validation.metric or DEFAULT_METRIC[self.task.kind]

    @property
    def loss(self) -> Loss:
        return self.training.loss or DEFAULT_LOSS[self.task.kind]

    @property
    def source(self) -> Path | None:
        """The spec file this was loaded from."""
        return self._source

    @property
    def raw(self) -> bytes:
        """The file's bytes, exactly: what the hash is taken of and the coordinator serves."""
        return self._raw

    @property
    def hash(self) -> bytes:
        """keccak-256 of the file's bytes (the ledger's ``taskSpec()``)."""
        return spec_hash(self._raw)

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the spec are taken from."""
        return self._source.parent if self._source is not None else Path.cwd()


def spec_hash(raw: bytes) -> bytes:
    """keccak-256 of a spec file's bytes: what the ledger records and any Ethereum tool prints."""
    return bytes(keccak(raw))


_UNION_TAGS = frozenset({"int", "str", "float", "bool"})  # pydantic's tags of union branches


def _location(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as the spec's dotted field name, e.g. ``data.features[2].min``."""
    text = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not (isinstance(previous, int) and part in _UNION_TAGS):  # a list item's branch
            text += f".{part}" if text else part
        previous = part
    return text or "spec"


_SYNONYMS = {
    "learning_rate": "lr",
    "optimizer": "optimiser",
    "num_epochs": "epochs",
    "local_epochs": "epochs",
    "batch": "batch_size",
    "metrics": "report",
    "target": "label",
    "columns": "features",
    "type": "kind",
}
"""Keys people write for ours, suggested when close spelling finds nothing."""


def _unknown_key_hint(error: Mapping[str, Any]) -> str:
    loc = error["loc"]
    if error["type"] != "extra_forbidden" or not loc:
        return ""
    parent: type[BaseModel] = TaskSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = parent.model_fields[str(part)].annotation
        candidates = [a for a in get_args(annotation) or (annotation,) if isinstance(a, type)]
        nested = [a for a in candidates if issubclass(a, BaseModel)]
        if not nested:
            return ""
        parent = nested[0]
    close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
    synonym = _SYNONYMS.get(str(loc[-1]))
    if not close and synonym in parent.model_fields:
        close = [synonym]
    known = ", ".join(parent.model_fields)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {known})"


def _column_name(document: Mapping[str, Any], loc: tuple[int | str, ...]) -> str:
    """`` (column 'age')`` for an error inside ``data.features[i]``, naming the feature."""
    if len(loc) >= 3 and loc[:2] == ("data", "features") and isinstance(loc[2], int):
        features = document.get("data", {}).get("features", [])
        if isinstance(features, list) and loc[2] < len(features):
            name = features[loc[2]].get("name") if isinstance(features[loc[2]], Mapping) else None
            if isinstance(name, str):
                return f" (column {name!r})"
    return ""


def parse_spec(raw: bytes, *, source: Path | None = None) -> TaskSpec:
    """Parse a spec file's bytes; a ``TaskError`` (``bad_spec``) names every bad field."""
    where = str(source) if source is not None else "task spec"
    try:
        document = tomllib.loads(raw.decode("utf-8-sig"))  # an editor's byte-order mark is fine
    except UnicodeDecodeError as exc:
        raise TaskError(ErrorCode.BAD_SPEC, f"{where}: not UTF-8 text ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TaskError(ErrorCode.BAD_SPEC, f"{where}: not valid TOML: {exc}") from None
    try:
        spec = TaskSpec.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = _location(error["loc"]) + _column_name(document, error["loc"])
            message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            message = message.removeprefix("Value error, ")
            problems.append(f"{field}: {message}{_unknown_key_hint(error)}")
        raise TaskError(
            ErrorCode.BAD_SPEC, f"{where}: " + "; ".join(problems), fields=problems
        ) from None
    spec._source = source
    spec._raw = raw
    return spec


def load_spec(path: Path | None = None) -> TaskSpec:
    """Read and parse the spec file at ``path`` (default: the built-in digits task's)."""
    path = BUILTIN_DIGITS if path is None else path
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(
            ErrorCode.BAD_SPEC, f"cannot read the task spec {path}: {exc.strerror}"
        ) from None
    return parse_spec(raw, source=path.resolve())


def _leaves(document: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for index, item in enumerate(value):
                yield from _leaves(item, f"{name}[{index}].")
        else:
            yield name, value


def diff_specs(ours: TaskSpec, theirs: TaskSpec) -> list[str]:
    """The fields in which two spec files differ, as ``field: ours != theirs`` lines."""
    mine = dict(_leaves(tomllib.loads(ours.raw.decode("utf-8-sig"))))
    other = dict(_leaves(tomllib.loads(theirs.raw.decode("utf-8-sig"))))
    missing = object()
    lines = []
    for field in sorted(mine.keys() | other.keys()):
        a, b = mine.get(field, missing), other.get(field, missing)
        if a != b:
            shown_a = "(unset)" if a is missing else repr(a)
            shown_b = "(unset)" if b is missing else repr(b)
            lines.append(f"{field}: {shown_a} != {shown_b}")
    if not lines and ours.raw != theirs.raw:
        lines.append("(same fields; the files differ in layout or comments only)")
    return lines
