"""fedledger's one exception family and its stable error codes (docs/errors.md is generated here).

Every error fedledger raises on purpose derives from ``FedledgerError``; each role has its own
subclass (``IncentiveError``, ``CoordinatorError``, ``NodeError``, ``DevnetError``,
``CompileError``), so a caller catches one root or one role. A refusal the coordinator answers
over HTTP carries an ``ErrorCode``: the code's HTTP status, when it happens and what to do about
it are written once, below, and ``render_markdown`` turns them into docs/errors.md.

Torch-free and web3-free: the CLI and the node import it without either.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Area(enum.StrEnum):
    """Where a code is answered; docs/errors.md has one table per area."""

    UPLOAD = "Uploads: `POST /v1/rounds/{round_id}/updates`"
    READ = "Other endpoints"
    SERVICE = "The coordinator service (start-up, the round driver, the audit)"
    RECEIPT = (
        "Receipts: the coordinator's signed acknowledgement of an upload, checked by the node "
        "and by `fedledger audit --receipt`"
    )
    TASK = "Task specs, plug-ins and data files (checked before anything is trained or sent)"
    SETUP = "Start-up settings of a node or the coordinator (checked before anything is sent)"


@dataclass(frozen=True)
class CodeSpec:
    status: int
    area: Area
    when: str
    fix: str


class ErrorCode(enum.StrEnum):
    """Every stable, machine-readable code fedledger answers a refusal with."""

    spec: CodeSpec

    def __new__(cls, value: str, spec: CodeSpec) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.spec = spec
        return member

    @property
    def status(self) -> int:
        return self.spec.status

    # Uploads, in the order the coordinator checks them: the headers, the round and the chain
    # first; the body is read only once they pass.
    BAD_CONTENT_LENGTH = (
        "bad_content_length",
        CodeSpec(
            400, Area.UPLOAD, "`Content-Length` is not an integer", "send a valid length (or none)"
        ),
    )
    TOO_LARGE = (
        "too_large",
        CodeSpec(
            413,
            Area.UPLOAD,
            "the body exceeds the limit: a declared `Content-Length` before anything else is looked "
            "at, a streamed or chunked body as soon as it goes over, or past the length its "
            "safetensors header implies (`details.limit_bytes`)",
            "send a smaller update",
        ),
    )
    UNSIGNED = (
        "unsigned",
        CodeSpec(
            401,
            Area.UPLOAD,
            "an `X-Fedledger-*` authorisation header is missing (`details.missing` lists them)",
            "sign the upload (EIP-712, see `incentive/signing.py`)",
        ),
    )
    MALFORMED_AUTHORIZATION = (
        "malformed_authorization",
        CodeSpec(
            401,
            Area.UPLOAD,
            "a header is not a valid address, integer or 32-byte hash, or the signed round differs "
            "from the URL",
            "fix the header",
        ),
    )
    BAD_SIGNATURE = (
        "bad_signature",
        CodeSpec(
            401,
            Area.UPLOAD,
            "the signature does not recover to the claimed organisation: wrong key, another chain "
            "id or ledger, or an altered field",
            "sign with the organisation's key for this chain and ledger",
        ),
    )
    UNREGISTERED_SIGNER = (
        "unregistered_signer",
        CodeSpec(
            401,
            Area.UPLOAD,
            "the signer is not a registered organisation on the ledger",
            "ask the consortium admin to register the account",
        ),
    )
    IMPERSONATION = (
        "impersonation",
        CodeSpec(
            403,
            Area.UPLOAD,
            "a registered organisation signed an upload on behalf of another",
            "each organisation uploads for itself",
        ),
    )
    EXPIRED = (
        "expired",
        CodeSpec(
            401, Area.UPLOAD, "the authorisation's expiry has passed", "sign a fresh authorisation"
        ),
    )
    EXPIRY_TOO_FAR = (
        "expiry_too_far",
        CodeSpec(
            401,
            Area.UPLOAD,
            "the expiry is further ahead than the coordinator allows",
            "use a shorter expiry",
        ),
    )
    WRONG_ROUND = (
        "wrong_round",
        CodeSpec(
            409,
            Area.UPLOAD,
            "the round is not the current one (`details.current_round`)",
            "take part in the current round",
        ),
    )
    ROUND_CLOSED = (
        "round_closed",
        CodeSpec(
            409, Area.UPLOAD, "the round is aggregating or settled", "wait for the next round"
        ),
    )
    DEADLINE_PASSED = (
        "deadline_passed",
        CodeSpec(409, Area.UPLOAD, "the round stopped taking uploads", "wait for the next round"),
    )
    REPLAYED = (
        "replayed",
        CodeSpec(
            401, Area.UPLOAD, "this organisation already used the nonce", "use a fresh random nonce"
        ),
    )
    ALREADY_SUBMITTED = (
        "already_submitted",
        CodeSpec(
            409,
            Area.UPLOAD,
            "different bytes were already accepted for this organisation and round",
            "nothing: an update is final",
        ),
    )
    NOT_COMMITTED = (
        "not_committed",
        CodeSpec(
            409,
            Area.UPLOAD,
            "no on-chain commitment for this organisation and round",
            "call `commitUpdate` first",
        ),
    )
    COMMITMENT_MISMATCH = (
        "commitment_mismatch",
        CodeSpec(
            409,
            Area.UPLOAD,
            "the signed update hash differs from the on-chain commitment",
            "upload exactly the committed bytes",
        ),
    )
    TOO_MANY_SAMPLES = (
        "too_many_samples",
        CodeSpec(
            422,
            Area.UPLOAD,
            "the declared sample count is above the consortium's max_samples",
            "declare the number of records trained on; ask the operator if it is above the cap",
        ),
    )
    SAMPLES_MISMATCH = (
        "samples_mismatch",
        CodeSpec(
            409,
            Area.UPLOAD,
            "the signed sample count differs from the committed one",
            "sign the committed count",
        ),
    )
    COMMITMENTS_OPEN = (
        "commitments_open",
        CodeSpec(
            409,
            Area.UPLOAD,
            "the round still takes commitments (until its deadline, `details.deadline`, or until "
            "every active organisation committed): no update is seen before every commitment is "
            "final",
            "upload once the commit phase is over (the node waits for it by itself)",
        ),
    )
    BUSY = (
        "busy",
        CodeSpec(
            503,
            Area.UPLOAD,
            "`max_concurrent_uploads` bodies are being received already (`Retry-After` set); "
            "checked once the headers are verified, before the body is read",
            "retry after the given seconds (the node does)",
        ),
    )
    UPLOAD_IN_PROGRESS = (
        "upload_in_progress",
        CodeSpec(
            409,
            Area.UPLOAD,
            "this organisation's body for the round is being received on another connection",
            "wait for that upload's answer; send one upload at a time",
        ),
    )
    BODY_TIMEOUT = (
        "body_timeout",
        CodeSpec(
            408,
            Area.UPLOAD,
            "the body paused longer than `body_idle_timeout_s` or took longer than "
            "`body_timeout_s` in all (`details.received` bytes arrived); the connection is closed",
            "send the body right after the headers, over a link that sustains it",
        ),
    )
    BODY_HASH_MISMATCH = (
        "body_hash_mismatch",
        CodeSpec(
            401,
            Area.UPLOAD,
            "the body's keccak256 differs from the signed update hash",
            "send the bytes you signed",
        ),
    )
    NOT_SAFETENSORS = (
        "not_safetensors",
        CodeSpec(
            422,
            Area.UPLOAD,
            "the body is not a safetensors file (pickles are refused unread): a header length "
            "past the body or the format's limit, a header that is not JSON or an entry that "
            "is not a tensor",
            "send canonical safetensors bytes",
        ),
    )
    BAD_ENCODING = (
        "bad_encoding",
        CodeSpec(
            422,
            Area.UPLOAD,
            "a compressed update (the spec's `compression.scheme`) breaks its encoding: a missing "
            "or extra tensor, a wrong dtype or length, an int8 scale that is negative or not "
            "finite, top-k indices out of range or not strictly increasing, another count of "
            "values than the fraction gives, or NaN (the tensor is named)",
            "compress with the spec's scheme and fraction (`incentive/compression.py`)",
        ),
    )
    TENSOR_MISMATCH = (
        "tensor_mismatch",
        CodeSpec(
            422,
            Area.UPLOAD,
            "tensor names, shapes or dtypes differ from the model (the first 8 differences "
            "listed, the rest counted), or the header is longer than the model's tensors need",
            "train the round's model",
        ),
    )
    NON_FINITE = (
        "non_finite",
        CodeSpec(422, Area.UPLOAD, "a tensor holds NaN or infinity (named)", "fix training"),
    )
    NORM_EXCEEDED = (
        "norm_exceeded",
        CodeSpec(
            422,
            Area.UPLOAD,
            "the update's L2 norm is over the configured bound",
            "clip the update",
        ),
    )
    CHAIN_UNAVAILABLE = (
        "chain_unavailable",
        CodeSpec(
            503,
            Area.UPLOAD,
            "the chain could not be read, so nothing was verified (`Retry-After` set)",
            "retry after the given seconds",
        ),
    )

    # Reads.
    NO_ROUND = (
        "no_round",
        CodeSpec(
            404,
            Area.READ,
            "`GET /v1/rounds/current` or `/v1/health` before the first round is open",
            "wait for the coordinator to open round 1",
        ),
    )
    TOO_MANY_WAITS = (
        "too_many_waits",
        CodeSpec(
            429,
            Area.READ,
            "a long poll (`GET /v1/rounds/current?wait_s=...`) beyond `max_waits_per_client` held "
            "for this client's address, or `max_waits` in all (`Retry-After` set)",
            "hold one long poll at a time, or poll without `wait_s`",
        ),
    )
    UNKNOWN_ROUND = (
        "unknown_round",
        CodeSpec(
            404,
            Area.READ,
            "`GET /v1/rounds/{id}` for a round that does not exist",
            "ask for a round up to the current one",
        ),
    )
    UNKNOWN_MODEL = (
        "unknown_model",
        CodeSpec(
            404,
            Area.READ,
            "`GET /v1/models/{hash}` for a hash that is not a round's global model (individual "
            "updates are never served)",
            "take the model hash from the ledger or `GET /v1/rounds/current`",
        ),
    )
    NOT_CLAIMABLE = (
        "not_claimable",
        CodeSpec(
            404,
            Area.READ,
            "`GET /v1/rounds/{id}/claims/{org}` for a round that paid everyone directly (or is "
            "not settled)",
            "nothing to claim: a direct settlement already paid",
        ),
    )
    NO_CLAIM = (
        "no_claim",
        CodeSpec(
            404,
            Area.READ,
            "`GET /v1/rounds/{id}/claims/{org}` for an organisation with no leaf in the round's "
            "settlement",
            "nothing to claim: the organisation had no accepted update in the round",
        ),
    )
    NOT_FOUND = "not_found", CodeSpec(404, Area.READ, "no such path", "see `/docs`")
    METHOD_NOT_ALLOWED = (
        "method_not_allowed",
        CodeSpec(405, Area.READ, "the path exists but not with this method", "see `/docs`"),
    )
    INVALID_REQUEST = (
        "invalid_request",
        CodeSpec(
            422,
            Area.READ,
            "a path or query parameter is malformed (`details.fields` gives locations; the input "
            "is never echoed)",
            "fix the parameter",
        ),
    )
    HTTP_ERROR = (
        "http_error",
        CodeSpec(
            400, Area.READ, "any other HTTP-level refusal (the status says which)", "see `/docs`"
        ),
    )

    # The service itself: start-up checks and failures of the round driver or the audit.
    NOT_COORDINATOR = (
        "not_coordinator",
        CodeSpec(
            500,
            Area.SERVICE,
            "the coordinator's key lacks `COORDINATOR_ROLE` on the ledger",
            "start with the key the ledger was deployed for, or have the admin grant the role",
        ),
    )
    WRONG_DATA_DIR = (
        "wrong_data_dir",
        CodeSpec(
            500,
            Area.SERVICE,
            "the data directory belongs to another chain or ledger (the message names the first "
            "round that differs: one the ledger never opened, another model, another settled "
            "model), or is empty while the ledger has rounds",
            "start on the data directory that ran this ledger's rounds",
        ),
    )
    CHAIN_MISMATCH = (
        "chain_mismatch",
        CodeSpec(
            500,
            Area.SERVICE,
            "a round on-chain records another model hash than the coordinator's store",
            "the chain or the data directory was changed by hand; restore the data directory",
        ),
    )
    OVER_BUDGET = (
        "over_budget",
        CodeSpec(
            500,
            Area.SERVICE,
            "the coordinator's `reward_per_round` is above the ledger's `roundBudget`",
            "lower `--reward-per-round`, or have the admin raise the budget "
            "(`fedledger round-budget TOKENS`)",
        ),
    )
    INVALID_POLICY = (
        "invalid_policy",
        CodeSpec(
            500,
            Area.SERVICE,
            "the pricing policy cannot price the consortium (a sampled-valuation budget below "
            "the valuator's minimum for the registered organisations)",
            "raise `--valuation-budget` to the figure the message gives, or leave it unset",
        ),
    )
    MISSING_ROUND = (
        "missing_round",
        CodeSpec(
            500,
            Area.SERVICE,
            "the store has no record of a round the books are asked for",
            "audit a round the coordinator has closed, from its data directory",
        ),
    )
    MISSING_BLOB = (
        "missing_blob",
        CodeSpec(
            500,
            Area.SERVICE,
            "a stored update or model file is missing from the data directory",
            "restore the data directory's `blobs/` from a backup",
        ),
    )
    BOOKS_PROCESS_FAILED = (
        "books_process_failed",
        CodeSpec(
            500,
            Area.SERVICE,
            "the process that closes a round's books (`--books-process`) exited before "
            "answering: killed for memory, say, or it could not start",
            "nothing to do for one failure: the round driver retries with a fresh process; if it "
            "keeps failing, the log gives the exit code (SIGKILL is usually the kernel's "
            "out-of-memory killer): give the coordinator more memory, or close the books in "
            "the coordinator's own process with `--books-process off`",
        ),
    )

    # Receipts: what the coordinator signed for an upload, checked by the node and the audit.
    BAD_RECEIPT = (
        "bad_receipt",
        CodeSpec(
            502,
            Area.RECEIPT,
            "the coordinator acknowledged an upload with a receipt that does not prove itself: "
            "unsigned or malformed, signed for another chain id or ledger, its signature not "
            "recovering to the coordinator it names (another key, or an altered field), or its "
            "signer not holding `COORDINATOR_ROLE` on the ledger",
            "keep the outbox copy and tell the consortium: the upload may not be stored; the "
            "operator runs the coordinator with the ledger's coordinator key, on this chain",
        ),
    )
    RECEIPT_MISMATCH = (
        "receipt_mismatch",
        CodeSpec(
            502,
            Area.RECEIPT,
            "a validly signed receipt acknowledges something else than the upload it answers: "
            "another round, organisation, update hash or sample count (each field named)",
            "the coordinator did not acknowledge this update: upload again (an identical "
            "re-upload answers with the original receipt) and tell the consortium if it persists",
        ),
    )

    # Task specs, plug-ins and data: refused locally by the node, the coordinator or the audit.
    BAD_SPEC = (
        "bad_spec",
        CodeSpec(
            422,
            Area.TASK,
            "the task spec file is unreadable, not TOML, has an unknown key or an invalid value "
            "(the message names each field)",
            "fix the named fields (docs/own-task.md lists every key)",
        ),
    )
    SPEC_MISMATCH = (
        "spec_mismatch",
        CodeSpec(
            422,
            Area.TASK,
            "a task spec's keccak differs from the ledger's `taskSpec()` (or the ledger records "
            "none); the message lists the fields that differ",
            "use the consortium's spec file; the admin records it with `fedledger task-spec`",
        ),
    )
    BAD_PLUGIN = (
        "bad_plugin",
        CodeSpec(
            422,
            Area.TASK,
            "a plug-in named `package.module:attribute` does not import, lacks the attribute, "
            "or the object lacks a method its role needs",
            "check the name, `task.plugin_dir`, and the methods in docs/own-task.md",
        ),
    )
    MODEL_MISMATCH = (
        "model_mismatch",
        CodeSpec(
            422,
            Area.TASK,
            "the model built from the spec has other tensors than `model.tensors` pins, or "
            "than the data's features need",
            "fix the model or the spec (`fedledger task check SPEC` prints the tensors)",
        ),
    )
    PRIVACY_BUDGET_SPENT = (
        "privacy_budget_spent",
        CodeSpec(
            422,
            Area.TASK,
            "a round of DP-SGD would take the node's epsilon past the spec's `privacy.epsilon` "
            "(Opacus's accountant over every round it trained)",
            "nothing: the node has spent its budget and stops training; the consortium may "
            "agree on a new spec and ledger",
        ),
    )
    DATA_FILE = (
        "data_file",
        CodeSpec(
            422,
            Area.TASK,
            "a data file is missing, unreadable, empty or has a header but no rows",
            "point `--data` (or `--validation`) at the CSV file with the spec's columns",
        ),
    )
    DATA_COLUMNS = (
        "data_columns",
        CodeSpec(
            422,
            Area.TASK,
            "a data file lacks a column of the spec, has one the spec does not name, or "
            "repeats one",
            "rename or drop the columns the message names",
        ),
    )
    DATA_VALUE = (
        "data_value",
        CodeSpec(
            422,
            Area.TASK,
            "a cell is empty, NaN, not of the column's type or outside the agreed range",
            "fix the rows the message names (file, row, column)",
        ),
    )
    DATA_LABEL = (
        "data_label",
        CodeSpec(
            422,
            Area.TASK,
            "a label is not one of the spec's classes, or is a number in a classification task "
            "that looks like a regression target",
            "fix the label column, or the spec's `data.label.classes` / `task.kind`",
        ),
    )

    # Start-up settings: refused locally, before a connection is made.
    BAD_CERTIFICATE = (
        "bad_certificate",
        CodeSpec(
            422,
            Area.SETUP,
            "a TLS certificate or key does not parse, has expired or is not yet valid, or the "
            "key does not belong to the certificate",
            "issue a new one with `fedledger certs issue`, or point to the right files",
        ),
    )
    BAD_KEYSTORE = (
        "bad_keystore",
        CodeSpec(
            422,
            Area.SETUP,
            "a keystore is unreadable, not a JSON keystore, or does not unlock with the password "
            "given; or no password was given where no prompt can be shown",
            "check the file and the password (--password-file, FEDLEDGER_PASSWORD or the prompt)",
        ),
    )
    INSECURE_TRANSPORT = (
        "insecure_transport",
        CodeSpec(
            422,
            Area.SETUP,
            "a node or client was pointed at a coordinator on another host over plain HTTP",
            "use an https:// URL (with `--ca-cert` for the consortium CA), or `--insecure`",
        ),
    )
    TLS_REFUSED = (
        "tls_refused",
        CodeSpec(
            422,
            Area.SETUP,
            "the TLS handshake with the coordinator failed: its certificate does not verify "
            "against the CA given, or it refused this node's client certificate",
            "pass the consortium CA (`--ca-cert`) and the certificate it issued to this "
            "organisation (`--client-cert`, `--client-key`)",
        ),
    )
    BAD_CONFIG = (
        "bad_config",
        CodeSpec(
            422,
            Area.SETUP,
            "a config file is missing, unreadable or not TOML, or names a section or key the "
            "command does not have, or gives a value of the wrong type or out of range",
            "fix the file and key the message names (docs/configuration.md lists every key)",
        ),
    )
    PORT_IN_USE = (
        "port_in_use",
        CodeSpec(
            409,
            Area.SETUP,
            "`fedledger devnet up` was given a port that something already listens on (another "
            "devnet, a node, any server); nothing was started or deployed",
            "stop what listens there (`fedledger devnet down` for a devnet), or pick another "
            "`--port`",
        ),
    )


class FedledgerError(Exception):
    """Root of every error fedledger raises on purpose; ``message`` says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CodedError(FedledgerError):
    """An error with a stable code (and HTTP status) that the API and the CLI report as is."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its class, message and attributes (``BaseException`` would call the class
        with the message alone): a coded error keeps its code from process to process."""
        return (_rebuild_coded, (type(self), str(self), self.__dict__))

    @property
    def status(self) -> int:
        return self.code.status


