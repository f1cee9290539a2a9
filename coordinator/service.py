"""The coordinator service: the round driver thread, uploads, long polls and queries.

A thin shell over the parts: ``UploadVerifier`` checks an upload, ``Store`` keeps it,
``RoundMachine`` moves rounds on and ``Settler`` writes to the ledger. The constructor only
keeps its arguments; ``start`` opens the data directory, loads the task and talks to the chain.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedledger import wire
from fedledger.coordinator import books_process
from fedledger.coordinator.books_process import BooksProcess, BooksSetup
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.metrics import CoordinatorMetrics
from fedledger.coordinator.policy import PricingPolicy, PrivacyNoise
from fedledger.coordinator.results import claim_ticket, pending_result
from fedledger.coordinator.rounds import COMMIT_CHECK_MIN_S, Game, RoundMachine
from fedledger.coordinator.store import Store, StoredRound, StoredUpdate
from fedledger.coordinator.uploads import AuthenticatedUpload, UploadVerifier
from fedledger.coordinator.waits import Known, RoundState, RoundWatch
from fedledger.devices import default_device
from fedledger.errors import (
    ChainError,
    CodedError,
    CoordinatorError,
    ErrorCode,
    FedledgerError,
    TaskError,
)
from fedledger.failpoints import UPLOAD_AFTER_BLOB, failpoint
from fedledger.incentive.commitment import canonical_bytes, encode_tensors, keccak, specs_of
from fedledger.incentive.compression import Codec
from fedledger.incentive.ledger import LedgerClient, as_bytes32
from fedledger.incentive.onchain import METRICS, hex32
from fedledger.incentive.signing import UploadAcknowledgement
from fedledger.receipts import ReceiptSigner
from fedledger.tasks import TaskSpec, ValidatorTask, load_spec, load_task, load_validation
from fedledger.tasks.spec import CLASSIFICATION_METRICS, REGRESSION_METRICS

log = logging.getLogger("fedledger.coordinator")

MAX_LONG_POLL_S = 30.0
"""The longest ``GET /v1/rounds/current`` holds a request waiting for a change."""


def check_spec_on_chain(spec: TaskSpec, ledger: LedgerClient) -> None:
    """Refuse a task spec other than the one the ledger records (``taskSpec()``)."""
    on_chain = ledger.task_spec()
    if on_chain == spec.hash:
        return
    where = spec.source or "the task spec"
    if on_chain == bytes(32):
        raise TaskError(
            ErrorCode.SPEC_MISMATCH,
            f"ledger {ledger.address} records no task spec; the admin records this one with "
            f"`fedledger task-spec {where}` before the first round",
            spec_hash=hex32(spec.hash),
        )
    raise TaskError(
        ErrorCode.SPEC_MISMATCH,
        f"{where} hashes to {hex32(spec.hash)}, but ledger {ledger.address} records task spec "
        f"{hex32(on_chain)}: start with the consortium's spec file",
        spec_hash=hex32(spec.hash),
        on_chain=hex32(on_chain),
    )


def bind_policy(policy: PricingPolicy, spec: TaskSpec) -> PricingPolicy:
    """``policy`` for the task of ``spec``: its name and hash recorded, and the spec's metric
    unless the operator set one, which must then fit the task's kind."""
    metric = policy.metric if "metric" in policy.model_fields_set else spec.metric
    allowed = CLASSIFICATION_METRICS if spec.task.kind == "classification" else REGRESSION_METRICS
    if metric not in allowed:
        raise CoordinatorError(
            ErrorCode.INVALID_POLICY,
            f"metric {metric!r} cannot value the {spec.task.kind} task {spec.task.name!r}; "
            f"use one of {sorted(m for m in allowed if m in METRICS)}",
        )
    return policy.model_copy(
        update={
            "task": spec.task.name,
            "task_spec": hex32(spec.hash),
            "metric": metric,
            "privacy_noise": None
            if spec.privacy is None
            else PrivacyNoise.of(spec.privacy, spec.training),
        }
    )


