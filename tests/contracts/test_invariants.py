"""A stateful property test of FedLedger + RewardToken against a Python model, on the in-process EVM.

Hypothesis drives random sequences of ledger calls (open, commit, advance time, finalize directly or
by a Merkle root, claim, register, mint) on one fresh chain per example. A plain-Python model
predicts every call's outcome: either the call succeeds, emits exactly the predicted events and
moves the ledger to the model's next state, or it reverts with the custom error (and arguments) the
model names and mines nothing. After every step the chain is compared with the model and with
invariants derived from the chain's own history.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_utils.abi import event_abi_to_log_topic
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from web3 import Web3
from web3.types import TxReceipt

from fedledger.devnet.deploy import deploy_devnet
from fedledger.devnet.embedded import embedded_web3
from fedledger.errors import ContractRevert
from fedledger.incentive.chain import devnet_account, send_transaction
from fedledger.incentive.ledger import (
    NO_VALUATION,
    CommitmentRecord,
    LedgerClient,
    RoundRecord,
    ValuationRecord,
)
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree, verify
from fedledger.incentive.onchain import RoundState

ZERO = b"\x00" * 32
ZERO_ADDRESS = "0x" + "00" * 20
DEFAULT_ADMIN_ROLE = ZERO
COORDINATOR_ROLE = bytes(Web3.keccak(text="COORDINATOR_ROLE"))
ORGANISATION_ROLE = bytes(Web3.keccak(text="ORGANISATION_ROLE"))
INT256_MIN = -(2**255)
INT256_MAX = 2**255 - 1
INT96_MIN, INT96_MAX = -(2**95), 2**95 - 1  # a stored score
REWARD_MAX = 2**88 - 1  # a stored reward (one organisation, one round)
TOTAL_MAX = 2**128 - 1  # a round's stored total
SAMPLES_MAX = 2**40 - 1  # a stored sample count
UINT256_MAX = 2**256 - 1
UINT64_MAX = 2**64 - 1
# Chain time starts here (ahead of the wall clock) so that every block is its parent + 1 s and the
# examples replay exactly: draws never depend on when a test runs.
START_TIME = 4_000_000_000
PANIC_SELECTOR = "NH{q"  # 0x4e487b71, how the raw Panic(uint256) revert bytes print

ADMIN, COORDINATOR = 0, 1
INITIAL_ORGS = (2, 3, 4)  # registered by deploy_devnet
NUM_ACCOUNTS = 7  # 5 and 6: funded, unregistered until a register step picks them
ACCOUNTS: tuple[LocalAccount, ...] = tuple(devnet_account(i) for i in range(NUM_ACCOUNTS))
ADDRESSES: tuple[str, ...] = tuple(a.address for a in ACCOUNTS)
WATCHED: tuple[str, ...] = (*ADDRESSES, ZERO_ADDRESS)  # every address whose records are checked

# ------------------------------------------------------------------ strategies

account_index = st.integers(0, NUM_ACCOUNTS - 1)
nonzero_hash = st.binary(min_size=32, max_size=32).map(lambda b: b if any(b) else b"\x01" * 32)
some_hash = st.one_of(nonzero_hash, nonzero_hash, nonzero_hash, st.just(ZERO))
samples = st.one_of(
    st.just(0), st.integers(1, 10**6), st.integers(1, 10**6), st.just(SAMPLES_MAX),
    st.integers(SAMPLES_MAX + 1, UINT256_MAX),
)  # fmt: skip
valid_scores = st.integers(INT96_MIN, INT96_MAX)
scores = st.one_of(valid_scores, valid_scores, valid_scores, st.integers(INT256_MIN, INT256_MAX))
rewards = st.one_of(st.just(0), st.integers(1, 10**24), st.just(REWARD_MAX))
any_uint256 = st.integers(0, UINT256_MAX)
well_formed = st.sampled_from([True, True, False])  # two calls in three follow the protocol
FLAWS = ("orgs", "orgs", "overflow", "lengths", "hash", "round", "caller", "chaos")
huge_rewards = st.one_of(st.integers(REWARD_MAX + 1, TOTAL_MAX), st.integers(2**255, UINT256_MAX))
leaf_flags = st.one_of(st.just(0), st.just(0), st.integers(1, 255))
flag_bits = st.one_of(leaf_flags, any_uint256)
valuations = st.one_of(
    st.just(NO_VALUATION),
    st.builds(
        ValuationRecord,
        method=st.text(string.ascii_letters + string.digits + ":-_", min_size=1, max_size=32),
        seed=st.one_of(st.just(0), any_uint256),
        validation_hash=some_hash,
    ),
)
# How a settlement by root goes wrong: the flagged list (duplicates, silent organisations, outsiders,
# zero flags, flags other than the leaves'), its lengths, the announced total (less than the leaves
# add up to: the last claims fail) and count, a zero hash or root, the round, the caller, leaves of
# another round or a root no tree has, rewards near 2**256, or all at once.
ROOT_FLAWS = (
    *("flagged", "flagged", "flagged", "total", "total", "total", "lengths", "hash"),
    *("round", "caller", "stale", "overflow", "chaos"),
)
# How a claim goes wrong: a leaf with a changed field, a broken proof, another organisation's leaf
# and proof, any account replaying a leaf, or a round that was not settled by root.
CLAIMS = ("own", "own", "own", "tampered", "proof", "other", "caller", "round")


# ------------------------------------------------------------------ model


@dataclass
class ModelRound:
    model_hash: bytes
    deadline: int
    state: RoundState = RoundState.OPEN
    new_model_hash: bytes = ZERO
    commits: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    # org -> (score, reward): paid by the direct settlement, or claimed under the root
    settlements: dict[str, tuple[int, int]] = field(default_factory=dict)
    # org -> flagsOf: a direct settlement's (all zero: the client sends no flags), or those the
    # root's flagged list announced, then (once the organisation claims) its leaf's
    flags: dict[str, int] = field(default_factory=dict)
    total_reward: int = 0  # announced (by root) or paid (directly)
    claimed_reward: int = 0
    rewards_root: bytes = ZERO
    # The tree the coordinator built when it settled by root (its root is usually rewards_root;
    # for a "stale" settlement it is not): claims draw their leaves and proofs from it.
    tree: SettlementTree | None = None
    valuation: ValuationRecord | None = None
    finalized_by: str | None = None


@dataclass
class Model:
    registered: list[str]  # in registration (enumeration) order
    rounds: dict[int, ModelRound] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)

    @property
    def round_count(self) -> int:
        return len(self.rounds)

    @property
    def supply(self) -> int:
        return sum(self.balances.values())

    def commit_phase_open(self, round_id: int, now: int) -> Revert | None:
        """CommitPhaseOpen if round ``round_id`` (open) still takes commitments at ``now``: before
        its deadline with fewer commitments than active (here: registered) organisations."""
        rnd = self.rounds[round_id]
        active = len(self.registered)
        if now <= rnd.deadline and len(rnd.commits) < active:
            return Revert("CommitPhaseOpen", (round_id, rnd.deadline, len(rnd.commits), active))
        return None

    def state_of(self, round_id: int) -> RoundState:
        rnd = self.rounds.get(round_id)
        return RoundState.NONE if rnd is None else rnd.state

    def record(self, round_id: int) -> RoundRecord:
        rnd = self.rounds.get(round_id)
        if rnd is None:
            return RoundRecord(round_id, ZERO, ZERO, 0, RoundState.NONE, 0, 0)
        return RoundRecord(
            round_id,
            rnd.model_hash,
            rnd.new_model_hash,
            rnd.deadline,
            rnd.state,
            len(rnd.commits),
            rnd.total_reward,
            rewards_root=rnd.rewards_root,
            claimed_reward=rnd.claimed_reward,
        )


@dataclass(frozen=True)
class Revert:
    error: str  # "" for a Panic (not a custom error: the client leaves it unnamed)
    args: tuple[object, ...] = ()


@dataclass(frozen=True)
class Success:
    events: list[tuple[str, str, dict[str, Any]]]  # (emitting address, event name, arguments)


Outcome = Revert | Success


def _normalise(value: object) -> object:
    """Revert arguments whatever their spelling: addresses lower-case, bytes as 0x-hex, enums as int."""
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str) and value.startswith("0x"):
        return value.lower()
    if isinstance(value, RoundState):
        return int(value)
    return value


def unauthorized(index: int, role: bytes) -> Revert:
    return Revert("AccessControlUnauthorizedAccount", (ADDRESSES[index], role))


def out_of_range(name: str, value: int, most: int) -> Revert:
    """ValueOutOfRange: the field's name is ASCII, left-aligned in a bytes32."""
    return Revert("ValueOutOfRange", (name.encode().ljust(32, b"\0"), value, most))


