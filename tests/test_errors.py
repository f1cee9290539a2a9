"""One error family: every exception fedledger defines derives from ``FedledgerError``; every
error code is documented in docs/errors.md (generated, never stale) and used by the code; every
custom error the contracts can revert with is documented too."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import fedledger
from fedledger.contracts.compile import load_artifact
from fedledger.errors import ErrorCode, FedledgerError, contract_sources, render_markdown
from harness import modules_loaded_by

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    names = ["fedledger"]
    for info in pkgutil.walk_packages(fedledger.__path__, "fedledger."):
        if info.name not in ("fedledger.__main__",):
            names.append(info.name)
    return names


def test_every_exception_fedledger_defines_is_a_fedledger_error() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                cls.__module__ == name
                and issubclass(cls, BaseException)
                and not issubclass(cls, FedledgerError)
            ):
                strays.append(f"{name}.{cls.__name__}")
    assert strays == []


def test_errors_md_is_generated_from_the_codes_and_is_current() -> None:
    text = render_markdown(contract_sources())
    assert (ROOT / "docs" / "errors.md").read_text() == text, "stale: run ./do docs"
    for code in ErrorCode:
        assert f"| {code.status} | `{code.value}` |" in text


def test_every_error_code_is_raised_somewhere() -> None:
    sources = "\n".join(
        p.read_text()
        for folder in ("coordinator", "incentive", "node", "fedledger", "fedledger/tasks")
        for p in (ROOT / folder).glob("*.py")
        if p.name != "errors.py"
    )
    sources += "ErrorCode.CHAIN_UNAVAILABLE" if "ChainUnavailable(" in sources else ""
    unused = [code.name for code in ErrorCode if f"ErrorCode.{code.name}" not in sources]
    assert unused == []


def test_every_contract_revert_is_documented() -> None:
    text = (ROOT / "docs" / "errors.md").read_text()
    for contract in ("FedLedger", "RewardToken"):
        for entry in load_artifact(contract)["abi"]:
            if entry["type"] == "error":
                assert f"`{entry['name']}" in text, entry["name"]


def test_reading_the_chain_does_not_import_torch() -> None:
    """``fedledger rewards`` and any reader of on-chain encodings stay light: no torch."""
    imports = (
        "fedledger.cli, fedledger.errors, fedledger.incentive.onchain, "
        "fedledger.incentive.ledger, fedledger.incentive.chain, fedledger.coordinator.policy"
    )
    assert modules_loaded_by(imports, ("torch",)) == []


def test_a_coded_error_keeps_its_class_code_and_details_through_pickling() -> None:
    import pickle

    from fedledger.errors import CommitmentError, CoordinatorError

    busy = CoordinatorError(ErrorCode.BUSY, "come back later", retry_after_s=3, limit=16)
    busy.add_note("from the books process")
    again = pickle.loads(pickle.dumps(busy))
    assert type(again) is CoordinatorError and again.code is ErrorCode.BUSY
    assert str(again) == "come back later" and again.details == {"limit": 16}
    assert again.headers == {"Retry-After": "3"} and again.status == 503
    assert again.__notes__ == ["from the books process"]
    bad = pickle.loads(pickle.dumps(CommitmentError(ErrorCode.NOT_SAFETENSORS, "not safetensors")))
    assert type(bad) is CommitmentError and bad.code is ErrorCode.NOT_SAFETENSORS