def _rebuild_coded(cls: type[CodedError], message: str, state: dict[str, Any]) -> CodedError:
    error = cls.__new__(cls)
    FedledgerError.__init__(error, message)
    error.__dict__.update(state)
    return error


# ------------------------------------------------------------------ roles


class IncentiveError(FedledgerError):
    """Raised by ``fedledger.incentive``: commitments, signatures, the chain."""


class CommitmentError(IncentiveError, CodedError):
    """Bytes that are not a well-formed canonical update (not safetensors, wrong tensors, non-finite)."""


class SignatureError(IncentiveError, CodedError):
    """A signed request that does not verify."""


class ChainError(IncentiveError):
    """The chain could not be reached or answered something unexpected."""


class ContractRevert(ChainError):
    """A contract call reverted; ``error`` is the custom error's name and ``args`` its arguments."""

    def __init__(self, error: str, args: tuple[object, ...] = (), raw: str = "") -> None:
        shown = f"{error}({', '.join(map(str, args))})" if error else raw or "reverted"
        super().__init__(f"contract reverted: {shown}")
        self.error = error
        self.error_args = args
        self.raw = raw


class CoordinatorError(CodedError):
    """A request the coordinator refuses, or a failure it reports; mapped to HTTP in one place."""

    headers: dict[str, str]

    def __init__(
        self, code: ErrorCode, message: str, *, retry_after_s: int | None = None, **details: Any
    ) -> None:
        """``retry_after_s``: a refusal that passes; the answer says when to try again."""
        super().__init__(code, message, **details)
        self.headers = {} if retry_after_s is None else {"Retry-After": str(retry_after_s)}