class RoundService:
    """Runs the federation for one ledger from one data directory; ``metrics`` (its own
    Prometheus registry) counts its rounds, uploads and chain calls."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        ledger: LedgerClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ledger.account is None:
            raise ValueError("the coordinator's ledger client needs the coordinator's key")
        self.settings = settings
        self.metrics = CoordinatorMetrics()
        self.ledger = ledger.observed(self.metrics.chain_call)
        self.clock = clock
        self.last_error: str | None = None
        self._lock = threading.RLock()  # guards upload acceptance against round transitions
        self._wake = threading.Event()
        self.watch = RoundWatch()  # the latest round's state; long polls wait on it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._parts: tuple[Store, ValidatorTask, RoundMachine, UploadVerifier] | None = None
        self._books: BooksProcess | None = None  # closes the books when they have a process
        self.spec: TaskSpec | None = None
        self.receipt_signer: ReceiptSigner | None = None  # signs each upload's receipt

    # -------------------------------------------------------------- lifecycle

    def start(self, *, background: bool = True) -> None:
        """Check the role and the data directory, reconcile with the chain, open round 1 if needed."""
        account = self.ledger.account
        assert account is not None
        if not self.ledger.has_coordinator_role(account.address):
            raise CoordinatorError(
                ErrorCode.NOT_COORDINATOR,
                f"{account.address} lacks COORDINATOR_ROLE on ledger {self.ledger.address}",
            )
        spec = load_spec(self.settings.task_spec)
        check_spec_on_chain(spec, self.ledger)
        task = load_task(spec, "validator")
        self.settings = settings = self.settings.model_copy(
            update={"pricing": bind_policy(self.settings.pricing, spec)}
        )
        self.spec = spec
        self._check_valuation_budget(len(self.ledger.organisations()))
        self._check_round_budget(self.ledger.round_budget())
        model = task.build_model(seed=settings.pricing.model_seed)
        x_val, y_val = load_validation(task, settings.validation)
        device = torch.device(settings.device) if settings.device else default_device()
        store = Store(settings.data_dir)
        codec = Codec.of(spec.compression)
        if books_process.wanted(settings.books_process, model, device):
            # Spawned now: it imports torch while this process talks to the chain.
            self._books = BooksProcess(
                BooksSetup(
                    data_dir=settings.data_dir,
                    model=model,
                    x_val=x_val,
                    y_val=y_val,
                    codec=codec,
                    policy=settings.pricing,
                    device=str(device),
                    threads=torch.get_num_threads(),
                )
            )
            self._books.start()
        machine = RoundMachine(
            settings,
            store,
            self.ledger,
            Game(
                model,
                x_val,
                y_val,
                report=lambda params: task.score(model, params, (x_val, y_val)),
                codec=codec,
            ),
            clock=self.clock,
            device=device,
            lock=self._lock,
            metrics=self.metrics,
            books_process=self._books,
        )
        verifier = UploadVerifier(
            settings,
            self.ledger,
            chain_id=self.ledger.chain_id(),
            specs=specs_of(model.state_dict()),
            clock=self.clock,
            codec=codec,
            commits_closed=machine.commits_closed,  # what the driver saw, the uploads need
            members=machine.registered_at_open,
        )
        self._parts = (store, task, machine, verifier)
        self.receipt_signer = ReceiptSigner(
            account, chain_id=verifier.chain_id, ledger=self.ledger.address
        )
        machine.settler.check_data_dir(store)
        store.keep_task(hex32(spec.hash), spec.raw.decode("utf-8"), spec.source)
        validation = canonical_bytes({"x": x_val, "y": y_val})
        store.keep_validation(hex32(keccak(validation)), validation)
        data, digest = encode_tensors(model.state_dict())
        if not machine.settler.reconcile(store, hex32(digest)):
            store.put_blob(hex32(digest), data)
            machine.open_round(1, hex32(digest))
        latest = store.latest_round()
        self.metrics.current_round.set(0 if latest is None else latest.round_id)
        self.watch.set(self._round_state(latest))
        if self._books is not None:
            self._books_ready(machine)
        if background:
            self.start_driver()

    def _books_ready(self, machine: RoundMachine) -> None:
        """Wait for the books process; under ``auto``, close the books in this process if it
        cannot start (a task whose model its own process cannot rebuild, say)."""
        assert self._books is not None
        try:
            self._books.wait_ready()
        except Exception as exc:
            if self.settings.books_process == "on":
                raise
            log.warning("books process unavailable, closing the books in this one: %s", exc)
            self._books.stop()
            self._books = machine.books_process = None

    def _check_round_budget(self, round_budget: int) -> None:
        """Refuse to pay more a round than the ledger lets a round pay (``setRoundBudget``)."""
        reward = self.settings.pricing.reward_per_round
        if reward > round_budget:
            raise CoordinatorError(
                ErrorCode.OVER_BUDGET,
                f"reward_per_round {reward} exceeds the ledger's round budget {round_budget} "
                f"(token units, set by the admin with setRoundBudget): every settlement would "
                "revert; lower --reward-per-round or have the admin raise the budget",
                reward_per_round=reward,
                round_budget=round_budget,
            )

    def _check_valuation_budget(self, num_organisations: int) -> None:
        """Refuse a sampled-valuation budget too small for the consortium registered now."""
        policy = self.settings.pricing
        if policy.valuation_budget is None or num_organisations <= policy.max_exact_players:
            return
        needed = policy.valuation_budget_needed(num_organisations)
        if policy.valuation_budget < needed:
            raise CoordinatorError(
                ErrorCode.INVALID_POLICY,
                f"valuation_budget={policy.valuation_budget} cannot value a round of the "
                f"{num_organisations} registered organisations: the sampled valuator needs at "
                f"least {needed} evaluations (2K + 2); raise --valuation-budget",
            )

    def _started(self) -> tuple[Store, ValidatorTask, RoundMachine, UploadVerifier]:
        if self._parts is None:
            raise RuntimeError("RoundService used before start()")
        return self._parts

    @property
    def store(self) -> Store:
        return self._started()[0]

    @property
    def task(self) -> ValidatorTask:
        return self._started()[1]

    @property
    def machine(self) -> RoundMachine:
        return self._started()[2]

    def start_driver(self) -> None:
        """Run the round state machine in a background thread (polls, and wakes on uploads)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="round-driver", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.watch.close()
        if self._books is not None:
            self._books.stop()  # a round being closed is redone at the next start
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._parts is not None:
            self.store.close()

    def _run(self) -> None:
        backoff_s = 1.0
        while not self._stop.is_set():
            # A hint the last step was too soon to act on is taken at its earliest.
            hinted = self._parts is not None and self.machine.commit_hint
            self._wake.wait(COMMIT_CHECK_MIN_S if hinted else self.settings.poll_interval_s)
            self._wake.clear()
            try:
                if self.step():
                    self._wake.set()  # take the next transition at once (open after close)
                self.last_error = None
                backoff_s = 1.0
            except FedledgerError as exc:
                self.last_error = str(exc)
                log.warning("round driver: %s (retrying)", exc)
                self._stop.wait(1.0)
            except Exception as exc:  # a bug must not kill the driver while /health says ok
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("round driver failed; retrying in %.0f s", backoff_s)
                self._stop.wait(backoff_s)
                backoff_s = min(2 * backoff_s, 60.0)

    def step(self) -> bool:
        """Advance the round state machine by at most one transition; whether it made one.

        Requests long-polling the current round are answered as soon as it changes.
        """
        before = self._round_state()
        try:
            self.machine.step()
        finally:
            after = self._round_state()
            self.watch.set(after)
        return after != before

    # ------------------------------------------------------------------ reads

    def _round_state(self, latest: StoredRound | None = None) -> RoundState:
        """The watched state of ``latest`` (read from the store when not given)."""
        latest = latest or self.store.latest_round()
        if latest is None:
            return None
        closed = latest.round_id in self.machine.commits_closed
        return (latest.round_id, latest.status, closed)

    def hint_commits(self) -> None:
        """A node waits for the commit phase to end (it has just committed, so the phase may be
        over): have the driver read it from the chain now rather than at its next poll. The
        driver reads it at most every ``COMMIT_CHECK_MIN_S``, however many hints arrive."""
        self.machine.commit_hint = True
        self._wake.set()

    def training_status(self) -> wire.TrainingStatus:
        current = self.store.latest_round()
        if (
            current is not None
            and current.round_id >= self.settings.total_rounds
            and current.status in (wire.RoundStatus.FINALIZED, wire.RoundStatus.FAILED)
        ):
            return wire.TrainingStatus.DONE
        return wire.TrainingStatus.RUNNING

    def current_after(self, known: Known, wait_s: float) -> wire.CurrentRound:
        """The current round once its state differs from ``known`` (``waits.differs``), or after
        ``wait_s`` seconds (at most ``MAX_LONG_POLL_S``); blocks the calling thread. The API
        waits with ``watch.wait_async`` instead, holding no thread."""
        if known is not None:
            self.watch.wait(known, min(max(wait_s, 0.0), MAX_LONG_POLL_S))
        return self.current()

    async def wait_for_change(self, known: Known, wait_s: float) -> None:
        """Until the round's state differs from ``known``, or ``wait_s`` seconds (at most
        ``MAX_LONG_POLL_S``) pass; holds no thread."""
        await self.watch.wait_async(known, min(max(wait_s, 0.0), MAX_LONG_POLL_S))

    def current(self) -> wire.CurrentRound:
        current = self.store.latest_round()
        if current is None:
            raise CoordinatorError(ErrorCode.NO_ROUND, "no round has been opened yet")
        return wire.CurrentRound(
            training=self.training_status(),
            round_id=current.round_id,
            status=current.status,
            commits_closed=current.round_id in self.machine.commits_closed,
            model_hash=current.model_hash,
            deadline=current.deadline,
            total_rounds=self.settings.total_rounds,
            task=self.settings.pricing.task,
            organisations_expected=len(self.machine.expected_organisations(current.round_id)),
            uploads_received=len(self.store.updates_for(current.round_id)),
        )

    def round_result(self, round_id: int) -> wire.RoundResult:
        stored = self.store.get_round(round_id)
        if stored is None:
            raise CoordinatorError(ErrorCode.UNKNOWN_ROUND, f"round {round_id} does not exist")
        if stored.result is not None:
            return wire.RoundResult.model_validate(stored.result)
        return pending_result(stored, self.store.updates_for(round_id))

    def read_member(self, headers: Mapping[str, str]) -> str | None:
        """The organisation a signed read request comes from (None: anonymous)."""
        return self._started()[3].read_member(headers)

    def claim_ticket(self, round_id: int, organisation: str) -> wire.ClaimTicket:
        """What ``organisation`` sends to ``claimReward`` for a round settled by claims."""
        return claim_ticket(self.round_result(round_id), organisation)

    def model_bytes(self, model_hash: str) -> bytes:
        try:
            digest = hex32(as_bytes32(model_hash))
        except ValueError as exc:
            raise CoordinatorError(
                ErrorCode.UNKNOWN_MODEL, f"{model_hash!r} is not a 32-byte hash"
            ) from exc
        # Only global models: individual updates are for the coordinator's eyes (and its
        # auditors', from its data directory), never served to other members.
        store = self.store
        data = store.get_blob(digest) if store.is_global_model(digest) else None
        if data is None:
            raise CoordinatorError(ErrorCode.UNKNOWN_MODEL, f"no global model with hash {digest}")
        return data

    # ----------------------------------------------------------------- uploads

    def accept_upload(
        self, path_round_id: int, headers: Mapping[str, str], body: bytes
    ) -> tuple[wire.UploadReceipt, bool]:
        """Verify an upload against its signature and on-chain commitment, then store it durably.

        Returns the receipt and whether it was newly stored (False for an identical re-upload).
        The API calls the two halves, ``admit_upload`` before it reads the body and
        ``store_upload`` after; this is both, for a body already in hand.
        """
        return self.store_upload(self.admit_upload(path_round_id, headers), body)

    def admit_upload(self, path_round_id: int, headers: Mapping[str, str]) -> AdmittedUpload:
        """Everything the headers decide, before the body is read: the signature and the
        signer's registration, the round, the nonce, the on-chain commitment of the signed hash
        and count, the end of the commit phase. Refusals are counted in ``metrics``."""
        started = time.perf_counter()
        with self._counting_refusals(started):
            return self._admit_upload(path_round_id, headers, started)

    def store_upload(
        self, admitted: AdmittedUpload, body: bytes
    ) -> tuple[wire.UploadReceipt, bool]:
        """The body's checks (its hash is the signed one, its tensors fit the model), then
        durable storage; counted in ``metrics`` by result."""
        with self._counting_refusals(admitted.started):
            receipt, created = self._store_upload(admitted, body)
        self.metrics.upload_handled(created=created, seconds=time.perf_counter() - admitted.started)
        return receipt, created

    def check_head(self, prefix: bytes) -> int | None:
        """An upload body's first bytes: its exact length once its safetensors header is in
        and lists the model's tensors (``tensor_mismatch``, ``bad_encoding``, ``not_safetensors``
        otherwise); None while more of the header is to come."""
        return self._started()[3].check_head(prefix)

    def refuse_upload(self, code: ErrorCode, started: float) -> None:
        """Count a refusal the API made by itself (a body too large, too slow, or cut off)."""
        self.metrics.upload_refused(code, seconds=time.perf_counter() - started)

    @contextmanager
    def _counting_refusals(self, started: float) -> Iterator[None]:
        try:
            yield
        except CodedError as exc:
            self.refuse_upload(exc.code, started)
            raise
        except ChainError:  # the API answers it as the chain being unavailable
            self.refuse_upload(ErrorCode.CHAIN_UNAVAILABLE, started)
            raise

    def _admit_upload(
        self, path_round_id: int, headers: Mapping[str, str], started: float
    ) -> AdmittedUpload:
        store, _, _, verifier = self._started()
        upload = verifier.authenticate(headers, path_round_id)
        signer = upload.signer
        with self._lock:
            current = verifier.check_round(upload, store.latest_round())
            existing = store.get_update(current.round_id, signer)
            if existing is not None:  # a re-upload: the body must still be the accepted bytes
                verifier.check_same_bytes(existing, upload.update_hash)
                return AdmittedUpload(upload, current, started, existing)
            verifier.check_open(current)
            verifier.check_nonce(upload, store.nonce_used(signer, str(upload.auth.nonce)))
        verifier.check_commitment(upload)
        verifier.check_commits_closed(current)
        return AdmittedUpload(upload, current, started)

    def _store_upload(
        self, admitted: AdmittedUpload, body: bytes
    ) -> tuple[wire.UploadReceipt, bool]:
        store, _, _, verifier = self._started()
        upload, current = admitted.upload, admitted.round
        signer = upload.signer
        verifier.check_body_hash(upload, body)
        if admitted.existing is not None:
            return self._receipt(admitted.existing, duplicate=True), False
        verifier.check_content(body)

        store.put_blob(upload.update_hash, body)
        failpoint(UPLOAD_AFTER_BLOB)
        with self._lock:
            latest = store.latest_round()
            if (
                latest is None
                or latest.round_id != current.round_id
                or latest.status != wire.RoundStatus.OPEN
            ):
                raise CoordinatorError(
                    ErrorCode.ROUND_CLOSED,
                    f"round {current.round_id} closed while the upload was verified",
                    current_round=latest.round_id if latest else 0,
                )
            stored, created = store.insert_update(
                StoredUpdate(
                    round_id=current.round_id,
                    organisation=signer,
                    update_hash=upload.update_hash,
                    num_samples=upload.auth.num_samples,
                    nonce=str(upload.auth.nonce),
                    received_at=self.clock(),
                )
            )
        if not created:  # a concurrent request for the same organisation and round won
            verifier.check_same_bytes(stored, upload.update_hash)
            return self._receipt(stored, duplicate=True), False
        self._wake.set()
        return self._receipt(stored), True

    def _receipt(self, update: StoredUpdate, *, duplicate: bool = False) -> wire.UploadReceipt:
        """The receipt of a stored update, signed with the coordinator's key over the stored
        fields (received_at in whole seconds): a re-upload gets the original, signature and all."""
        signer = self.receipt_signer
        if signer is None:
            raise RuntimeError("RoundService used before start()")
        ack = UploadAcknowledgement(
            round_id=update.round_id,
            organisation=update.organisation,
            update_hash=as_bytes32(update.update_hash),
            num_samples=update.num_samples,
            received_at=int(update.received_at),
        )
        return signer.receipt(ack, duplicate=duplicate)


@dataclass(frozen=True)
class AdmittedUpload:
    """An upload whose headers passed every check: the body it may now send is read next."""

    upload: AuthenticatedUpload
    round: StoredRound
    started: float  # perf_counter when the request was first looked at
    existing: StoredUpdate | None = None  # set for a re-upload of accepted bytes

    @property
    def organisation(self) -> str:
        return self.upload.signer
