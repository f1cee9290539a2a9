"""A stateful property test of FedLedger + RewardToken against a Python model, on the in-process EVM.

Hypothesis drives random sequences of ledger calls (open, commit, advance time, finalize, register,
mint) on one fresh chain per example. A plain-Python model predicts every call's outcome: either the
call succeeds, emits exactly the predicted events and moves the ledger to the model's next state, or
it reverts with the custom error (and arguments) the model names and mines nothing. After every
step the chain is compared with the model and with invariants derived from the chain's own history.
"""

from __future__ import annotations

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
    RoundState,
)

ZERO = b"\x00" * 32
ZERO_ADDRESS = "0x" + "00" * 20
DEFAULT_ADMIN_ROLE = ZERO
COORDINATOR_ROLE = bytes(Web3.keccak(text="COORDINATOR_ROLE"))
ORGANISATION_ROLE = bytes(Web3.keccak(text="ORGANISATION_ROLE"))
INT256_MIN = -(2**255)
INT256_MAX = 2**255 - 1
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
samples = st.one_of(st.just(0), st.integers(1, 10**6), st.integers(1, 10**6), st.just(UINT256_MAX))
scores = st.integers(INT256_MIN, INT256_MAX)
rewards = st.one_of(st.just(0), st.integers(1, 10**30))
any_uint256 = st.integers(0, UINT256_MAX)
well_formed = st.sampled_from([True, True, False])  # two calls in three follow the protocol
FLAWS = ("orgs", "orgs", "overflow", "lengths", "hash", "round", "caller", "chaos")


# ------------------------------------------------------------------ model


@dataclass
class ModelRound:
    model_hash: bytes
    deadline: int
    state: RoundState = RoundState.OPEN
    new_model_hash: bytes = ZERO
    commits: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    settlements: dict[str, tuple[int, int]] = field(default_factory=dict)  # org -> (score, reward)
    total_reward: int = 0
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
            claimed_reward=rnd.total_reward,
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


# ------------------------------------------------------------------ the machine


class LedgerMachine(RuleBasedStateMachine):
    """One fresh chain + ledger per example; the model is the specification."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = embedded_web3(num_accounts=NUM_ACCOUNTS)
        # No budget limit here: the model predicts settlements, the budget has its own tests.
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
        self.log_minted = 0

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
        the next round; or organisations commit, time passes, or the coordinator settles."""
        if self.model.state_of(self.model.round_count) is not RoundState.OPEN:
            self._open_next_round(data)
            return
        rnd = self.model.rounds[self.model.round_count]
        late = self._pending_time() > rnd.deadline
        actions = ["finalize", "finalize", "commit"] if late else ["commit", "advance", "finalize"]
        action = data.draw(st.sampled_from(actions), label="action")
        if action == "commit":
            self._commit_as_organisations(data)
        elif action == "advance":
            self._advance_time(data)
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
        elif deadline <= previous:
            outcome = Revert("DeadlineNotLater", (previous, deadline))
        elif deadline <= now:
            outcome = Revert("DeadlineInPast", (deadline, now))
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
        if not len(orgs) == len(org_scores) == len(org_rewards):
            # The client sends one flag word per organisation, so flags never mismatch here.
            lengths = (len(orgs), len(org_scores), len(org_rewards), len(orgs))
            return Revert("LengthMismatch", lengths)
        if new_hash == ZERO:
            return Revert("ZeroHash")
        total = 0
        seen: set[str] = set()
        for org, reward in zip(orgs, org_rewards, strict=True):
            if org not in rnd.commits:
                return Revert("NotCommitted", (round_id, org))
            if org in seen:
                return Revert("DuplicateSettlement", (round_id, org))
            seen.add(org)
            total += reward
            if total > UINT256_MAX:
                return Revert("")  # Panic(0x11): the running total overflows
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
            rnd.total_reward = sum(org_rewards)
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

    def _finalize_committers(self, data: st.DataObject, caller: int | None = None) -> None:
        if caller is None:
            caller = data.draw(st.one_of(st.just(COORDINATOR), account_index), label="caller")
        round_id = self.model.round_count
        committers = sorted(self.model.rounds[round_id].commits)
        orgs = (
            data.draw(st.lists(st.sampled_from(committers), unique=True), label="orgs")
            if committers
            else []
        )
        org_scores = data.draw(st.lists(scores, min_size=len(orgs), max_size=len(orgs)))
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
        huge = st.integers(2**255, UINT256_MAX)
        reward = st.one_of(huge, huge, rewards) if flaw in ("overflow", "chaos") else rewards
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
        orgs = sorted(rnd.commits)
        self._finalize(
            COORDINATOR,
            round_id,
            data.draw(nonzero_hash, label="new_hash"),
            orgs,
            [0] * len(orgs),
            data.draw(st.lists(rewards, min_size=len(orgs), max_size=len(orgs))),
        )
        assert self.model.rounds[round_id].state is RoundState.FINALIZED

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
        assert ledger.organisations() == model.registered
        for round_id in sorted(self.dirty_rounds):
            self._check_round_records(round_id)
        self.dirty_rounds.clear()
        self._check_supply(recorded=sum(record.total_reward for record in records))
        self._scan_logs(int(head["number"]))
        self.checked_head = head["hash"]

    def _check_supply(self, recorded: int) -> None:
        """Total supply == sum of all recorded rewards == sum of the organisations' balances."""
        model, ledger = self.model, self.ledger
        supply = ledger.total_supply()
        settled = sum(r for rnd in model.rounds.values() for _, r in rnd.settlements.values())
        balances = {a: ledger.balance_of(a) for a in WATCHED}
        assert supply == recorded == settled == model.supply
        assert sum(balances[a] for a in model.registered) == supply
        assert all(balances[a] == 0 for a in WATCHED if a not in model.registered)
        assert all(balances[a] == model.balances.get(a, 0) for a in WATCHED)

    def _check_round_records(self, round_id: int, *, full: bool = False) -> None:
        """Every watched address's commitment (and, once the round is finalized or ``full``, its
        settlement) in ``round_id`` is the model's. Only a finalization writes settlements."""
        rnd = self.model.rounds[round_id]
        ledger = self.ledger
        for address in WATCHED:
            commit = rnd.commits.get(address)
            expected = None if commit is None else CommitmentRecord(*commit)
            assert ledger.commitment_of(round_id, address) == expected
            if full or rnd.state is RoundState.FINALIZED:
                score, reward = rnd.settlements.get(address, (0, 0))
                assert ledger.is_settled(round_id, address) == (address in rnd.settlements)
                assert ledger.score_of(round_id, address) == score
                assert ledger.reward_of(round_id, address) == reward
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
                self.log_settled[key] = args["reward"]
            elif name == "RoundFinalized":
                round_id = args["roundId"]
                assert round_id in self.log_deadlines
                assert round_id not in self.log_finalized  # at most once
                sender = self.w3.eth.get_transaction(log["transactionHash"])["from"]
                assert sender == ADDRESSES[COORDINATOR]  # only the coordinator's took effect
                self.log_finalized[round_id] = sender
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
            max_examples=20,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