class ChainUnavailable(CoordinatorError):
    """The chain could not be read, so nothing can be verified now; retry later (503)."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(ErrorCode.CHAIN_UNAVAILABLE, message, retry_after_s=retry_after_s)


class NodeError(FedledgerError):
    """Raised by an organisation's node."""


class CoordinatorRejected(NodeError):
    """The coordinator answered with an error body (stable ``code``, actionable ``message``)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"coordinator refused ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message  # the coordinator's own words, without the status
        self.details = details


class CoordinatorUnavailable(NodeError):
    """The coordinator could not be reached or answered 5xx; retry later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelVerificationError(NodeError):
    """The global model served by the coordinator does not match its on-chain hash."""


class TaskError(CodedError):
    """A task spec, plug-in or data file that cannot be used; nothing was trained or sent."""


class SetupError(CodedError):
    """A node's or the coordinator's start-up settings (certificates, transport) are unusable."""


class ReceiptError(CodedError):
    """A coordinator's receipt that does not prove the upload it should acknowledge: the node
    refuses it, the audit reports it."""


class DevnetError(FedledgerError):
    """anvil could not be found, started or stopped, or a deployment failed."""


class CompileError(FedledgerError):
    """The Solidity compiler reported errors or could not run."""


# ------------------------------------------------------------------ docs/errors.md

