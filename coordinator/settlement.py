"""Settlement on the ledger and reconciliation of the store with it.

Every write here is idempotent against the chain: the settler first reads what the ledger
already holds, so a coordinator killed between a transaction and its record in the store
resumes without paying twice or opening a round twice.
"""

from __future__ import annotations

import logging

from fedledger import wire
from fedledger.coordinator.books import Books
from fedledger.coordinator.store import Store
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.failpoints import CLOSE_AFTER_FINALIZE_TX, failpoint
from fedledger.incentive.ledger import LedgerClient, as_bytes32
from fedledger.incentive.onchain import NO_VALUATION, RoundState, hex32

log = logging.getLogger("fedledger.coordinator")


class Settler:
    """Sends a round's settlement, once, and lines the store up with the chain at start-up."""

    def __init__(self, ledger: LedgerClient) -> None:
        self.ledger = ledger

    def settle(self, round_id: int, model_hash: str, books: Books | None) -> str | None:
        """Finalize ``round_id`` on-chain with ``books`` (None: a failed round, nothing paid).

        Returns the transaction hash, or None when the chain already had the round finalized
        (a crash after sending): then nothing is sent.
        """
        ledger = self.ledger
        if ledger.get_round(round_id).state == RoundState.FINALIZED:
            log.info("round %d already finalized on-chain; recording it", round_id)
            return None
        if books is None:
            receipt = ledger.finalize_round(
                round_id, as_bytes32(model_hash), [], [], [], valuation=NO_VALUATION
            )
        elif books.tree is not None:
            receipt = ledger.finalize_round_with_root(
                round_id,
                as_bytes32(books.new_hash),
                books.tree.root,
                books.tree.total_reward,
                len(books.organisations),
                flagged=books.flagged,
                valuation=books.valuation,
            )
        else:
            receipt = ledger.finalize_round(
                round_id,
                as_bytes32(books.new_hash),
                books.organisations,
                books.scores,
                books.rewards,
                flags=books.flags,
                valuation=books.valuation,
            )
        failpoint(CLOSE_AFTER_FINALIZE_TX)
        return hex32(bytes(receipt["transactionHash"]))

    def check_data_dir(self, store: Store) -> None:
        """The data directory belongs to this ledger (binding an empty one to it)."""
        bound = store.get_meta("ledger")
        if bound is None:
            store.set_meta("ledger", self.ledger.address)
        elif bound.lower() != self.ledger.address.lower():
            raise CoordinatorError(
                ErrorCode.WRONG_DATA_DIR,
                f"data directory {store.data_dir} belongs to ledger {bound}, "
                f"not {self.ledger.address}; use another --data-dir",
            )

    def check_rounds_agree(self, store: Store, latest: int, chain_rounds: int) -> None:
        """Refuse a data directory whose rounds are not this ledger's (``wrong_data_dir``),
        naming the first difference: a round the ledger never opened, another model, or a
        settled round whose new model the ledger does not record. What a crash can leave
        behind (a round opened or settled on-chain but not yet recorded) is no difference."""
        ledger = self.ledger.address
        if chain_rounds < latest:
            raise CoordinatorError(
                ErrorCode.WRONG_DATA_DIR,
                f"{store.data_dir} has round {chain_rounds + 1} but ledger {ledger} opened only "
                f"{chain_rounds} round(s): the data directory belongs to another chain or "
                "ledger; start with an empty --data-dir or the one that ran this ledger",
            )
        for round_id in range(1, latest + 1):
            stored = store.get_round(round_id)
            record = self.ledger.get_round(round_id)
            if stored is None:
                continue
            difference = None
            if hex32(record.model_hash) != stored.model_hash:
                difference = (
                    f"the data directory trained model {stored.model_hash} but the ledger "
                    f"records {hex32(record.model_hash)}"
                )
            elif (
                stored.status == wire.RoundStatus.FINALIZED
                and stored.new_model_hash is not None
                and hex32(record.new_model_hash) != stored.new_model_hash
            ):
                difference = (
                    f"the data directory settled it with model {stored.new_model_hash} but the "
                    f"ledger records {hex32(record.new_model_hash)}"
                )
            if difference is not None:
                raise CoordinatorError(
                    ErrorCode.WRONG_DATA_DIR,
                    f"round {round_id} of {store.data_dir} disagrees with ledger {ledger}: "
                    f"{difference}; start with an empty --data-dir or the one that ran this "
                    "ledger",
                )

    def reconcile(self, store: Store, initial_model_hash: str) -> bool:
        """Record in ``store`` what the chain did that the store missed (a crash in between).

        Returns whether the store holds any round afterwards; if not, the caller opens round 1
        on ``initial_model_hash``.
        """
        removed = store.collect_garbage()
        if removed:
            log.info("removed %d unreferenced file(s) left by an interrupted write", removed)
        latest = store.latest_round()
        chain_rounds = self.ledger.round_count()
        if latest is None:
            # Round 1 may already be open on-chain if we crashed right after opening it.
            if chain_rounds > 1 or (
                chain_rounds == 1
                and hex32(self.ledger.get_round(1).model_hash) != initial_model_hash
            ):
                raise CoordinatorError(
                    ErrorCode.WRONG_DATA_DIR,
                    f"the ledger already has {chain_rounds} round(s) but {store.data_dir} has "
                    "no state; start the coordinator on the data directory that ran them",
                )
            return False
        self.check_rounds_agree(store, latest.round_id, chain_rounds)
        if chain_rounds > latest.round_id:  # opened on-chain, crashed before recording it
            record = self.ledger.get_round(chain_rounds)
            store.add_round(chain_rounds, hex32(record.model_hash), record.deadline)
        elif latest.status == wire.RoundStatus.OPEN:  # an extension may be on-chain only
            record = self.ledger.get_round(latest.round_id)
            if record.deadline != latest.deadline:
                store.set_deadline(
                    latest.round_id, record.deadline, extensions=latest.extensions + 1
                )
        return True
