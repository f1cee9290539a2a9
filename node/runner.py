"""An organisation's round loop: check the task spec, fetch and verify the global model, train,
commit on-chain, upload; report each settled round."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedledger import wire
from fedledger.errors import (
    ChainError,
    ContractRevert,
    CoordinatorRejected,
    CoordinatorUnavailable,
    ErrorCode,
    ModelVerificationError,
    TaskError,
)
from fedledger.failpoints import NODE_AFTER_COMMIT, failpoint
from fedledger.incentive.commitment import decode_update, encode_tensors, keccak, specs_of
from fedledger.incentive.compression import Codec, FeedbackFile
from fedledger.incentive.ledger import LedgerClient, RoundRecord
from fedledger.incentive.onchain import TOKEN_UNIT, RoundState, flag_names, hex32
from fedledger.incentive.signing import UploadAuthorization, sign_upload
from fedledger.node.claims import Claim, NotClaimed, claim_round, rounds_to_claim
from fedledger.node.client import CoordinatorClient
from fedledger.receipts import ReceiptBox, check_acknowledges, verify_receipt
from fedledger.tasks import Dataset, NodeTask, diff_specs, parse_spec
from fedledger.tasks.privacy import PrivacyBudgetSpent, PrivacyLedger

log = logging.getLogger("fedledger.node")

COMMIT_WAIT_S = 10.0
"""How long one long poll for the end of the commit phase waits before the node asks the chain
itself (the coordinator answers as soon as it has seen the phase end). Each poll prompts the
coordinator to read the chain once: 100 nodes waiting cost it 10 reads a second."""


@dataclass(frozen=True)
class RoundOutcome:
    """What the node did in one round."""

    round_id: int
    update_hash: str
    num_samples: int
    train_loss: float
    duplicate: bool
    local_metrics: dict[str, float]  # the trained local model's metrics on the node's own data
    epsilon: float | None = None  # DP-SGD: epsilon spent over every round so far (spec's delta)
    receipt: wire.UploadReceipt | None = None  # the coordinator's, checked (signature, fields)


@dataclass(frozen=True)
class Settled:
    """A round the node took part in, once finalized: what the consortium's model reached and
    what the node was paid (read from the ledger)."""

    round_id: int
    validation: dict[str, float]  # the new global model's validation metrics (coordinator's)
    reward: int  # token units paid to this organisation (0 while a claim is outstanding)
    flags: int


def _log_uploaded(outcome: RoundOutcome, organisation: str) -> None:
    local = ", ".join(f"{k} {v:.4f}" for k, v in outcome.local_metrics.items())
    spent = "" if outcome.epsilon is None else f"; epsilon {outcome.epsilon:.3f} spent"
    signer = None if outcome.receipt is None else outcome.receipt.coordinator
    log.info(
        "round %d: uploaded %s (%d samples, train loss %.4f; local %s%s); receipt signed by %s",
        outcome.round_id,
        outcome.update_hash,
        outcome.num_samples,
        outcome.train_loss,
        local,
        spent,
        signer,
        extra={
            "organisation": organisation,
            "round_id": outcome.round_id,
            "update_hash": outcome.update_hash,
            "num_samples": outcome.num_samples,
            "train_loss": outcome.train_loss,
            "local_metrics": outcome.local_metrics,
            "epsilon": outcome.epsilon,
            "receipt_signed_by": signer,
        },
    )


def _log_settled(settled: Settled, organisation: str) -> None:
    shown = ", ".join(f"{k} {v:.4f}" for k, v in settled.validation.items()) or "not reported"
    flags = flag_names(settled.flags)
    log.info(
        "round %d settled: global model validation %s; reward %.4f FLR (%d units)%s",
        settled.round_id,
        shown,
        settled.reward / TOKEN_UNIT,
        settled.reward,
        f", flagged {', '.join(flags)}" if flags else "",
        extra={
            "organisation": organisation,
            "round_id": settled.round_id,
            "validation": settled.validation,
            "reward_units": str(settled.reward),
            "flags": flags,
        },
    )


class NodeRunner:
    """Takes part in every round until the coordinator says training is done."""

    def __init__(
        self,
        client: CoordinatorClient,
        ledger: LedgerClient,
        task: NodeTask,
        data: Dataset,
        *,
        seed: int = 0,
        privacy: PrivacyLedger | None = None,
        feedback: FeedbackFile | None = None,
        outbox: Path | None = None,
        receipts: ReceiptBox | None = None,
        on_settled: Callable[[Settled], None] | None = None,
        poll_interval_s: float = 0.2,
        long_poll_s: float = 5.0,
        commit_wait_s: float = COMMIT_WAIT_S,
        upload_ttl_s: int = 600,
        max_retry_s: float = 30.0,
        device: torch.device | None = None,
        on_round: Callable[[RoundOutcome], None] | None = None,
        auto_claim: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ledger.account is None:
            raise ValueError("the node's ledger client needs the organisation's key")
        self.client = client
        self.ledger = ledger
        self.account = ledger.account
        self.task = task
        self.data = data
        self.seed = seed
        self.privacy = privacy
        if task.spec.privacy is not None and privacy is None:
            raise ValueError("the task spec asks for DP-SGD: the node needs a privacy ledger")
        codec = Codec.of(task.spec.compression)
        # Compressed updates carry what compression held back into the next round (in memory
        # unless the caller keeps it in a file, which a node that may restart should).
        self.feedback = None if codec.scheme == "none" else feedback or FeedbackFile(codec)
        self.outbox = outbox
        self.receipts = receipts  # where each checked receipt is kept (None: not on disk)
        self.on_settled = on_settled
        self.poll_interval_s = poll_interval_s
        self.commit_wait_s = commit_wait_s
        self.long_poll_s = long_poll_s
        self.upload_ttl_s = upload_ttl_s
        self.max_retry_s = max_retry_s
        self.device = device
        self.on_round = on_round
        self.auto_claim = auto_claim
        self.clock = clock
        self._model = task.build_model(seed=0)
        self._specs = specs_of(self._model.state_dict())
        self._chain_id = ledger.chain_id()
        self._task_checked = False
        self.budget_spent: PrivacyBudgetSpent | None = None
        self.done_rounds: set[int] = set()
        # Rounds committed to whose settlement is not yet seen: those of this run, and at
        # start-up those the chain says are still unsettled (a restarted node claims them).
        self.unclaimed: set[int] = set()
        self._recovered = False
        self.claims: list[Claim] = []

    def run(self, *, stop: Callable[[], bool] = lambda: False) -> list[RoundOutcome]:
        """Loop over rounds until training is done (or ``stop()``); returns what was uploaded."""
        outcomes: list[RoundOutcome] = []
        if self._spent_already():
            return outcomes
        backoff_s = self.poll_interval_s
        seen: wire.CurrentRound | None = None
        while not stop():
            try:
                if not self._task_checked:
                    self.check_task()
                if not self._recovered:
                    self.recover_unclaimed()
                # A long poll: answered as soon as the round changes from the one last seen.
                current = self.client.current_round(after=seen, wait_s=self.long_poll_s)
                if seen is not None and (current.round_id, current.status) == (
                    seen.round_id,
                    seen.status,
                ):
                    time.sleep(self.poll_interval_s)  # a timeout, or a server without long polls
                seen = current
                if current.training == wire.TrainingStatus.DONE:
                    self.settle(before_round=None)
                    log.info(
                        "training done after round %d: took part in %d round(s)",
                        current.round_id,
                        len(outcomes),
                        extra={
                            "organisation": self.account.address,
                            "round_id": current.round_id,
                            "rounds_taken_part": len(outcomes),
                        },
                    )
                    return outcomes
                self.settle(before_round=current.round_id)
                if (
                    current.status == wire.RoundStatus.OPEN
                    and current.round_id not in self.done_rounds
                ):
                    try:
                        outcome = self.take_part(current)
                    except PrivacyBudgetSpent as exc:
                        log.warning("%s", exc)
                        self.budget_spent = exc
                        self.retire()
                        self.settle(before_round=None)
                        return outcomes
                    if outcome is not None:
                        outcomes.append(outcome)
                        _log_uploaded(outcome, self.account.address)
                        if self.on_round is not None:
                            self.on_round(outcome)
                backoff_s = self.poll_interval_s
            except (CoordinatorUnavailable, ChainError) as exc:
                seen = None
                log.warning("%s; retrying in %.1f s", exc, backoff_s)
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.max_retry_s)
        return outcomes

    def _spent_already(self) -> bool:
        """At start-up, before the coordinator is asked anything: a node whose next round would
        exceed its privacy budget says so and retires (if it has not yet) instead of waiting
        for a round it cannot train."""
        if self.privacy is None:
            return False
        training = self.task.spec.training
        try:
            self.privacy.check_next(
                len(self.data[1]), epochs=training.epochs, batch_size=training.batch_size
            )
        except PrivacyBudgetSpent as exc:
            log.warning("%s", exc)
            self.budget_spent = exc
            self.retire()
            return True
        return False

    def recover_unclaimed(self) -> None:
        """Take over from the chain the rounds this organisation committed to and is not
        settled in (finalized by root, or still open), so that a restarted node claims the
        rewards its previous run had not; with ``auto_claim`` off there is nothing to do."""
        if self.auto_claim:
            found = rounds_to_claim(self.ledger, self.account.address, include_open=True)
            if found:
                log.info("rounds %s: committed to, not settled yet; claimed once final", found)
            self.unclaimed.update(found)
        self._recovered = True

    def retire(self) -> None:
        """Tell the ledger this organisation trains no more (``retire``, with the epsilon it
        spent), so the coordinator stops waiting for it and reports it retired, not missing."""
        if self.ledger.retirement_of(self.account.address) is not None:
            return  # retired before a restart
        spent = None if self.privacy is None else self.privacy.spent().epsilon
        self.ledger.retire(spent)
        log.info("retired on-chain: this organisation takes part in no further round")

    def check_task(self) -> None:
        """Refuse to train unless this node's spec file and the coordinator's are the one the
        ledger records (``taskSpec()``); the error lists the fields that differ."""
        on_chain = self.ledger.task_spec()
        mine = self.task.spec
        served = parse_spec(self.client.task_spec(), source=None)
        if mine.hash != on_chain:
            against = (
                "; fields that differ from the coordinator's (which matches the ledger): "
                + "; ".join(diff_specs(mine, served))
                if served.hash == on_chain
                else ""
            )
            raise TaskError(
                ErrorCode.SPEC_MISMATCH,
                f"this node's task spec {mine.source or ''} hashes to {hex32(mine.hash)}, but "
                f"ledger {self.ledger.address} records {hex32(on_chain)}: train with the "
                f"consortium's spec file{against}",
                spec_hash=hex32(mine.hash),
                on_chain=hex32(on_chain),
            )
        if served.hash != on_chain:
            raise TaskError(
                ErrorCode.SPEC_MISMATCH,
                f"the coordinator at {self.client.base_url} serves a task spec hashing to "
                f"{hex32(served.hash)}, not the ledger's {hex32(on_chain)}; refusing to train "
                "for it. Fields in which it differs from yours: "
                + "; ".join(diff_specs(mine, served)),
                served=hex32(served.hash),
                on_chain=hex32(on_chain),
            )
        self._task_checked = True

    def fetch_global_model(
        self, current: wire.CurrentRound, record: RoundRecord | None = None
    ) -> dict[str, torch.Tensor]:
        """Download the round's global model and check its keccak against the ledger's
        ``record`` of the round (read here if not given)."""
        data = self.client.model(current.model_hash)
        if record is None:
            record = self.ledger.get_round(current.round_id)
        on_chain = record.model_hash
        served = keccak(data)
        if served != on_chain:
            raise ModelVerificationError(
                f"round {current.round_id}: the served model hashes to 0x{served.hex()}, "
                f"but the ledger records 0x{on_chain.hex()}; refusing to train on it"
            )
        return decode_update(data, self._specs)

    def take_part(self, current: wire.CurrentRound) -> RoundOutcome | None:
        """Train, commit and upload for ``current``; None if the round cannot be joined any more."""
        round_id = current.round_id
        if self.clock() > current.deadline:
            log.info("round %d: deadline passed before we could join", round_id)
            self.done_rounds.add(round_id)
            return None
        # The round's record (its model's hash) and whether this organisation has committed in
        # it already (a node restarted after its commitment), in one read.
        record, committed = self.ledger.round_and_commitment(round_id, self.account.address)
        params = self.fetch_global_model(current, record)
        # The seed depends on the round, so a restarted node reproduces its own update exactly.
        seed = self.seed * 1_000_003 + round_id
        if self.privacy is not None:  # before training: a round past the budget is not trained
            training = self.task.spec.training
            self.privacy.charge(
                round_id, len(self.data[1]), epochs=training.epochs, batch_size=training.batch_size
            )
            seed = self.privacy.noise_seed(round_id)  # DP noise nobody else can predict
        result = self.task.train(self._model, params, self.data, seed=seed, device=self.device)
        trained = {n: params[n] + result.delta[n] for n in params}
        local_metrics = self.task.evaluate(self._model, trained, self.data)
        # What leaves the node: the update, encoded as the spec says (its commitment too).
        sent = (
            result.delta if self.feedback is None else self.feedback.encode(round_id, result.delta)
        )
        body, digest = encode_tensors(sent)

        epsilon = None if self.privacy is None else self.privacy.spent().epsilon
        if committed is None:
            try:  # with DP, the epsilon spent so far goes on-chain beside the commitment
                self.ledger.commit_update(round_id, digest, result.num_samples, epsilon=epsilon)
            except ContractRevert as exc:
                log.warning("round %d: commit refused on-chain: %s", round_id, exc)
                self.done_rounds.add(round_id)
                return None
            failpoint(NODE_AFTER_COMMIT)
        elif committed.update_hash != digest:
            log.error(
                "round %d: already committed 0x%s on-chain, which differs from this update; "
                "skipping the round",
                round_id,
                committed.update_hash.hex(),
            )
            self.done_rounds.add(round_id)
            return None

        self._await_commits_closed(current)  # nothing leaves before every commitment is final
        auth = UploadAuthorization(
            organisation=self.account.address,
            round_id=round_id,
            update_hash=digest,
            num_samples=result.num_samples,
            nonce=UploadAuthorization.new_nonce(),
            expiry=int(self.clock()) + self.upload_ttl_s,
        )
        signature = sign_upload(
            self.account, auth, chain_id=self._chain_id, ledger=self.ledger.address
        )
        headers = wire.upload_headers(auth, signature)
        if self.outbox is not None:
            self._keep(round_id, body, headers)
        try:
            receipt = self._upload_with_retry(round_id, body, headers)
        except CoordinatorRejected as exc:
            log.warning("round %d: upload refused: %s", round_id, exc)
            self.done_rounds.add(round_id)
            return None
        self._accept_receipt(receipt, auth)
        self.done_rounds.add(round_id)
        self.unclaimed.add(round_id)
        return RoundOutcome(
            round_id=round_id,
            update_hash=receipt.update_hash,
            num_samples=receipt.num_samples,
            train_loss=result.loss,
            duplicate=receipt.duplicate,
            local_metrics=local_metrics,
            epsilon=epsilon,
            receipt=receipt,
        )

    def _accept_receipt(self, receipt: wire.UploadReceipt, auth: UploadAuthorization) -> None:
        """Refuse a receipt that does not prove this upload (``bad_receipt``: not signed by an
        account holding COORDINATOR_ROLE on this ledger and chain; ``receipt_mismatch``: signed
        over other fields than those uploaded), and keep a good one on disk: it is what shows,
        after any restart, that the coordinator acknowledged the upload."""
        verify_receipt(receipt, self.ledger, chain_id=self._chain_id)
        check_acknowledges(receipt, auth)
        if self.receipts is not None:
            self.receipts.keep(receipt)

    def _keep(self, round_id: int, body: bytes, headers: dict[str, str]) -> None:
        """Write what is about to leave the organisation to the outbox: the update's exact bytes
        and the signed headers, under ``round-NNNN/`` (for its data-protection officer)."""
        assert self.outbox is not None
        folder = self.outbox / f"round-{round_id:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "update.safetensors").write_bytes(body)
        sent = {"coordinator": self.client.base_url, "round_id": round_id, "headers": headers}
        (folder / "upload.json").write_text(json.dumps(sent, indent=2) + "\n")

    def _await_commits_closed(self, current: wire.CurrentRound) -> None:
        """Wait, before uploading, for the round's commit phase to end on-chain (every active
        organisation committed, or the deadline passed): the coordinator takes no update
        before, so that nobody can commit with what others uploaded.

        The coordinator says when it has seen the phase end (a long poll, which also prompts it
        to look: this node has just committed); the chain confirms it, so that a coordinator
        saying so early learns nothing. Without its word, the chain is polled."""
        round_id = current.round_id
        # However the clocks disagree, give up waiting soon after the deadline, by wall time:
        # the upload then gets the coordinator's reason.
        give_up = time.monotonic() + max(0.0, current.deadline - self.clock()) + 2.0
        seen = current
        while time.monotonic() < give_up and self.clock() <= current.deadline:
            if self.ledger.commits_closed(round_id):
                return  # at once when this node committed last, else on the coordinator's word
            if seen.commits_closed:
                break  # the coordinator says it is over, the chain not (yet): poll the chain
            try:
                seen = self.client.current_round(
                    after=seen, wait_s=self.commit_wait_s, commit_phase=True
                )
            except (CoordinatorUnavailable, CoordinatorRejected):
                break  # the chain alone decides
            if seen.round_id != round_id or seen.status is not wire.RoundStatus.OPEN:
                return  # the round moved on: the upload gets the coordinator's reason
        self._poll_commits_closed(round_id, give_up)

    def _poll_commits_closed(self, round_id: int, give_up: float) -> None:
        """Until the chain says the commit phase is over: read at once, then polled soon and
        less and less often, never past the deadline (or ``give_up``, by ``time.monotonic``)."""
        wait_s = 0.02
        while not self.ledger.commits_closed(round_id):
            # The deadline by our clock (commits_closed(now=) would read the record again).
            record = self.ledger.get_round(round_id)
            if (
                record.state is not RoundState.OPEN
                or self.clock() > record.deadline
                or time.monotonic() > give_up
            ):
                return  # closed without us, over by our clock, or never by it
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, self.poll_interval_s)

    def _upload_with_retry(
        self, round_id: int, body: bytes, headers: dict[str, str]
    ) -> wire.UploadReceipt:
        backoff_s = self.poll_interval_s
        deadline = self.clock() + self.upload_ttl_s
        while True:
            try:
                return self.client.upload(round_id, body, headers)
            except CoordinatorRejected as exc:
                # The coordinator's clock or chain view may trail ours by a moment.
                if exc.code != ErrorCode.COMMITMENTS_OPEN or self.clock() + backoff_s > deadline:
                    raise
                time.sleep(backoff_s)
            except CoordinatorUnavailable as exc:
                if self.clock() + backoff_s > deadline:
                    raise
                wait_s = exc.retry_after_s or backoff_s
                log.warning(
                    "round %d: upload failed (%s); retrying in %.1f s", round_id, exc, wait_s
                )
                time.sleep(wait_s)
                backoff_s = min(backoff_s * 2, self.max_retry_s)

    def settle(self, *, before_round: int | None) -> list[Claim]:
        """Claim this organisation's reward in every finalized round settled by claims, and
        report every finalized round it took part in (``on_settled``).

        Only rounds before ``before_round`` (all, if None) are looked at: a round still open
        has nothing to claim. The coordinator's ticket is checked against the on-chain root
        before any gas is spent; a bad ticket is logged and not sent.
        """
        made: list[Claim] = []
        for round_id in sorted(self.unclaimed):
            if before_round is not None and round_id >= before_round:
                break
            # The round and what it recorded for us, in one read (a direct settlement's reward
            # and flags are final with the round; a claim's are read again after it).
            record, reward, flags = self.ledger.round_and_settlement(round_id, self.account.address)
            if record.state != RoundState.FINALIZED:
                continue
            # From here each outcome is final; a chain or coordinator outage raises and the
            # round stays in ``unclaimed`` for the next try.
            claim = self._claim(record) if record.by_claims and self.auto_claim else None
            self.unclaimed.discard(round_id)
            if claim is not None:
                made.append(claim)
                self.claims.append(claim)
            if record.by_claims:
                reward, flags = self.ledger.settled_of(round_id, self.account.address)
            settled = self._settled(round_id, reward, flags)
            _log_settled(settled, self.account.address)
            if self.on_settled is not None:
                self.on_settled(settled)
        return made

    def _settled(self, round_id: int, reward: int, flags: int) -> Settled:
        try:
            validation = dict(self.client.round_result(round_id).validation_metrics)
        except CoordinatorRejected:
            validation = {}
        return Settled(round_id=round_id, validation=validation, reward=reward, flags=flags)

    def _claim(self, record: RoundRecord) -> Claim | None:
        """Claim in a round settled by root (``claims.claim_round``); a ticket that does not
        hold is logged and never sent."""
        result = claim_round(self.ledger, self.client, record)
        if isinstance(result, NotClaimed):
            if result.reason != "claimed":
                level = logging.ERROR if result.reason == "bad_ticket" else logging.WARNING
                log.log(level, "round %d: %s", result.round_id, result.detail)
            return None
        return result