_OPENZEPPELIN_ERRORS = {
    "AccessControlUnauthorizedAccount(address account, bytes32 neededRole)": (
        "FedLedger",
        "a call without the role it needs (AccessControl)",
    ),
    "AccessControlBadConfirmation()": (
        "FedLedger",
        "`renounceRole` for an account other than the caller (AccessControl)",
    ),
    "AccessControlEnforcedDefaultAdminRules()": (
        "FedLedger",
        "granting, revoking or renouncing the admin role other than by the two-step transfer "
        "(AccessControlDefaultAdminRules)",
    ),
    "AccessControlEnforcedDefaultAdminDelay(uint48 schedule)": (
        "FedLedger",
        "accepting an admin transfer, or renouncing the admin role, before its `schedule` "
        "(AccessControlDefaultAdminRules)",
    ),
    "AccessControlInvalidDefaultAdmin(address defaultAdmin)": (
        "FedLedger",
        "the zero address as the first admin, or an admin transfer accepted by another account "
        "than the one proposed (AccessControlDefaultAdminRules)",
    ),
    "SafeCastOverflowedUintDowncast(uint8 bits, uint256 value)": (
        "FedLedger",
        "an admin delay too large for its 48 bits (`changeDefaultAdminDelay`; SafeCast)",
    ),
    "OwnableUnauthorizedAccount(address account)": (
        "RewardToken",
        "minting other than through the ledger, its owner (Ownable)",
    ),
    "OwnableInvalidOwner(address owner)": ("RewardToken", "ownership given to the zero address"),
    "ERC20InsufficientBalance(address sender, uint256 balance, uint256 needed)": (
        "RewardToken",
        "a transfer of more tokens than the sender holds (ERC20)",
    ),
    "ERC20InsufficientAllowance(address spender, uint256 allowance, uint256 needed)": (
        "RewardToken",
        "a `transferFrom` beyond the allowance (ERC20)",
    ),
    "ERC20InvalidSender(address sender)": ("RewardToken", "a transfer from the zero address"),
    "ERC20InvalidReceiver(address receiver)": ("RewardToken", "a transfer to the zero address"),
    "ERC20InvalidApprover(address approver)": ("RewardToken", "an approval by the zero address"),
    "ERC20InvalidSpender(address spender)": ("RewardToken", "an approval of the zero address"),
}
"""The errors the contracts inherit from OpenZeppelin 5, whose NatSpec lives in its sources."""
_NATSPEC_ERROR = re.compile(
    r"[ \t]*///\s*@notice\s+(?P<notice>.+\n(?:[ \t]*///(?!\s*@).*\n)*)"
    r"\s*error\s+(?P<signature>\w+\([^)]*\));"
)