def settlement_revert(round_id: int, org: str, score: int, reward: int) -> Revert | None:
    """Why storing (score, reward) for ``org`` reverts, if it does (the ledger's stored ranges)."""
    if not INT96_MIN <= score <= INT96_MAX:
        return Revert("ScoreOutOfRange", (org, score))
    if reward > REWARD_MAX:
        return out_of_range("reward", reward, REWARD_MAX)
    return None


# ------------------------------------------------------------------ the machine


class LedgerMachine(RuleBasedStateMachine):
    """One fresh chain + ledger per example; the model is the specification."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = embedded_web3(num_accounts=NUM_ACCOUNTS)
        # No budget limit here: the model predicts settlements; the budget has its own tests.
        deployment = deploy_devnet(
            self.w3, num_organisations=len(INITIAL_ORGS), round_budget=2**256 - 1
        )
        self.tester: Any = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
        self.tester.time_travel(START_TIME)
        self.ledger = LedgerClient(self.w3, deployment.ledger)
        self.token_address = self.ledger.token_address
        self.clients = tuple(self.ledger.with_account(a) for a in ACCOUNTS)
        self.model = Model(registered=[ADDRESSES[i] for i in INITIAL_ORGS])
        self.events = self._event_table()
        # What the last full check saw, so unchanged chains are not re-read.
        self.checked_head: bytes | None = None
        self.dirty_rounds: set[int] = set()
        # Chain-derived history, built from the logs alone (independent of the model).
        self.scanned_block = int(self.w3.eth.block_number)
        self.log_deadlines: dict[int, int] = {}
        self.log_commits: dict[tuple[int, str], int] = {}  # (round, org) -> block timestamp
        self.log_settled: dict[tuple[int, str], int] = {}  # (round, org) -> reward
        self.log_finalized: dict[int, str] = {}  # round -> sender
        self.log_totals: dict[int, int] = {}  # round -> RoundFinalized's totalReward
        self.log_roots: dict[int, bytes] = {}  # round -> RewardsRootPosted's root
        self.log_scores: dict[tuple[int, str], int] = {}  # (round, org) -> recorded score
        self.log_claimed: dict[int, int] = {}  # round -> sum of its RewardClaimed rewards
        self.log_minted = 0
        # Every tree whose root a settlement by root posted, by root: the only leaves claims may pay.
        self.trees: dict[bytes, SettlementTree] = {}

    # ----------------------------------------------------------- helpers

    def _event_table(self) -> dict[tuple[str, bytes], tuple[Any, str]]:
        table: dict[tuple[str, bytes], tuple[Any, str]] = {}
        for contract in (self.ledger.contract, self.ledger.token):
            for entry in contract.abi:
                if entry.get("type") == "event":
                    topic = bytes(event_abi_to_log_topic(entry))  # type: ignore[arg-type]
                    table[(contract.address, topic)] = (contract, entry["name"])
        return table

    def _decode(self, log: Any) -> tuple[str, str, dict[str, Any]]:
        contract, name = self.events[(log["address"], bytes(log["topics"][0]))]
        return log["address"], name, dict(contract.events[name]().process_log(log)["args"])

    def _pending_time(self) -> int:
        return int(self.tester.get_block_by_number("pending")["timestamp"])

    def _latest(self) -> Any:
        return self.w3.eth.get_block("latest")

    def _emits(self, name: str, args: dict[str, Any]) -> Success:
        """Success whose only log is the ledger's ``name`` event with ``args``."""
        return Success([(self.ledger.address, name, args)])

    def _expect(self, caller: int, send: Callable[[], TxReceipt], outcome: Outcome) -> None:
        """Run ``send`` (a transaction from ``caller``) and check it does exactly what ``outcome`` says."""
        head = self._latest()
        if isinstance(outcome, Revert):
            with pytest.raises(ContractRevert) as info:
                send()
            revert = info.value
            assert revert.error == outcome.error, (revert, outcome)
            if outcome.error == "":
                assert PANIC_SELECTOR in revert.raw, revert.raw
            got = [_normalise(a) for a in revert.error_args]
            assert got == [_normalise(a) for a in outcome.args], (revert, outcome)
            # Nothing was mined, so no state (ledger, token or balances) can have changed.
            assert self._latest()["hash"] == head["hash"]
            return
        receipt = send()
        assert receipt["status"] == 1
        assert receipt["blockNumber"] == head["number"] + 1
        assert receipt["from"] == ADDRESSES[caller]
        assert [self._decode(log) for log in receipt["logs"]] == outcome.events

    def _round_id(self, data: st.DataObject, label: str, *, opening: bool = False) -> int:
        count = self.model.round_count
        usual = st.just(count + 1 if opening else count)
        odd = st.sampled_from(sorted({0, max(count - 1, 0), count, count + 1, count + 2}))
        return data.draw(st.one_of(usual, usual, usual, odd, any_uint256), label=label)

    # ----------------------------------------------------------- the protocol

    @initialize(data=st.data())
    def start(self, data: st.DataObject) -> None:
        """Most examples start with round 1 open and some organisations committed; others with
        a ledger that has no round yet."""
        if data.draw(st.sampled_from([True, True, True, False]), label="start_with_round"):
            self._open_next_round(data)
            self._commit_as_organisations(data)

    @rule(data=st.data())
    def protocol_step(self, data: st.DataObject) -> None:
        """The protocol moving on (whichever other rules an example runs): the coordinator opens
        the next round; or organisations commit, time passes, or the coordinator settles
        (directly or by root); and organisations claim what a posted root owes them."""
        unclaimed = bool(self._unclaimed())
        if self.model.state_of(self.model.round_count) is not RoundState.OPEN:
            if unclaimed and data.draw(well_formed, label="claim_first"):
                self._claim_own(data)
            else:
                self._open_next_round(data)
            return
        rnd = self.model.rounds[self.model.round_count]
        late = self._pending_time() > rnd.deadline
        actions = ["finalize", "finalize", "commit"] if late else ["commit", "advance", "finalize"]
        action = data.draw(st.sampled_from(actions + ["claim"] * unclaimed), label="action")
        if action == "claim":
            self._claim_own(data)
        elif action == "commit":
            self._commit_as_organisations(data)
        elif action == "advance":
            self._advance_time(data)
        elif data.draw(st.booleans(), label="by_root"):
            self._settle_by_root(data)
        else:
            self._finalize_committers(data, caller=COORDINATOR)

    # ----------------------------------------------------------- rules: admin

    @rule(data=st.data())
    def register_organisation(self, data: st.DataObject) -> None:
        caller = data.draw(st.one_of(st.just(ADMIN), account_index), label="caller")
        target = data.draw(st.sampled_from(WATCHED), label="target")
        outcome: Outcome
        if caller != ADMIN:
            outcome = unauthorized(caller, DEFAULT_ADMIN_ROLE)
        elif target == ZERO_ADDRESS:
            outcome = Revert("ZeroAddress")
        elif target == ADDRESSES[COORDINATOR]:
            outcome = Revert("CoordinatorCannotBeOrganisation", (target,))
        elif target in self.model.registered:
            outcome = Revert("OrganisationAlreadyRegistered", (target,))
        else:
            ledger = self.ledger.address
            outcome = Success(
                [
                    (
                        ledger,
                        "RoleGranted",
                        {"role": ORGANISATION_ROLE, "account": target, "sender": ADDRESSES[ADMIN]},
                    ),
                    (ledger, "OrganisationRegistered", {"org": target}),
                ]
            )
        self._expect(caller, lambda: self.clients[caller].register_organisation(target), outcome)
        if isinstance(outcome, Success):
            self.model.registered.append(target)
            self.checked_head = None

    @rule(data=st.data())
    def mint_directly(self, data: st.DataObject) -> None:
        """Nobody but the ledger (no externally owned account) may mint the reward token."""
        caller = data.draw(account_index, label="caller")
        to = data.draw(st.sampled_from(WATCHED), label="to")
        amount = data.draw(st.one_of(st.integers(0, 10**30), any_uint256), label="amount")
        mint = self.ledger.token.functions.mint(Web3.to_checksum_address(to), amount)
        self._expect(
            caller,
            lambda: send_transaction(self.w3, ACCOUNTS[caller], mint, self.ledger.selectors),
            Revert("OwnableUnauthorizedAccount", (ADDRESSES[caller],)),
        )

    # ----------------------------------------------------------- rules: rounds

    @rule(data=st.data())
    def open_round(self, data: st.DataObject) -> None:
        """Mostly the coordinator opening the next round (which reverts while the previous one is
        open); otherwise any caller, any round id, a zero hash, a past or far deadline."""
        if data.draw(well_formed, label="well_formed"):
            self._open_next_round(data)
            return
        caller = data.draw(st.one_of(st.just(COORDINATOR), account_index), label="caller")
        round_id = self._round_id(data, "round_id", opening=True)
        model_hash = data.draw(some_hash, label="model_hash")
        duration = data.draw(
            st.one_of(st.integers(1, 5_000), st.integers(-300, 0), st.none()),
            label="deadline_minus_now",  # <= 0: in the past or exactly now; None: max uint64
        )
        self._open(caller, round_id, model_hash, duration)

    def _open_next_round(self, data: st.DataObject) -> None:
        duration = data.draw(st.integers(1, 5_000), label="deadline_minus_now")
        model_hash = data.draw(nonzero_hash, label="model_hash")
        self._open(COORDINATOR, self.model.round_count + 1, model_hash, duration)

    def _open(self, caller: int, round_id: int, model_hash: bytes, duration: int | None) -> None:
        now = self._pending_time()  # the timestamp of the block the call would land in
        deadline = UINT64_MAX if duration is None else now + duration
        last = self.model.round_count
        outcome: Outcome
        if caller != COORDINATOR:
            outcome = unauthorized(caller, COORDINATOR_ROLE)
        elif round_id != last + 1:
            outcome = Revert("RoundOutOfOrder", (last + 1, round_id))
        elif last != 0 and self.model.state_of(last) is RoundState.OPEN:
            outcome = Revert("PreviousRoundOpen", (last,))
        elif model_hash == ZERO:
            outcome = Revert("ZeroHash")
        elif deadline <= now:
            outcome = Revert("DeadlineInPast", (deadline, now))
        else:
            outcome = self._emits(
                "RoundOpened",
                {"roundId": round_id, "modelHash": model_hash, "deadline": deadline},
            )
        self._expect(
            caller, lambda: self.clients[caller].open_round(round_id, model_hash, deadline), outcome
        )
        if isinstance(outcome, Success):
            self.model.rounds[round_id] = ModelRound(model_hash=model_hash, deadline=deadline)
            self.checked_head = None

    @rule(data=st.data())
    def extend_round(self, data: st.DataObject) -> None:
        """Mostly the coordinator moving the open round's deadline later; otherwise any caller,
        any round id, an earlier or equal deadline, or one already past."""
        caller = data.draw(st.one_of(st.just(COORDINATOR), account_index), label="caller")
        round_id = self._round_id(data, "round_id")
        shift = data.draw(st.one_of(st.integers(1, 5_000), st.integers(-300, 0)), label="shift")
        now = self._pending_time()
        rnd = self.model.rounds.get(round_id)
        previous = 0 if rnd is None else rnd.deadline
        deadline = min(max(previous + shift, 0), UINT64_MAX)
        outcome: Outcome
        if caller != COORDINATOR:
            outcome = unauthorized(caller, COORDINATOR_ROLE)
        elif rnd is None or rnd.state is not RoundState.OPEN:
            outcome = Revert("RoundNotOpen", (round_id, self.model.state_of(round_id)))
        elif now > previous:  # uploads may have been seen: no more time to commit
            outcome = Revert("CommitmentDeadlinePassed", (round_id, previous, now))
        elif deadline <= previous:
            outcome = Revert("DeadlineNotLater", (previous, deadline))
        else:
            outcome = self._emits(
                "RoundExtended",
                {"roundId": round_id, "previousDeadline": previous, "deadline": deadline},
            )
        self._expect(caller, lambda: self.clients[caller].extend_round(round_id, deadline), outcome)
        if isinstance(outcome, Success):
            assert rnd is not None
            rnd.deadline = deadline
            self.checked_head = None

    @rule(data=st.data())
    def commit_update(self, data: st.DataObject) -> None:
        """Mostly registered organisations committing to the open round (some late, some twice);
        otherwise any account, any round id, a zero hash or zero samples."""
        open_now = self.model.state_of(self.model.round_count) is RoundState.OPEN
        if open_now and data.draw(well_formed, label="well_formed"):
            self._commit_as_organisations(data)
            return
        caller = data.draw(st.one_of(st.sampled_from(INITIAL_ORGS), account_index), label="caller")
        round_id = self._round_id(data, "round_id")
        update_hash = data.draw(some_hash, label="update_hash")
        num_samples = data.draw(samples, label="num_samples")
        self._commit(caller, round_id, update_hash, num_samples)

    def _commit_as_organisations(self, data: st.DataObject) -> None:
        registered = [ADDRESSES.index(a) for a in self.model.registered]
        callers = data.draw(
            st.lists(st.sampled_from(registered), min_size=1, max_size=4), label="callers"
        )
        for caller in callers:
            update_hash = data.draw(nonzero_hash, label="update_hash")
            num_samples = data.draw(st.integers(1, 10**6), label="num_samples")
            self._commit(caller, self.model.round_count, update_hash, num_samples)

    def _commit(self, caller: int, round_id: int, update_hash: bytes, num_samples: int) -> None:
        org = ADDRESSES[caller]
        now = self._pending_time()  # the timestamp of the block the commit would land in
        rnd = self.model.rounds.get(round_id)
        outcome: Outcome
        if org not in self.model.registered:
            outcome = Revert("OrganisationNotRegistered", (org,))
        elif rnd is None or rnd.state is not RoundState.OPEN:
            outcome = Revert("RoundNotOpen", (round_id, self.model.state_of(round_id)))
        elif now > rnd.deadline:
            outcome = Revert("CommitmentDeadlinePassed", (round_id, rnd.deadline, now))
        elif update_hash == ZERO:
            outcome = Revert("ZeroHash")
        elif num_samples == 0:
            outcome = Revert("ZeroSamples")
        elif num_samples > SAMPLES_MAX:
            outcome = out_of_range("numSamples", num_samples, SAMPLES_MAX)
        elif org in rnd.commits:
            outcome = Revert("AlreadyCommitted", (round_id, org, rnd.commits[org][0]))
        else:
            outcome = self._emits(
                "UpdateCommitted",
                {
                    "roundId": round_id,
                    "org": org,
                    "updateHash": update_hash,
                    "numSamples": num_samples,
                },
            )
        self._expect(
            caller,
            lambda: self.clients[caller].commit_update(round_id, update_hash, num_samples),
            outcome,
        )
        if isinstance(outcome, Success):
            assert rnd is not None
            rnd.commits[org] = (update_hash, num_samples)
            self.dirty_rounds.add(round_id)
            self.checked_head = None

    @precondition(lambda self: self.model.round_count > 0)
    @rule(data=st.data())
    def advance_time(self, data: st.DataObject) -> None:
        """Move chain time: to (or just past) the latest round's deadline, or by a random span."""
        self._advance_time(data)

    def _advance_time(self, data: st.DataObject) -> None:
        latest = self.model.rounds.get(self.model.round_count)
        now = self._pending_time()
        if latest is not None and latest.deadline < 2**40 and data.draw(st.booleans(), label="to"):
            target = latest.deadline + data.draw(st.integers(0, 3), label="past_deadline_by")
        else:
            target = now + data.draw(st.integers(1, 20_000), label="by")
        before = self._latest()
        if target > now:
            self.tester.time_travel(target)
            assert self._pending_time() == target
        else:
            self.tester.mine_blocks(1)
        after = self._latest()
        # Only empty blocks were mined: the state is the very same.
        assert after["stateRoot"] == before["stateRoot"]
        if self.checked_head == before["hash"]:
            self.checked_head = after["hash"]

    def _finalize_outcome(
        self,
        caller: int,
        round_id: int,
        new_hash: bytes,
        orgs: list[str],
        org_scores: list[int],
        org_rewards: list[int],
    ) -> Outcome:
        if caller != COORDINATOR:
            return unauthorized(caller, COORDINATOR_ROLE)
        rnd = self.model.rounds.get(round_id)
        if rnd is None or rnd.state is not RoundState.OPEN:
            return Revert("RoundNotOpen", (round_id, self.model.state_of(round_id)))
        if (still_open := self.model.commit_phase_open(round_id, self._pending_time())) is not None:
            return still_open
        if not len(orgs) == len(org_scores) == len(org_rewards):
            # The client sends one flag word per organisation, so flags never mismatch here.
            lengths = (len(orgs), len(org_scores), len(org_rewards), len(orgs))
            return Revert("LengthMismatch", lengths)
        if new_hash == ZERO:
            return Revert("ZeroHash")
        total = 0
        seen: set[str] = set()
        for org, score, reward in zip(orgs, org_scores, org_rewards, strict=True):
            if org not in rnd.commits:
                return Revert("NotCommitted", (round_id, org))
            if org in seen:
                return Revert("DuplicateSettlement", (round_id, org))
            if (unstorable := settlement_revert(round_id, org, score, reward)) is not None:
                return unstorable
            seen.add(org)
            total += reward  # at most five rewards below 2**88: never past the stored total
        if self.model.supply + total > UINT256_MAX:
            return Revert("")  # Panic(0x11): the token's total supply would overflow
        ledger, token = self.ledger.address, self.token_address
        return Success(
            [
                (
                    ledger,
                    "ContributionRecorded",
                    {"roundId": round_id, "org": o, "score": s, "reward": r},
                )
                for o, s, r in zip(orgs, org_scores, org_rewards, strict=True)
            ]
            + [
                (
                    ledger,
                    "RoundValued",
                    {
                        "roundId": round_id,
                        "method": NO_VALUATION.as_abi()[0],
                        "seed": 0,
                        "validationHash": ZERO,
                    },
                ),
                (
                    ledger,
                    "RoundFinalized",
                    {
                        "roundId": round_id,
                        "newModelHash": new_hash,
                        "totalReward": total,
                        "organisations": len(orgs),
                    },
                ),
            ]
            + [
                (token, "Transfer", {"from": ZERO_ADDRESS, "to": o, "value": r})
                for o, r in zip(orgs, org_rewards, strict=True)
                if r != 0
            ]
        )

    def _finalize(
        self,
        caller: int,
        round_id: int,
        new_hash: bytes,
        orgs: list[str],
        org_scores: list[int],
        org_rewards: list[int],
    ) -> None:
        outcome = self._finalize_outcome(caller, round_id, new_hash, orgs, org_scores, org_rewards)
        self._expect(
            caller,
            lambda: self.clients[caller].finalize_round(
                round_id, new_hash, orgs, org_scores, org_rewards
            ),
            outcome,
        )
        if isinstance(outcome, Success):
            rnd = self.model.rounds[round_id]
            assert caller == COORDINATOR
            rnd.state = RoundState.FINALIZED
            rnd.new_model_hash = new_hash
            rnd.finalized_by = ADDRESSES[caller]
            rnd.settlements = {
                o: (s, r) for o, s, r in zip(orgs, org_scores, org_rewards, strict=True)
            }
            rnd.total_reward = rnd.claimed_reward = sum(org_rewards)
            rnd.valuation = NO_VALUATION
            for org, reward in zip(orgs, org_rewards, strict=True):
                self.model.balances[org] = self.model.balances.get(org, 0) + reward
            self.dirty_rounds.add(round_id)
            self.checked_head = None

    @rule(data=st.data())
    def finalize_round(self, data: st.DataObject) -> None:
        """Mostly the usual settlement of the open round, some of its committers paid (by the
        coordinator, or by another account); otherwise a settlement with duplicates, silent or
        unregistered orgs, mismatched lengths or overflowing rewards, for any round id."""
        open_now = self.model.state_of(self.model.round_count) is RoundState.OPEN
        if open_now and data.draw(well_formed, label="well_formed"):
            self._finalize_committers(data)
        else:
            self._finalize_anything(data)

    def _wait_for_commits(self, data: st.DataObject, round_id: int) -> None:
        """Mostly, as the coordinator does, wait out round ``round_id``'s commit phase (to just
        past its deadline) before settling it; sometimes try while it is still on."""
        rnd = self.model.rounds.get(round_id)
        if rnd is None or rnd.state is not RoundState.OPEN or rnd.deadline >= 2**40:
            return
        if self.model.commit_phase_open(round_id, self._pending_time()) is None:
            return
        if data.draw(st.sampled_from([True, True, True, False]), label="wait_for_commits"):
            before = self._latest()
            self.tester.time_travel(rnd.deadline + 1)
            if self.checked_head == before["hash"]:
                self.checked_head = self._latest()["hash"]

    def _finalize_committers(self, data: st.DataObject, caller: int | None = None) -> None:
        if caller is None:
            caller = data.draw(st.one_of(st.just(COORDINATOR), account_index), label="caller")
        round_id = self.model.round_count
        self._wait_for_commits(data, round_id)
        committers = sorted(self.model.rounds[round_id].commits)
        orgs = (
            data.draw(st.lists(st.sampled_from(committers), unique=True), label="orgs")
            if committers
            else []
        )
        org_scores = data.draw(st.lists(valid_scores, min_size=len(orgs), max_size=len(orgs)))
        org_rewards = data.draw(st.lists(rewards, min_size=len(orgs), max_size=len(orgs)))
        new_hash = data.draw(nonzero_hash, label="new_hash")
        self._finalize(caller, round_id, new_hash, orgs, org_scores, org_rewards)

    def _finalize_anything(self, data: st.DataObject) -> None:
        # One flaw at a time (so each can reach its check), or everything random at once.
        flaw = data.draw(st.sampled_from(FLAWS), label="flaw")
        chaos = flaw == "chaos"
        caller = COORDINATOR
        if flaw in ("caller", "chaos"):
            caller = data.draw(account_index, label="caller")
        round_id = self.model.round_count
        if flaw in ("round", "chaos"):
            round_id = self._round_id(data, "round_id")
        self._wait_for_commits(data, round_id)
        rnd = self.model.rounds.get(round_id)
        committers = sorted(rnd.commits) if rnd is not None else []
        if flaw in ("orgs", "chaos"):  # duplicates, silent organisations, outsiders, 0x0
            candidates = st.sampled_from([*committers, *committers, *WATCHED])
            orgs = data.draw(st.lists(candidates, max_size=5), label="orgs")
        elif committers:
            orgs = data.draw(st.lists(st.sampled_from(committers), unique=True), label="orgs")
        else:
            orgs = []
        n_scores = n_rewards = len(orgs)
        if flaw in ("lengths", "chaos"):
            n_scores = data.draw(st.integers(0, 6), label="n_scores")
            n_rewards = data.draw(st.integers(0, 6), label="n_rewards")
        reward = (
            st.one_of(huge_rewards, huge_rewards, rewards)
            if flaw in ("overflow", "chaos")
            else rewards
        )
        org_scores = data.draw(st.lists(scores, min_size=n_scores, max_size=n_scores))
        org_rewards = data.draw(st.lists(reward, min_size=n_rewards, max_size=n_rewards))
        new_hash = data.draw(
            some_hash if chaos else st.just(ZERO) if flaw == "hash" else nonzero_hash,
            label="new_hash",
        )
        self._finalize(caller, round_id, new_hash, orgs, org_scores, org_rewards)

    @precondition(
        lambda self: any(r.state is RoundState.FINALIZED for r in self.model.rounds.values())
    )
    @rule(data=st.data())
    def finalize_again(self, data: st.DataObject) -> None:
        """A finalized round never finalizes a second time, whatever the settlement."""
        finalized = sorted(
            i for i, r in self.model.rounds.items() if r.state is RoundState.FINALIZED
        )
        round_id = data.draw(st.sampled_from(finalized), label="round_id")
        rnd = self.model.rounds[round_id]
        before = self.model.record(round_id)
        orgs = sorted(rnd.commits)
        new_hash = data.draw(nonzero_hash, label="new_hash")
        if data.draw(st.booleans(), label="by_root"):
            leaves = [SettlementLeaf(round_id, o, 0, 1, 0) for o in orgs] or [
                SettlementLeaf(round_id, ZERO_ADDRESS, 0, 1, 0)
            ]
            tree = SettlementTree.build(leaves)
            flagged = {o: 1 for o in orgs}
            self._post_root(
                COORDINATOR,
                round_id,
                new_hash,
                NO_VALUATION,
                tree,
                tree.root,
                tree.total_reward,
                len(leaves),
                list(flagged),
                list(flagged.values()),
            )
        else:
            self._finalize(
                COORDINATOR,
                round_id,
                new_hash,
                orgs,
                [0] * len(orgs),
                data.draw(st.lists(rewards, min_size=len(orgs), max_size=len(orgs))),
            )
        assert self.model.record(round_id) == before

    # ----------------------------------------------------------- rules: settling by root

    @rule(data=st.data())
    def finalize_round_with_root(self, data: st.DataObject) -> None:
        """Half the time the coordinator settling the open round by the root of its committers'
        leaves; otherwise one of ROOT_FLAWS (protocol_step settles by root as the protocol does).
        With no round open, mostly the next one is opened and committed to first, so that most
        attempts reach past RoundNotOpen."""
        open_now = self.model.state_of(self.model.round_count) is RoundState.OPEN
        if not open_now and data.draw(well_formed, label="reopen"):
            self._open_next_round(data)
            self._commit_as_organisations(data)
            open_now = True
        if open_now and data.draw(st.booleans(), label="well_formed"):
            self._settle_by_root(data)
        else:
            self._settle_by_root(data, flaw=data.draw(st.sampled_from(ROOT_FLAWS), label="flaw"))

    def _settle_by_root(self, data: st.DataObject, flaw: str | None = None) -> None:
        """Build a tree over leaves for some of the round's committers (and maybe a few accounts
        that did not commit: their leaves prove, but they cannot claim) and post its root,
        announcing the flagged committers; ``flaw`` (one of ROOT_FLAWS) spoils one part, or all."""
        chaos = flaw == "chaos"
        caller = COORDINATOR
        if flaw in ("caller", "chaos"):
            caller = data.draw(account_index, label="caller")
        round_id = self.model.round_count
        if flaw in ("round", "chaos"):
            round_id = self._round_id(data, "round_id")
        self._wait_for_commits(data, round_id)
        rnd = self.model.rounds.get(round_id)
        committers = sorted(rnd.commits) if rnd is not None else []
        silent = [a for a in WATCHED if a not in committers]
        paid = (
            data.draw(
                st.lists(st.sampled_from(committers), unique=True, min_size=1),
                label="paid",
            )
            if committers
            else []
        )
        extra = data.draw(st.lists(st.sampled_from(silent), unique=True, max_size=2), label="extra")
        leaf_orgs = paid + extra or [data.draw(st.sampled_from(WATCHED), label="leaf_org")]
        leaf_round = round_id
        if flaw in ("stale", "chaos") and data.draw(st.booleans(), label="other_round"):
            leaf_round = (round_id + data.draw(st.integers(1, 3), label="by")) % 2**256
        reward = st.one_of(huge_rewards, rewards) if flaw in ("overflow", "chaos") else rewards
        tree = SettlementTree.build(
            [
                SettlementLeaf(
                    leaf_round,
                    org,
                    data.draw(scores if flaw else valid_scores, label="score"),
                    data.draw(reward, label="reward"),
                    data.draw(flag_bits if flaw else leaf_flags, label="flags"),
                )
                for org in leaf_orgs
            ]
        )
        root = tree.root
        if flaw in ("stale", "chaos") and data.draw(st.booleans(), label="other_root"):
            root = data.draw(nonzero_hash, label="root")  # a root of no tree anyone built
        new_hash = data.draw(nonzero_hash, label="new_hash")
        if flaw == "hash":
            zero = data.draw(st.sampled_from(["model", "root", "both"]), label="zero")
            new_hash = ZERO if zero != "root" else new_hash
            root = ZERO if zero != "model" else root
        elif chaos:
            new_hash = data.draw(some_hash, label="new_hash")
            root = data.draw(st.sampled_from([root, root, ZERO]), label="root")
        total = min(tree.total_reward, UINT256_MAX)
        num_orgs = len(tree.leaves)
        # The announced total and count are never checked when the root is posted, so they can go
        # wrong along with any other flaw without hiding it; they bite only when claims come.
        if flaw in ("total", "chaos") or (flaw and data.draw(st.booleans(), label="bad_total")):
            total = data.draw(
                st.one_of(
                    st.integers(0, total),  # less than the leaves promise: late claims fail
                    st.integers(0, total),
                    st.just(min(total + 1, UINT256_MAX)),
                    any_uint256,
                ),
                label="total",
            )
            num_orgs = data.draw(st.one_of(st.integers(0, 10), any_uint256), label="num_orgs")
        elif flaw == "overflow":
            total = data.draw(st.sampled_from([total, UINT256_MAX]), label="total")
        pairs = [
            (f.organisation, f.flags)
            for f in tree.leaves
            if f.flags and f.organisation in committers
        ]
        flagged = [o for o, _ in pairs]
        words = [w for _, w in pairs]
        raw = False  # send the list as drawn, not as the client would (sorted, no zero flags)
        if flaw in ("flagged", "chaos"):
            how = data.draw(
                st.sampled_from(["any", "again", "other_flags", "unsorted"]), label="how"
            )
            raw = data.draw(st.booleans(), label="raw")
            if how == "unsorted":  # the right announcement, in descending address order
                raw = True
                pairs = sorted(pairs, key=lambda p: int(p[0], 16), reverse=True)
                flagged, words = [o for o, _ in pairs], [w for _, w in pairs]
            if how == "any" or not committers:  # anyone, any word: outsiders, 0x0, duplicates
                candidates = st.sampled_from([*committers, *committers, *committers, *WATCHED])
                flagged = data.draw(st.lists(candidates, max_size=5), label="flagged")
                words = data.draw(
                    st.lists(flag_bits, min_size=len(flagged), max_size=len(flagged)),
                    label="words",
                )
            elif how == "again":  # the right list, and one of them once more (maybe with 0)
                flagged.append(data.draw(st.sampled_from(flagged or committers), label="again"))
                words.append(data.draw(flag_bits, label="word"))
            else:  # committers announced with any flags, whatever their leaves carry
                flagged = data.draw(
                    st.lists(st.sampled_from(committers), unique=True, min_size=1), label="flagged"
                )
                words = data.draw(
                    st.lists(flag_bits, min_size=len(flagged), max_size=len(flagged)),
                    label="words",
                )
        if flaw in ("lengths", "chaos"):
            n_words = data.draw(st.integers(0, 6), label="n_words")
            words = (words + data.draw(st.lists(flag_bits, min_size=6, max_size=6)))[:n_words]
        valuation = data.draw(valuations, label="valuation")
        self._post_root(
            caller, round_id, new_hash, valuation, tree, root, total, num_orgs, flagged, words, raw
        )

    def _root_outcome(
        self,
        caller: int,
        round_id: int,
        new_hash: bytes,
        valuation: ValuationRecord,
        root: bytes,
        total: int,
        num_orgs: int,
        flagged: list[str],
        words: list[int],
    ) -> Outcome:
        if caller != COORDINATOR:
            return unauthorized(caller, COORDINATOR_ROLE)
        rnd = self.model.rounds.get(round_id)
        if rnd is None or rnd.state is not RoundState.OPEN:
            return Revert("RoundNotOpen", (round_id, self.model.state_of(round_id)))
        if (still_open := self.model.commit_phase_open(round_id, self._pending_time())) is not None:
            return still_open
        if len(flagged) != len(words):
            return Revert("LengthMismatch", (len(flagged), len(words), len(words), len(words)))
        if new_hash == ZERO or root == ZERO:
            return Revert("ZeroHash")
        previous = 0
        for i, (org, word) in enumerate(zip(flagged, words, strict=True)):
            # Strictly ascending addresses: no duplicates, and never the zero address.
            if int(org, 16) <= previous:
                return Revert("FlaggedNotAscending", (i, org))
            previous = int(org, 16)
            if not 0 < word <= 255:
                return Revert("FlagsOutOfRange", (org, word))
            if org not in rnd.commits:
                return Revert("NotCommitted", (round_id, org))
        if total > TOTAL_MAX:
            return out_of_range("totalReward", total, TOTAL_MAX)
        ledger: str = self.ledger.address
        method, seed, validation_hash = valuation.as_abi()
        return Success(
            [
                (ledger, "OrganisationFlagged", {"roundId": round_id, "org": o, "flags": w})
                for o, w in zip(flagged, words, strict=True)
            ]
            + [
                (ledger, "RewardsRootPosted", {"roundId": round_id, "root": root}),
                (
                    ledger,
                    "RoundValued",
                    {
                        "roundId": round_id,
                        "method": method,
                        "seed": seed,
                        "validationHash": validation_hash,
                    },
                ),
                (
                    ledger,
                    "RoundFinalized",
                    {
                        "roundId": round_id,
                        "newModelHash": new_hash,
                        "totalReward": total,
                        "organisations": num_orgs,
                    },
                ),
            ]
        )

    def _post_root(
        self,
        caller: int,
        round_id: int,
        new_hash: bytes,
        valuation: ValuationRecord,
        tree: SettlementTree,
        root: bytes,
        total: int,
        num_orgs: int,
        flagged: list[str],
        words: list[int],
        raw: bool = False,
    ) -> None:
        if not raw and len(set(flagged)) == len(flagged) == len(words):
            # What the client can say (a mapping: one flag word per distinct organisation),
            # which it announces as the ledger takes it: ascending, without zero flags.
            mapping = dict(zip(flagged, words, strict=True))
            announced = sorted((o, w) for o, w in mapping.items() if w)
            announced.sort(key=lambda pair: int(pair[0], 16))
            flagged, words = [o for o, _ in announced], [w for _, w in announced]
            outcome = self._root_outcome(
                caller, round_id, new_hash, valuation, root, total, num_orgs, flagged, words
            )
            self._expect(
                caller,
                lambda: self.clients[caller].finalize_round_with_root(
                    round_id, new_hash, root, total, num_orgs, flagged=mapping, valuation=valuation
                ),
                outcome,
            )
        else:
            # Duplicates, mismatched lengths or another order: only a raw call can send them.
            outcome = self._root_outcome(
                caller, round_id, new_hash, valuation, root, total, num_orgs, flagged, words
            )
            call = self.ledger.contract.functions.finalizeRoundWithRoot(
                round_id,
                new_hash,
                valuation.as_abi(),
                root,
                total,
                num_orgs,
                [Web3.to_checksum_address(o) for o in flagged],
                words,
            )
            self._expect(
                caller,
                lambda: send_transaction(self.w3, ACCOUNTS[caller], call, self.ledger.selectors),
                outcome,
            )
        if isinstance(outcome, Success):
            rnd = self.model.rounds[round_id]
            assert caller == COORDINATOR
            rnd.state = RoundState.FINALIZED
            rnd.new_model_hash = new_hash
            rnd.finalized_by = ADDRESSES[caller]
            rnd.valuation = valuation
            rnd.rewards_root = root
            rnd.tree = tree
            rnd.total_reward = total
            rnd.claimed_reward = 0
            for org, word in zip(flagged, words, strict=True):
                rnd.flags[org] = word
            if root == tree.root:
                self.trees[root] = tree
            self.dirty_rounds.add(round_id)
            self.checked_head = None

    # ----------------------------------------------------------- rules: claims

    def _unclaimed(self) -> list[tuple[int, SettlementLeaf]]:
        """The leaves a committer could claim now (in a round settled by the root of their tree)."""
        return [
            (i, leaf)
            for i, r in self.model.rounds.items()
            if r.tree is not None and r.tree.root == r.rewards_root
            for leaf in r.tree.leaves
            if leaf.round_id == i
            and leaf.organisation in r.commits
            and leaf.organisation not in r.settlements
            # a leaf the ledger would refuse for ever (flags other than announced, a score or
            # reward it cannot store) is the coordinator's fault, not a claim to make
            and leaf.flags == r.flags.get(leaf.organisation, 0)
            and settlement_revert(i, leaf.organisation, leaf.score, leaf.reward) is None
        ]

    def _claim_own(self, data: st.DataObject) -> None:
        """Some of the committers with a leaf under a posted root claim it, with its proof."""
        claims = data.draw(
            st.lists(st.sampled_from(self._unclaimed()), min_size=1, max_size=3, unique=True),
            label="leaves",
        )
        for round_id, leaf in claims:
            tree = self.model.rounds[round_id].tree
            assert tree is not None
            self._claim(
                ADDRESSES.index(leaf.organisation),
                round_id,
                leaf.score,
                leaf.reward,
                leaf.flags,
                tree.proof(leaf.organisation),
            )

    @precondition(lambda self: any(r.tree is not None for r in self.model.rounds.values()))
    @rule(data=st.data())
    def claim_reward(self, data: st.DataObject) -> None:
        """One to three claims: mostly an organisation claiming its own leaf of a round settled by
        root, with its proof (some twice, some past the announced total); otherwise one of
        CLAIMS."""
        by_root = [i for i, r in self.model.rounds.items() if r.tree is not None]
        for _ in range(data.draw(st.integers(1, 3), label="claims")):
            self._claim_attempt(data, by_root)

    def _claim_attempt(self, data: st.DataObject, by_root: list[int]) -> None:
        kind = data.draw(st.sampled_from(CLAIMS), label="kind")
        if kind == "round":
            round_id = self._round_id(data, "round_id")
            rnd = self.model.rounds.get(round_id)
            caller = data.draw(account_index, label="caller")
            if rnd is not None and rnd.tree is not None and data.draw(st.booleans()):
                leaf = data.draw(st.sampled_from(rnd.tree.leaves), label="leaf")
                proof = rnd.tree.proof(leaf.organisation)
                values = (leaf.score, leaf.reward, leaf.flags)
            else:
                values = (data.draw(scores), data.draw(rewards), data.draw(flag_bits))
                proof = data.draw(st.lists(nonzero_hash, max_size=3), label="proof")
            self._claim(caller, round_id, *values, proof)
            return
        rounds = sorted({i for i, _ in self._unclaimed()})  # those still owing someone
        if not rounds or not data.draw(well_formed, label="owing"):
            rounds = by_root
        round_id = data.draw(st.sampled_from(rounds), label="round_id")
        tree = self.model.rounds[round_id].tree
        assert tree is not None
        pool = [leaf for i, leaf in self._unclaimed() if i == round_id]
        if not pool or not data.draw(well_formed, label="unclaimed"):
            pool = list(tree.leaves)
        leaf = data.draw(st.sampled_from(pool), label="leaf")
        owner = leaf.organisation
        caller = (
            ADDRESSES.index(owner)
            if owner in ADDRESSES
            else data.draw(account_index, label="caller")
        )
        score, reward, flags = leaf.score, leaf.reward, leaf.flags
        proof = tree.proof(owner)
        if kind == "caller":
            caller = data.draw(account_index, label="caller")
        elif kind == "other" and len(tree.leaves) > 1:
            other = data.draw(
                st.sampled_from([f for f in tree.leaves if f.organisation != owner]), label="other"
            )
            score, reward, flags = other.score, other.reward, other.flags
            proof = tree.proof(other.organisation)
        elif kind == "tampered":
            changed = data.draw(st.sampled_from(["score", "reward", "flags"]), label="changed")
            if changed == "score":
                score = data.draw(scores.filter(lambda v: v != leaf.score), label="score")
            elif changed == "reward":
                near = [v for v in (reward - 1, reward + 1) if 0 <= v <= UINT256_MAX]
                reward = data.draw(
                    st.one_of(st.sampled_from(near), any_uint256).filter(
                        lambda v: v != leaf.reward
                    ),
                    label="reward",
                )
            else:
                flags = data.draw(flag_bits.filter(lambda v: v != leaf.flags), label="flags")
        elif kind == "proof":
            proof = self._broken(data, proof)
        self._claim(caller, round_id, score, reward, flags, proof)

    @staticmethod
    def _broken(data: st.DataObject, proof: list[bytes]) -> list[bytes]:
        """A proof that differs from ``proof``: truncated, extended, reordered or a sibling changed."""
        options = ["extended", "zeros"]
        if proof:
            options += ["truncated", "sibling", "empty"]
        if len(set(proof)) > 1:
            options.append("reversed")
        how = data.draw(st.sampled_from(options), label="broken")
        if how == "truncated":
            return proof[:-1]
        if how == "extended":
            return [*proof, data.draw(nonzero_hash, label="sibling")]
        if how == "zeros":
            return [ZERO] * (len(proof) or 1)
        if how == "empty":
            return []
        if how == "reversed":
            return proof[::-1]
        i = data.draw(st.integers(0, len(proof) - 1), label="at")
        sibling = data.draw(nonzero_hash.filter(lambda h: h != proof[i]), label="sibling")
        return [*proof[:i], sibling, *proof[i + 1 :]]

    def _claim_outcome(
        self, caller: int, round_id: int, score: int, reward: int, flags: int, proof: list[bytes]
    ) -> Outcome:
        org = ADDRESSES[caller]
        rnd = self.model.rounds.get(round_id)
        if rnd is None or rnd.rewards_root == ZERO:
            return Revert("NotClaimable", (round_id,))
        if org in rnd.settlements:
            return Revert("AlreadyClaimed", (round_id, org))
        if org not in rnd.commits:
            return Revert("NotCommitted", (round_id, org))
        announced = rnd.flags.get(org, 0)
        if flags != announced:  # a claim carries the flags announced at finalization
            return Revert("FlagsMismatch", (round_id, org, announced, flags))
        # The model's notion of a valid proof: the claimed leaf is one of the tree's whose root
        # was posted, and the proof is that tree's proof of it, sibling for sibling.
        leaf = SettlementLeaf(round_id, org, score, reward, flags)
        tree = rnd.tree
        valid = (
            tree is not None
            and tree.root == rnd.rewards_root
            and leaf in tree.leaves
            and proof == tree.proof(org)
        )
        # ... which the Python verifier (what the coordinator's tools trust) must agree with.
        assert verify(proof, rnd.rewards_root, leaf) == valid
        if not valid:
            return Revert("InvalidProof", (round_id, org))
        remaining = rnd.total_reward - rnd.claimed_reward
        if reward > remaining:
            return Revert("ClaimExceedsTotal", (round_id, reward, remaining))
        if (unstorable := settlement_revert(round_id, org, score, reward)) is not None:
            return unstorable
        if self.model.supply + reward > UINT256_MAX:
            return Revert("")  # Panic(0x11): the token's total supply would overflow
        ledger = self.ledger.address
        return Success(
            [
                (
                    ledger,
                    "ContributionRecorded",
                    {"roundId": round_id, "org": org, "score": score, "reward": reward},
                ),
                (ledger, "RewardClaimed", {"roundId": round_id, "org": org, "reward": reward}),
            ]
            + (
                [
                    (
                        self.token_address,
                        "Transfer",
                        {"from": ZERO_ADDRESS, "to": org, "value": reward},
                    )
                ]
                if reward != 0
                else []
            )
        )

    def _claim(
        self, caller: int, round_id: int, score: int, reward: int, flags: int, proof: list[bytes]
    ) -> None:
        outcome = self._claim_outcome(caller, round_id, score, reward, flags, proof)
        self._expect(
            caller,
            lambda: self.clients[caller].claim_reward(round_id, score, reward, flags, proof),
            outcome,
        )
        if isinstance(outcome, Success):
            org = ADDRESSES[caller]
            rnd = self.model.rounds[round_id]
            rnd.settlements[org] = (score, reward)
            rnd.flags[org] = flags
            rnd.claimed_reward += reward
            self.model.balances[org] = self.model.balances.get(org, 0) + reward
            self.dirty_rounds.add(round_id)
            self.checked_head = None

    # ----------------------------------------------------------- invariants

    @invariant()
    def ledger_matches_model(self) -> None:
        head = self._latest()
        if head["hash"] == self.checked_head:
            # The very chain head (so the very state) that the last full check verified, and the
            # model unchanged since (every model change clears checked_head): nothing to re-read.
            return
        model, ledger = self.model, self.ledger
        count = model.round_count
        assert ledger.round_count() == count
        records = [ledger.get_round(r) for r in range(count + 2)]  # 0 and count + 1 stay empty
        assert records == [model.record(r) for r in range(count + 2)]
        for record in records:
            if record.by_claims:  # claims never pay past the root's announced total
                assert record.claimed_reward <= record.total_reward
                assert record.state is RoundState.FINALIZED
            else:  # a direct settlement pays its total at once; an open round nothing
                assert record.claimed_reward == record.total_reward
        assert ledger.organisations() == model.registered
        for round_id in sorted(self.dirty_rounds):
            self._check_round_records(round_id)
        self.dirty_rounds.clear()
        self._check_supply(recorded=sum(record.claimed_reward for record in records))
        self._scan_logs(int(head["number"]))
        self.checked_head = head["hash"]

    def _check_supply(self, recorded: int) -> None:
        """Total supply == sum of all rewards paid (directly or claimed) == sum of the
        organisations' balances."""
        model, ledger = self.model, self.ledger
        supply = ledger.total_supply()
        settled = sum(r for rnd in model.rounds.values() for _, r in rnd.settlements.values())
        balances = {a: ledger.balance_of(a) for a in WATCHED}
        assert supply == recorded == settled == model.supply
        assert sum(balances[a] for a in model.registered) == supply
        assert all(balances[a] == 0 for a in WATCHED if a not in model.registered)
        assert all(balances[a] == model.balances.get(a, 0) for a in WATCHED)
        # Nothing transfers tokens here, so what each was paid in all is its balance.
        assert all(ledger.total_reward_of(a) == model.balances.get(a, 0) for a in WATCHED)

    def _check_round_records(self, round_id: int, *, full: bool = False) -> None:
        """Every watched address's commitment (and, once the round is finalized or ``full``, its
        settlement and flags) in ``round_id`` is the model's. Only a finalization or a claim
        writes settlements."""
        rnd = self.model.rounds[round_id]
        ledger = self.ledger
        paid = 0
        for address in WATCHED:
            commit = rnd.commits.get(address)
            expected = None if commit is None else CommitmentRecord(*commit)
            assert ledger.commitment_of(round_id, address) == expected
            if not (full or rnd.state is RoundState.FINALIZED):
                continue
            score, reward = rnd.settlements.get(address, (0, 0))
            settled = ledger.is_settled(round_id, address)
            onchain = SettlementLeaf(
                round_id,
                address,
                ledger.score_of(round_id, address),
                ledger.reward_of(round_id, address),
                ledger.flags_of(round_id, address),
            )
            assert settled == (address in rnd.settlements)
            assert onchain == SettlementLeaf(
                round_id, address, score, reward, rnd.flags.get(address, 0)
            )
            paid += onchain.reward
            if settled and rnd.rewards_root != ZERO:
                # A claimed settlement is the claimant's own leaf of the posted tree, word for word.
                assert self.trees[rnd.rewards_root].leaf_of(address) == onchain
        if full or rnd.state is RoundState.FINALIZED:
            # The round's paid total is what its payees' records add up to (all are watched).
            assert ledger.get_round(round_id).claimed_reward == paid
            assert ledger.valuation_of(round_id) == rnd.valuation
        # committersOf lists exactly the successful commits, in the order they were made.
        assert ledger.commit_order(round_id) == list(rnd.commits)
        # Every recorded score/reward belongs to an organisation that committed in this round.
        assert set(rnd.settlements) <= set(rnd.commits)
        assert set(rnd.commits) <= set(self.model.registered)

    def _scan_logs(self, head: int) -> None:
        """Invariants from the chain's own event history, independent of the model."""
        if head <= self.scanned_block:
            return
        logs = self.w3.eth.get_logs(
            {
                "fromBlock": self.scanned_block + 1,
                "toBlock": head,
                "address": [self.ledger.address, self.token_address],
            }
        )
        for log in logs:
            _, name, args = self._decode(log)
            if name == "RoundOpened":
                assert args["roundId"] == len(self.log_deadlines) + 1
                self.log_deadlines[args["roundId"]] = args["deadline"]
            elif name == "RoundExtended":
                assert args["roundId"] not in self.log_finalized
                assert args["deadline"] > self.log_deadlines[args["roundId"]]
                self.log_deadlines[args["roundId"]] = args["deadline"]
            elif name == "UpdateCommitted":
                key = (args["roundId"], args["org"])
                assert key not in self.log_commits
                assert args["roundId"] not in self.log_finalized
                timestamp = int(self.w3.eth.get_block(log["blockNumber"])["timestamp"])
                # A commitment after the deadline never takes effect.
                assert timestamp <= self.log_deadlines[args["roundId"]]
                self.log_commits[key] = timestamp
            elif name == "ContributionRecorded":
                key = (args["roundId"], args["org"])
                assert key in self.log_commits  # only committers are scored and paid
                assert key not in self.log_settled
                # Paid in the direct settlement (before its RoundFinalized), or by a claim on a
                # round closed by root: never after a direct settlement, never on an open round.
                assert (args["roundId"] in self.log_roots) == (
                    args["roundId"] in self.log_finalized
                )
                self.log_settled[key] = args["reward"]
                self.log_scores[key] = args["score"]
            elif name == "OrganisationFlagged":
                assert (args["roundId"], args["org"]) in self.log_commits
                assert args["flags"] != 0
            elif name == "RewardsRootPosted":
                round_id = args["roundId"]
                assert round_id in self.log_deadlines
                assert round_id not in self.log_finalized and round_id not in self.log_roots
                assert args["root"] != ZERO
                self.log_roots[round_id] = args["root"]
            elif name == "RewardClaimed":
                round_id, org = args["roundId"], args["org"]
                assert round_id in self.log_roots and round_id in self.log_finalized
                assert self.log_settled[(round_id, org)] == args["reward"]
                claimed = self.log_claimed.get(round_id, 0) + args["reward"]
                assert claimed <= self.log_totals[round_id]
                self.log_claimed[round_id] = claimed
                # Only a leaf of a tree the coordinator built pays, and only its own organisation.
                tree = self.trees[self.log_roots[round_id]]
                leaf = tree.leaf_of(org)
                assert (leaf.round_id, leaf.score, leaf.reward) == (
                    round_id,
                    self.log_scores[(round_id, org)],
                    args["reward"],
                )
            elif name == "RoundFinalized":
                round_id = args["roundId"]
                assert round_id in self.log_deadlines
                assert round_id not in self.log_finalized  # at most once
                sender = self.w3.eth.get_transaction(log["transactionHash"])["from"]
                assert sender == ADDRESSES[COORDINATOR]  # only the coordinator's took effect
                self.log_finalized[round_id] = sender
                self.log_totals[round_id] = args["totalReward"]
            elif name == "Transfer":
                assert args["from"] == ZERO_ADDRESS  # nothing but mints happen here
                self.log_minted += args["value"]
        self.scanned_block = head
        assert self.log_minted == sum(self.log_settled.values()) == self.model.supply
        finalized = {i for i, r in self.model.rounds.items() if r.state is RoundState.FINALIZED}
        assert set(self.log_finalized) == finalized
        assert all(
            r.finalized_by == ADDRESSES[COORDINATOR]
            for r in self.model.rounds.values()
            if r.state is RoundState.FINALIZED
        )
        model_commits = {(i, o) for i, r in self.model.rounds.items() for o in r.commits}
        assert set(self.log_commits) == model_commits
        model_settled = {
            (i, o): rw for i, r in self.model.rounds.items() for o, (_, rw) in r.settlements.items()
        }
        assert self.log_settled == model_settled
        model_roots = {
            i: r.rewards_root for i, r in self.model.rounds.items() if r.rewards_root != ZERO
        }
        assert self.log_roots == model_roots
        assert {i: self.log_claimed.get(i, 0) for i in self.log_roots} == {
            i: self.model.rounds[i].claimed_reward for i in model_roots
        }

    def teardown(self) -> None:
        """A last full sweep: every round's every record, for every watched address."""
        try:
            for round_id in self.model.rounds:
                self._check_round_records(round_id, full=True)
            for address in WATCHED:
                assert self.ledger.is_organisation(address) == (address in self.model.registered)
        finally:
            super().teardown()


@pytest.mark.slow
def test_ledger_state_machine() -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=6,  # 180 steps, each checked in full: about 45 s on one core (the forge
            # invariant campaign in test_forge.py runs thousands of random calls besides)
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
