"""The round state machine: open on-chain, wait for uploads, close the books, settle, repeat.

Each ``step`` takes at most one transition. Every transition is recorded in the store after
the chain confirms it; the settler makes each chain write idempotent, so redoing a step after a
crash is safe.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from fedledger import wire
from fedledger.coordinator.books import Books, close_books
from fedledger.coordinator.books_process import BooksProcess
from fedledger.coordinator.config import CoordinatorSettings
from fedledger.coordinator.inputs import load_round_inputs
from fedledger.coordinator.metrics import CoordinatorMetrics
from fedledger.coordinator.results import failed_result, finalized_result, round_summary
from fedledger.coordinator.settlement import Settler
from fedledger.coordinator.store import Store, StoredRound
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.failpoints import CLOSE_AFTER_AGGREGATE, OPEN_AFTER_TX, failpoint
from fedledger.incentive.compression import Codec
from fedledger.incentive.ledger import LedgerClient, RetirementRecord, as_bytes32
from fedledger.incentive.onchain import flag_names, hex32

log = logging.getLogger("fedledger.coordinator")

RETIREMENT_POLL_S = 2.0
"""How often a round waiting for uploads rereads whether the missing organisations retired."""

COMMIT_POLL_S = 1.0
"""How often an open round rereads on-chain whether its commit phase is over, unprompted."""

COMMIT_CHECK_MIN_S = 0.02
"""The least time between two such reads when nodes prompt them (``commit_hint``): each node
waiting for the phase to end prompts one, so the last commitment is seen within a read."""

EXTEND_MARGIN_S = 5.0
"""How long before a round's commit deadline the ``extend`` policy decides (a tenth of the round
timeout when that is shorter): an extension must land on-chain before the deadline, after which
uploads may have been seen and the ledger refuses one."""


class ValuationProgress:
    """A valuation that takes a while, shown as it goes: once it has run ``show_after_s``, a
    progress bar on a terminal (the coordinator run by hand), else an INFO line every
    ``log_every_s`` (a service's log). A ``CoalitionUtility`` progress callback."""

    def __init__(
        self,
        round_id: int,
        *,
        show_after_s: float = 3.0,
        log_every_s: float = 10.0,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.round_id = round_id
        self.show_after_s = show_after_s
        self.log_every_s = log_every_s
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.clock = clock
        self.started = clock()
        self._logged = -math.inf
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        elapsed = now - self.started
        if elapsed < self.show_after_s:
            return
        if self.terminal:
            if self._bar is None:
                self._bar = Progress(
                    TextColumn(f"round {self.round_id}: valuing"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._bar.start()
                self._task = self._bar.add_task("coalitions", total=total)
            assert self._task is not None
            self._bar.update(self._task, completed=done, total=total)
        elif now - self._logged >= self.log_every_s:
            self._logged = now
            log.info(
                "round %d: valued %d of %d coalitions in %.0f s",
                self.round_id,
                done,
                total,
                elapsed,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@dataclass(frozen=True)
class Game:
    """What the books are closed against: the task's model and its validation set."""

    model: torch.nn.Module
    x_val: torch.Tensor
    y_val: torch.Tensor
    report: Callable[[Mapping[str, torch.Tensor]], dict[str, float]] | None = None
    """The task's ``score`` of a model on the validation set: the metrics a round reports
    beyond the game's (the spec's ``validation.report``); not part of the books."""
    codec: Codec = field(
        default_factory=Codec
    )  # how the task's updates are encoded (the spec's [compression])


class RoundMachine:
    """Advances the federation one transition at a time: open -> closing -> finalized/failed."""

    def __init__(
        self,
        settings: CoordinatorSettings,
        store: Store,
        ledger: LedgerClient,
        game: Game,
        *,
        clock: Callable[[], float],
        device: torch.device,
        lock: threading.RLock,
        metrics: CoordinatorMetrics | None = None,
        books_process: BooksProcess | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.settler = Settler(ledger)
        self.game = game
        self.clock = clock
        self.device = device
        self.lock = lock  # held while a round changes status, so no upload slips in between
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.books_process = books_process  # None: the books are closed in this process
        self._expected: dict[int, list[str]] = {}
        self._retired: dict[str, RetirementRecord] = {}  # lower-case address -> for good
        self._retired_read = -math.inf
        # Rounds whose commit phase is over (seen on-chain, or past the deadline): shared with
        # the upload verifier, which takes no upload before, and published to long polls.
        self.commits_closed: set[int] = set()
        self.commit_hint = False  # a node waits for the commit phase: read it soon
        self._commits_read = -math.inf

    def expected_organisations(self, round_id: int) -> list[str]:
        """The organisations registered when the round opened (read once per round)."""
        if round_id not in self._expected:
            self._expected[round_id] = self.ledger.organisations()
        return self._expected[round_id]

    def registered_at_open(self, round_id: int) -> frozenset[str]:
        """The organisations (lower case) registered when round ``round_id`` opened, as read
        then; empty for a round whose list this process has not read (nothing is read here)."""
        return frozenset(o.lower() for o in self._expected.get(round_id, ()))

    def retired(
        self, organisations: Iterable[str], *, fresh: bool = False
    ) -> dict[str, RetirementRecord]:
        """Which of ``organisations`` have retired (``retire`` on-chain: their privacy budget
        is spent), by lower-case address. Read from the chain at most every
        ``RETIREMENT_POLL_S`` while a round waits (unless ``fresh``); a retirement is for good,
        so one seen is never read again."""
        wanted = [o.lower() for o in organisations]
        now = time.monotonic()
        if fresh or now - self._retired_read >= RETIREMENT_POLL_S:
            self._retired_read = now
            for org in wanted:
                if org not in self._retired and (record := self.ledger.retirement_of(org)):
                    self._retired[org] = record
        return {o: self._retired[o] for o in wanted if o in self._retired}

    def commit_phase_over(self, round_id: int, deadline: int, now: float) -> bool:
        """Whether open round ``round_id``'s commit phase is over: known already, past the
        ``deadline`` by ``now``, or read on-chain (at most every ``COMMIT_POLL_S``, or
        ``COMMIT_CHECK_MIN_S`` after a ``commit_hint``)."""
        if round_id in self.commits_closed:
            return True
        since = time.monotonic() - self._commits_read
        if now > deadline or (
            since >= (COMMIT_CHECK_MIN_S if self.commit_hint else COMMIT_POLL_S)
            and self._read_commits(round_id, now)
        ):
            self.commits_closed.add(round_id)
            return True
        return False

    def _read_commits(self, round_id: int, now: float) -> bool:
        self.commit_hint = False
        self._commits_read = time.monotonic()
        return self.ledger.commits_closed(round_id, now=now)

    def deadline(self) -> int:
        """round_timeout_s from now, by the later of our clock and the chain's: a chain whose
        blocks run ahead of the wall clock (the in-process EVM adds a second a block) must
        not see the deadline early and refuse commitments the round still waits for."""
        now = max(self.clock(), float(self.ledger.block_timestamp()))
        return int(now + self.settings.round_timeout_s)

    def open_round(self, round_id: int, model_hash: str) -> None:
        """Open ``round_id`` on-chain on ``model_hash`` (unless a crash left it open there
        already: then the chain's round must be on that model) and record it."""
        if self.ledger.round_count() < round_id:
            deadline = self.deadline()
            self.ledger.open_round(round_id, as_bytes32(model_hash), deadline)
            failpoint(OPEN_AFTER_TX)
        else:
            record = self.ledger.get_round(round_id)
            if hex32(record.model_hash) != model_hash:
                raise CoordinatorError(
                    ErrorCode.CHAIN_MISMATCH,
                    f"round {round_id} on-chain has model {hex32(record.model_hash)}, "
                    f"expected {model_hash}",
                )
            deadline = record.deadline
        self.store.add_round(round_id, model_hash, deadline)
        self._expected[round_id] = self.ledger.organisations()
        self.metrics.current_round.set(round_id)
        log.info("round %d open until %d on model %s", round_id, deadline, model_hash)

    def step(self) -> None:
        """Take the next transition of the latest round, if one is due."""
        current = self.store.latest_round()
        if (
            current is None
            or current.status != wire.RoundStatus.OPEN
            or current.round_id in self.commits_closed
        ):
            self.commit_hint = False  # nothing left to read of a commit phase
        if current is None:
            return
        if current.status == wire.RoundStatus.OPEN:
            uploads = self.store.updates_for(current.round_id)
            submitted = {u.organisation.lower() for u in uploads}
            expected = {o.lower() for o in self.expected_organisations(current.round_id)}
            waiting = expected - submitted
            all_in = bool(expected) and waiting <= self.retired(waiting).keys()
            now = self.clock()
            past = now > current.deadline + self.settings.upload_grace_s
            if not all_in and self.extend_if_short(current, now):
                return
            over = self.commit_phase_over(current.round_id, current.deadline, now)
            if all_in and not past and not over:
                return  # someone registered since the round opened may still commit
            if all_in or past:
                with self.lock:
                    self.store.set_round_status(current.round_id, wire.RoundStatus.CLOSING)
                self.close(current.round_id)
        elif current.status == wire.RoundStatus.CLOSING:
            self.close(current.round_id)
        elif current.round_id < self.settings.total_rounds:
            self.open_round(current.round_id + 1, current.new_model_hash or current.model_hash)

    def extend_if_short(self, current: StoredRound, now: float) -> bool:
        """Under the ``extend`` policy, give a round short of its quorum of commitments more
        time on-chain, deciding in the last ``EXTEND_MARGIN_S`` before the commit deadline
        (the ledger takes no extension after it)."""
        margin_s = min(EXTEND_MARGIN_S, self.settings.round_timeout_s / 10)
        if (
            self.settings.quorum_policy != "extend"
            or current.extensions >= self.settings.max_extensions
            or not current.deadline - margin_s <= now <= current.deadline
        ):
            return False
        record = self.ledger.get_round(current.round_id)
        if record.commit_count >= self.settings.quorum or self.ledger.commits_closed(
            current.round_id
        ):
            return False
        deadline = self.deadline()
        if record.deadline < deadline:
            self.ledger.extend_round(current.round_id, deadline)
            record = self.ledger.get_round(current.round_id)
        self.store.set_deadline(
            current.round_id, record.deadline, extensions=current.extensions + 1
        )
        log.warning(
            "round %d: %d of %d required commitments near the deadline; extended to %d",
            current.round_id,
            record.commit_count,
            self.settings.quorum,
            record.deadline,
        )
        return True

    def books(self, round_id: int) -> Books:
        """Close round ``round_id``'s books from the store (deterministic: redone after a crash),
        in the books process when there is one."""
        commit_order = self.ledger.commit_order(round_id)
        progress = ValuationProgress(round_id)
        try:
            if self.books_process is not None:
                return self.books_process.close_books(round_id, commit_order, progress)
            inputs = load_round_inputs(
                self.store,
                round_id,
                commit_order,
                self.game.model,
                self.game.x_val,
                self.game.y_val,
                self.game.codec,
            )
            return close_books(inputs, self.settings.pricing, device=self.device, progress=progress)
        finally:
            progress.close()

    def _ended(self, result: wire.RoundResult, committed: int, started: float) -> None:
        """Report a round just recorded as ended: one INFO line and the metrics. Called once
        per round, right after its status is stored (a redone close never gets this far)."""
        summary = round_summary(result, committed=committed)
        log.info(summary.message(), extra=summary.fields())
        self.metrics.round_ended(summary)
        self.metrics.round_close_seconds.observe(time.perf_counter() - started)

    def fail(
        self,
        stored: StoredRound,
        expected: list[str],
        reason: str,
        retired: Mapping[str, RetirementRecord],
        books: Books | None = None,
        *,
        committed: int,
        started: float,
    ) -> None:
        """Close a round without a new model: unchanged on-chain, nothing paid, ``reason`` said
        (with the ``books`` that refused it, when it was priced); ``committed`` and ``started``
        (``time.perf_counter()``) are for the report."""
        round_id = stored.round_id
        tx = self.settler.settle(round_id, stored.model_hash, None)
        result = failed_result(
            stored,
            expected,
            reason,
            tx,
            retired=retired,
            uploads=self.store.updates_for(round_id),
            books=books,
            policy=self.settings.pricing,
        )
        self.store.set_round_status(
            round_id,
            wire.RoundStatus.FAILED,
            new_model_hash=stored.model_hash,
            result=result.model_dump(mode="json"),
        )
        log.warning("round %d failed: %s", round_id, reason)
        self._ended(result, committed, started)

    def close(self, round_id: int) -> None:
        """Close, settle and record a round; safe to redo after a crash."""
        started = time.perf_counter()
        stored = self.store.get_round(round_id)
        assert stored is not None
        committed = self.ledger.get_round(round_id).commit_count
        uploads = self.store.updates_for(round_id)
        expected = self.expected_organisations(round_id)
        uploaded = {u.organisation.lower() for u in uploads}
        retired = self.retired([o for o in expected if o.lower() not in uploaded], fresh=True)
        if len(uploads) < self.settings.quorum:
            everyone = bool(expected) and len(retired) == len(expected)
            reason = (
                "every organisation has retired (privacy budgets spent): nothing to aggregate"
                if everyone
                else f"quorum not met: {len(uploads)} of {self.settings.quorum} required "
                "uploads by the deadline; the model is unchanged and nothing is paid"
            )
            self.fail(stored, expected, reason, retired, committed=committed, started=started)
            return
        valuing = time.perf_counter()
        books = self.books(round_id)
        self.metrics.round_valuation_seconds.observe(time.perf_counter() - valuing)
        minimum = self.settings.pricing.min_aggregated
        # None aggregated reveals nothing (the model stays as it was, the flags are recorded).
        if 0 < len(books.aggregated) < minimum:
            reason = (
                f"only {len(books.aggregated)} update(s) passed the screens, fewer than the "
                f"consortium's minimum of {minimum} (min_aggregated): a model made of them would "
                "let the other members recover an organisation's update, so none is published; "
                "the model is unchanged and nothing is paid"
            )
            self.fail(
                stored, expected, reason, retired, books, committed=committed, started=started
            )
            return
        self.store.put_blob(books.new_hash, books.new_bytes)
        failpoint(CLOSE_AFTER_AGGREGATE)
        tx = self.settler.settle(round_id, stored.model_hash, books)
        for i, flags in enumerate(books.flags):
            if flags:
                log.warning(
                    "round %d: flagged %s (%s): %s",
                    round_id,
                    books.organisations[i],
                    ", ".join(flag_names(flags)),
                    books.notes.get(i, ""),
                )
        metrics = self.game.report(books.params) if self.game.report is not None else {}
        read = self.ledger.epsilons_of(round_id, [u.organisation for u in uploads])
        epsilons = {u.organisation.lower(): e for u, e in zip(uploads, read, strict=True)}
        result = finalized_result(
            stored,
            books,
            expected,
            self.settings.pricing,
            tx,
            metrics=metrics,
            epsilons=epsilons,
            retired=retired,
        )
        self.store.set_round_status(
            round_id,
            wire.RoundStatus.FINALIZED,
            new_model_hash=books.new_hash,
            result=result.model_dump(mode="json"),
        )
        self._ended(result, committed, started)