def contract_errors(source: str) -> list[tuple[str, str]]:
    """(``Name(type arg, ...)``, its NatSpec notice, however many ``///`` lines it takes) for
    each custom error in a Solidity source."""
    return [
        (m["signature"], " ".join(line.strip().removeprefix("///").strip() for line in lines))
        for m in _NATSPEC_ERROR.finditer(source)
        if (lines := m["notice"].strip().splitlines())
    ]


def contract_sources() -> list[Path]:
    """The Solidity sources whose custom errors docs/errors.md lists."""
    from fedledger.contracts.compile import HERE, SOURCES

    return [HERE / name for name in SOURCES]


def render_markdown(contract_sources: list[Path]) -> str:
    """docs/errors.md: every ``ErrorCode`` by area, then every custom error of the contracts."""
    lines = [
        "# Error codes",
        "",
        "<!-- Generated from fedledger/errors.py and the contracts' NatSpec by",
        "     `./do docs`; a test fails when this file is stale. Do not edit by hand. -->",
        "",
        'Every refusal by the coordinator is a JSON body `{"code": ..., "message": ..., '
        '"details": {...}}`',
        "with a stable `code` and a message that says what to do. Nothing already accepted is "
        "changed by",
        "a refused request. In Python every one of them is a `fedledger.errors.FedledgerError`.",
        "",
    ]
    for area in Area:
        lines += [f"## {area.value}", ""]
        if area is Area.UPLOAD:
            lines += [
                "Checked in this order; the first that fails answers. The body's safetensors "
                "header is judged as soon as it has arrived, against the tensors the model's "
                "update holds (`not_safetensors`, `bad_encoding`, `tensor_mismatch`), before the "
                "rest of the body is read and its hash checked.",
                "",
                "| status | code | when | what to do |",
                "|---|---|---|---|",
                "| 201 | (receipt) | the update is verified and durably stored (fsync'd file, "
                "committed database row) | nothing |",
                "| 200 | (receipt, `duplicate: true`) | the same bytes were already accepted for "
                "this organisation and round | nothing: this is the original receipt |",
            ]
        else:
            lines += ["| status | code | when | what to do |", "|---|---|---|---|"]
        for code in ErrorCode:
            if code.spec.area is area:
                lines.append(
                    f"| {code.spec.status} | `{code.value}` | {code.spec.when} | {code.spec.fix} |"
                )
        lines.append("")
    lines += [
        "## Contract reverts",
        "",
        "The ledger reverts with custom errors; the Python client raises `ContractRevert` with the",
        "error's name and arguments, and the CLI prints them. Any Ethereum tool decodes them "
        "from the ABI.",
        "",
        "| contract | error | when |",
        "|---|---|---|",
    ]
    for path in contract_sources:
        for signature, notice in contract_errors(path.read_text()):
            lines.append(f"| {path.stem} | `{signature}` | {notice} |")
    for signature, (contract, when) in _OPENZEPPELIN_ERRORS.items():
        lines.append(f"| {contract} (OpenZeppelin) | `{signature}` | {when} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedledger.errors [--check] [PATH]``: write (or check) docs/errors.md."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("path", nargs="?", type=Path, default=Path("docs/errors.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if PATH is stale")
    args = parser.parse_args(argv)
    text = render_markdown(contract_sources())
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is stale: run ./do docs")
            return 1
        return 0
    args.path.write_text(text)
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
