"""A thin client for the FedLedger contract: deploy, write (admin, coordinator, organisation) and read."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, TypeVar

from eth_account.signers.local import LocalAccount
from web3 import HTTPProvider, Web3
from web3.contract import Contract
from web3.types import TxReceipt

from fedledger.contracts.compile import load_artifact
from fedledger.errors import ChainError
from fedledger.incentive.chain import (
    LeanFunctions,
    call_view,
    error_selectors,
    send_transaction,
)
from fedledger.incentive.onchain import (
    DEFAULT_ROUND_BUDGET,
    NO_VALUATION,
    ZERO_HASH,
    RoundState,
    ValuationRecord,
    from_fixed_point,
    to_fixed_point,
)

T = TypeVar("T")


class CallObserver(Protocol):
    """Told of every chain call a ``LedgerClient`` makes, once it has returned or raised."""

    def __call__(self, function: str, seconds: float, ok: bool) -> None:
        """``function``: the contract function (or JSON-RPC method) called; ``seconds``: how
        long the call took, receipt included for a transaction; ``ok``: whether it succeeded
        (False for a revert as for an unreachable chain)."""
        ...


@dataclass(frozen=True)
class RoundRecord:
    """A round's public record on the ledger."""

    round_id: int
    model_hash: bytes
    new_model_hash: bytes
    deadline: int
    state: RoundState
    commit_count: int
    total_reward: int
    rewards_root: bytes = ZERO_HASH  # zero unless the round settles by Merkle claims
    claimed_reward: int = 0  # paid so far; equals total_reward once a round is fully paid

    @property
    def by_claims(self) -> bool:
        """Whether the round settles by Merkle claims (finalizeRoundWithRoot)."""
        return self.rewards_root != ZERO_HASH


@dataclass(frozen=True)
class CommitmentRecord:
    """What an organisation committed in a round."""

    update_hash: bytes
    num_samples: int


@dataclass(frozen=True)
class OrganisationRecord:
    """What the ledger holds of one organisation in one round (``records_of``)."""

    commitment: CommitmentRecord | None
    settled: bool
    score: int  # fixed point, 1e18 = 1.0
    reward: int  # token units
    flags: int
    epsilon: float | None


@dataclass(frozen=True)
class RetirementRecord:
    """An organisation that stopped training for good (``retire``), and what it had spent."""

    since_round: int  # roundCount() when it retired: it commits in no round from then on
    epsilon: float | None  # the epsilon it had spent (None: reported none, a task without DP)


def _abis() -> list[list[dict[str, Any]]]:
    return [load_artifact("FedLedger")["abi"], load_artifact("RewardToken")["abi"]]


def as_bytes32(value: bytes | str) -> bytes:
    """A 32-byte hash from bytes or a 0x-hex string."""
    raw = (
        bytes.fromhex(value[2:] if value.startswith("0x") else value)
        if isinstance(value, str)
        else value
    )
    if len(raw) != 32:
        raise ValueError(f"expected a 32-byte hash, got {len(raw)} bytes")
    return raw


class LedgerClient:
    """Reads and writes one deployed FedLedger. Writes are signed locally by ``account``;
    ``on_call``, if given, is told of every call to the chain (for metrics)."""

    def __init__(
        self,
        w3: Web3,
        ledger_address: str,
        account: LocalAccount | None = None,
        *,
        on_call: CallObserver | None = None,
    ) -> None:
        self.w3 = w3
        self.address = Web3.to_checksum_address(ledger_address)
        self.account = account
        self.on_call = on_call
        self.contract: Contract = w3.eth.contract(
            address=self.address, abi=load_artifact("FedLedger")["abi"]
        )
        # The same functions, each bound to its own ABI entry: the calls made every round.
        self.functions = LeanFunctions(w3, self.address, load_artifact("FedLedger")["abi"])
        self.selectors = error_selectors(_abis())

    # ----------------------------------------------------------------- deploy

    @classmethod
    def deploy(
        cls,
        w3: Web3,
        admin: LocalAccount,
        coordinator: str,
        *,
        token_name: str = "fedledger Reward",
        token_symbol: str = "FLR",
        round_budget: int = DEFAULT_ROUND_BUDGET,
        task_spec: bytes | None = None,
    ) -> tuple[LedgerClient, TxReceipt]:
        """Deploy a new ledger (which deploys its reward token) from ``admin``'s key, and set the
        most a round may pay (``round_budget`` token units; 0 leaves it at 0: nothing paid) and
        the task spec's hash (``task_spec``; None leaves it for ``set_task_spec``)."""
        artifact = load_artifact("FedLedger")
        factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        selectors = error_selectors(_abis())
        receipt = send_transaction(
            w3,
            admin,
            factory.constructor(admin.address, coordinator, token_name, token_symbol),
            selectors,
        )
        address = receipt["contractAddress"]
        if address is None:
            raise ChainError("deployment receipt has no contract address")
        client = cls(w3, address, admin)
        if round_budget:
            client.set_round_budget(round_budget)
        if task_spec is not None:
            client.set_task_spec(task_spec)
        return client, receipt

    def with_account(self, account: LocalAccount) -> LedgerClient:
        """The same ledger, writing as ``account`` (told to the same observer)."""
        return LedgerClient(self.w3, self.address, account, on_call=self.on_call)

    def observed(self, on_call: CallObserver) -> LedgerClient:
        """The same ledger and account, telling ``on_call`` of every chain call."""
        return LedgerClient(self.w3, self.address, self.account, on_call=on_call)

    def _observe(self, function: str, call: Callable[[], T]) -> T:
        """``call()``, timed and reported to the observer as ``function``."""
        if self.on_call is None:
            return call()
        started = time.perf_counter()
        try:
            result = call()
        except Exception:
            self.on_call(function, time.perf_counter() - started, False)
            raise
        self.on_call(function, time.perf_counter() - started, True)
        return result

    # ----------------------------------------------------------------- writes

    def _send(self, call: Any, *, gas: int | None = None) -> TxReceipt:
        account = self.account
        if account is None:
            raise ChainError("this ledger client has no signing key; pass --key")
        return self._observe(
            str(call.fn_name),
            lambda: send_transaction(self.w3, account, call, self.selectors, gas=gas),
        )

    def register_organisation(self, org: str) -> TxReceipt:
        return self._send(self.functions.registerOrganisation(Web3.to_checksum_address(org)))

    def revoke_organisation(self, org: str) -> TxReceipt:
        """End ``org``'s membership (admin key): it commits in no later round; its records stand."""
        return self._send(self.functions.revokeOrganisation(Web3.to_checksum_address(org)))

    def set_round_budget(self, budget: int) -> TxReceipt:
        """Set the most one round may pay out, in token units (admin key)."""
        return self._send(self.functions.setRoundBudget(budget))

    def set_task_spec(self, spec_hash: bytes) -> TxReceipt:
        """Record the keccak256 of the consortium's task spec file (admin key; before round 1)."""
        return self._send(self.functions.setTaskSpec(as_bytes32(spec_hash)))

    def set_sample_cap(self, organisation: str, cap: int) -> TxReceipt:
        """Set the most samples ``organisation`` may declare in a commitment, 0 for none (admin key)."""
        return self._send(self.functions.setSampleCap(organisation, cap))

    def open_round(self, round_id: int, model_hash: bytes, deadline: int) -> TxReceipt:
        return self._send(self.functions.openRound(round_id, model_hash, deadline))

    def commit_update(
        self, round_id: int, update_hash: bytes, num_samples: int, *, epsilon: float | None = None
    ) -> TxReceipt:
        """Commit an update; with ``epsilon`` (DP-SGD: spent so far, this round included) by
        ``commitPrivateUpdate``, which records it on-chain beside the commitment."""
        if epsilon is None:
            call = self.functions.commitUpdate(round_id, update_hash, num_samples)
        else:
            call = self.functions.commitPrivateUpdate(
                round_id, update_hash, num_samples, to_fixed_point(epsilon)
            )
        return self._send(call)

    def retire(self, epsilon: float | None = None) -> TxReceipt:
        """Stop this organisation training for good (its privacy budget is spent)."""
        fixed = 0 if epsilon is None else to_fixed_point(epsilon)
        return self._send(self.functions.retire(fixed))

    def extend_round(self, round_id: int, deadline: int) -> TxReceipt:
        return self._send(self.functions.extendRound(round_id, deadline))

    def finalize_round(
        self,
        round_id: int,
        new_model_hash: bytes,
        orgs: Sequence[str],
        scores: Sequence[int],
        rewards: Sequence[int],
        *,
        flags: Sequence[int] | None = None,
        valuation: ValuationRecord = NO_VALUATION,
    ) -> TxReceipt:
        """Settle directly: every organisation's score, reward and flags in one transaction."""
        return self._send(
            self.functions.finalizeRound(
                round_id,
                new_model_hash,
                valuation.as_abi(),
                [Web3.to_checksum_address(o) for o in orgs],
                list(scores),
                list(rewards),
                [0] * len(orgs) if flags is None else list(flags),
            )
        )

    def finalize_round_with_root(
        self,
        round_id: int,
        new_model_hash: bytes,
        root: bytes,
        total_reward: int,
        num_organisations: int,
        *,
        flagged: Mapping[str, int] | None = None,
        valuation: ValuationRecord = NO_VALUATION,
    ) -> TxReceipt:
        """Settle by claims: post the Merkle root of the round's leaves and announce the flagged.

        The ledger takes the announcement in ascending address order, each organisation once,
        with nonzero flags: an organisation with flags 0 is simply not announced.
        """
        announced: dict[str, int] = {}
        for org, bits in (flagged or {}).items():
            if bits:
                announced[Web3.to_checksum_address(org)] = int(bits)
        flagged = dict(sorted(announced.items(), key=lambda item: int(item[0], 16)))
        return self._send(
            self.functions.finalizeRoundWithRoot(
                round_id,
                new_model_hash,
                valuation.as_abi(),
                root,
                total_reward,
                num_organisations,
                [Web3.to_checksum_address(o) for o in flagged],
                list(flagged.values()),
            )
        )

    def claim_reward(
        self, round_id: int, score: int, reward: int, flags: int, proof: Sequence[bytes]
    ) -> TxReceipt:
        """Claim this client's account's reward for a round settled by a Merkle root."""
        return self._send(self.functions.claimReward(round_id, score, reward, flags, list(proof)))

    # ------------------------------------------------------------------ reads

    def _view(self, fn: Any) -> Any:
        return self._observe(str(fn.fn_name), lambda: call_view(fn.call, self.selectors))

    @property
    def batches(self) -> bool:
        """Whether several reads go as one JSON-RPC batch (an HTTP provider; the in-process
        EVM takes them one by one)."""
        return isinstance(self.w3.provider, HTTPProvider)

    def _views(self, fns: Sequence[Any]) -> list[Any]:
        """Several reads, as one JSON-RPC batch (one round trip) where the provider takes
        batches, one by one where it does not (the in-process EVM)."""
        if len(fns) < 2 or not self.batches:
            return [self._view(fn) for fn in fns]

        def batch() -> list[Any]:
            with self.w3.batch_requests() as requests:
                for fn in fns:
                    requests.add(fn)
                return list(requests.execute())

        name = "batch:" + ",".join(sorted({str(fn.fn_name) for fn in fns}))
        return self._observe(name, lambda: call_view(batch, self.selectors))

    @cached_property
    def token_address(self) -> str:
        return str(self._view(self.functions.token()))

    @cached_property
    def token(self) -> Contract:
        return self.w3.eth.contract(
            address=Web3.to_checksum_address(self.token_address),
            abi=load_artifact("RewardToken")["abi"],
        )

    def chain_id(self) -> int:
        return self._observe("eth_chainId", lambda: int(self.w3.eth.chain_id))

    def block_timestamp(self) -> int:
        return self._observe(
            "eth_getBlockByNumber", lambda: int(self.w3.eth.get_block("latest")["timestamp"])
        )

    def round_budget(self) -> int:
        """The most one round may pay out, in token units (``roundBudget``)."""
        return int(self._view(self.functions.roundBudget()))

    def task_spec(self) -> bytes:
        """keccak256 of the consortium's task spec file; 32 zero bytes before one is set."""
        return bytes(self._view(self.functions.taskSpec()))

    def sample_cap_of(self, organisation: str) -> int:
        """The most samples ``organisation`` may declare in a commitment; 0: no cap (``sampleCapOf``)."""
        return int(self._view(self.functions.sampleCapOf(organisation)))

    def round_count(self) -> int:
        return int(self._view(self.functions.roundCount()))

    def active_organisations(self) -> int:
        """Registered organisations that have not retired: the commitments that end a round's
        commit phase before its deadline (``activeOrganisations``)."""
        return int(self._view(self.functions.activeOrganisations()))

    def commits_closed(self, round_id: int, *, now: float | None = None) -> bool:
        """Whether open round ``round_id``'s commit phase is over, so that uploads may start and
        the round may be finalized: every active organisation committed, or the deadline passed.

        The chain judges by its latest block's time, which stands still while nobody sends a
        transaction (anvil mines on demand); ``now``, a wall clock, also counts: the next block
        is mined no earlier than it.
        """
        if self._view(self.functions.commitsClosed(round_id)):
            return True
        if now is None:
            return False
        record = self.get_round(round_id)
        return record.state is RoundState.OPEN and now > record.deadline

    def get_round(self, round_id: int) -> RoundRecord:
        return _round_record(round_id, self._view(self.functions.getRound(round_id)))

    def round_log(
        self, round_id: int, orgs: Sequence[str]
    ) -> tuple[RoundRecord, ValuationRecord | None, list[OrganisationRecord]]:
        """``get_round``, ``valuation_of`` and ``records_of`` of a round, read in one batch."""
        f = self.functions
        answers = self._views(
            [f.getRound(round_id), f.valuationOf(round_id), *self._record_calls(round_id, orgs)]
        )
        return (
            _round_record(round_id, answers[0]),
            ValuationRecord.from_abi(answers[1]),
            _organisation_records(answers[2:]),
        )

    def commitment_of(self, round_id: int, org: str) -> CommitmentRecord | None:
        """The organisation's commitment in the round, or None if it made none."""
        return _commitment(
            self._view(self.functions.commitmentOf(round_id, Web3.to_checksum_address(org)))
        )

    def commitments_of(
        self, round_id: int, orgs: Sequence[str]
    ) -> dict[str, CommitmentRecord | None]:
        """``commitment_of`` each of ``orgs`` (keyed as given), read in one batch."""
        answers = self._views(
            [self.functions.commitmentOf(round_id, Web3.to_checksum_address(o)) for o in orgs]
        )
        return {org: _commitment(answer) for org, answer in zip(orgs, answers, strict=True)}

    def round_and_commitment(
        self, round_id: int, org: str
    ) -> tuple[RoundRecord, CommitmentRecord | None]:
        """``get_round`` and ``commitment_of`` ``org``, read in one batch."""
        f = self.functions
        record, commitment = self._views(
            [f.getRound(round_id), f.commitmentOf(round_id, Web3.to_checksum_address(org))]
        )
        return _round_record(round_id, record), _commitment(commitment)

    def epsilons_of(self, round_id: int, orgs: Sequence[str]) -> list[float | None]:
        """``epsilon_of`` for each of ``orgs``, read in one batch."""
        fixed = self._views(
            [self.functions.epsilonOf(round_id, Web3.to_checksum_address(org)) for org in orgs]
        )
        return [from_fixed_point(int(f)) if int(f) else None for f in fixed]

    def records_of(self, round_id: int, orgs: Sequence[str]) -> list[OrganisationRecord]:
        """What the ledger holds of each of ``orgs`` in round ``round_id`` (commitment,
        settlement, score, reward, flags, epsilon), read in one batch."""
        return _organisation_records(self._views(self._record_calls(round_id, orgs)))

    def _record_calls(self, round_id: int, orgs: Sequence[str]) -> list[Any]:
        """The reads of ``records_of``, six an organisation (``_organisation_records``)."""
        calls = []
        for org in orgs:
            address = Web3.to_checksum_address(org)
            f = self.functions
            calls += [
                f.commitmentOf(round_id, address),
                f.isSettled(round_id, address),
                f.scoreOf(round_id, address),
                f.rewardOf(round_id, address),
                f.flagsOf(round_id, address),
                f.epsilonOf(round_id, address),
            ]
        return calls

    def _settled_calls(self, round_id: int, org: str) -> list[Any]:
        """The reads of ``org``'s reward and flags in a round (``settled_of``)."""
        org = Web3.to_checksum_address(org)
        return [self.functions.rewardOf(round_id, org), self.functions.flagsOf(round_id, org)]

    def settled_of(self, round_id: int, org: str) -> tuple[int, int]:
        """``reward_of`` and ``flags_of`` together, in one batch."""
        reward, flags = self._views(self._settled_calls(round_id, org))
        return int(reward), int(flags)

    def round_and_settlement(self, round_id: int, org: str) -> tuple[RoundRecord, int, int]:
        """``get_round`` and ``settled_of`` ``org`` (its reward and flags), in one batch."""
        record, reward, flags = self._views(
            [self.functions.getRound(round_id), *self._settled_calls(round_id, org)]
        )
        return _round_record(round_id, record), int(reward), int(flags)

    def epsilon_of(self, round_id: int, org: str) -> float | None:
        """The epsilon the organisation reported with its commitment (None: no DP, or none)."""
        fixed = int(self._view(self.functions.epsilonOf(round_id, Web3.to_checksum_address(org))))
        return from_fixed_point(fixed) if fixed else None

    def retirement_of(self, org: str) -> RetirementRecord | None:
        """Since when and having spent what the organisation stopped training (None: it trains)."""
        return _retirement(self._view(self.functions.retirementOf(Web3.to_checksum_address(org))))

    def standings_of(self, orgs: Sequence[str]) -> list[tuple[int, int, RetirementRecord | None]]:
        """``balance_of``, ``total_reward_of`` and ``retirement_of`` of each of ``orgs``, read in
        one batch."""
        calls = []
        for org in orgs:
            address = Web3.to_checksum_address(org)
            calls += [
                self.token.functions.balanceOf(address),
                self.functions.totalRewardOf(address),
                self.functions.retirementOf(address),
            ]
        answers = self._views(calls)
        return [
            (int(balance), int(total), _retirement(retirement))
            for balance, total, retirement in zip(
                answers[0::3], answers[1::3], answers[2::3], strict=True
            )
        ]

    def score_of(self, round_id: int, org: str) -> int:
        """The organisation's score in the round: its Shapley value in fixed point (1e18 = 1.0)."""
        return int(self._view(self.functions.scoreOf(round_id, Web3.to_checksum_address(org))))

    def reward_of(self, round_id: int, org: str) -> int:
        return int(self._view(self.functions.rewardOf(round_id, Web3.to_checksum_address(org))))

    def total_reward_of(self, org: str) -> int:
        """Token units paid to the organisation over every round (``totalRewardOf``)."""
        return int(self._view(self.functions.totalRewardOf(Web3.to_checksum_address(org))))

    def commit_order(self, round_id: int) -> list[str]:
        """The organisations that committed in the round, earliest first (``committersOf``)."""
        return [str(org) for org in self._view(self.functions.committersOf(round_id))]

    def flags_of(self, round_id: int, org: str) -> int:
        return int(self._view(self.functions.flagsOf(round_id, Web3.to_checksum_address(org))))

    def valuation_of(self, round_id: int) -> ValuationRecord | None:
        """How the round was valued, or None before it is finalized."""
        return ValuationRecord.from_abi(self._view(self.functions.valuationOf(round_id)))

    def is_settled(self, round_id: int, org: str) -> bool:
        return bool(self._view(self.functions.isSettled(round_id, Web3.to_checksum_address(org))))

    def is_organisation(self, account: str) -> bool:
        return bool(self._view(self.functions.isOrganisation(Web3.to_checksum_address(account))))

    def organisations(self) -> list[str]:
        return [str(a) for a in self._view(self.functions.organisations())]

    @cached_property
    def coordinator_role(self) -> bytes:
        """``COORDINATOR_ROLE``'s id: a constant of the contract, read once."""
        return bytes(self._view(self.functions.COORDINATOR_ROLE()))

    def has_coordinator_role(self, account: str) -> bool:
        role = self.coordinator_role
        return bool(self._view(self.functions.hasRole(role, Web3.to_checksum_address(account))))

    def balance_of(self, account: str) -> int:
        return int(self._view(self.token.functions.balanceOf(Web3.to_checksum_address(account))))

    def total_supply(self) -> int:
        return int(self._view(self.token.functions.totalSupply()))


def _retirement(raw: Sequence[Any]) -> RetirementRecord | None:
    """``retirementOf``'s answer (None: the organisation trains)."""
    retired, since, epsilon = raw
    if not retired:
        return None
    return RetirementRecord(int(since), from_fixed_point(int(epsilon)) if epsilon else None)


def _round_record(round_id: int, raw: Sequence[Any]) -> RoundRecord:
    """``getRound``'s answer as a RoundRecord."""
    (model_hash, new_model_hash, deadline, state, commit_count, total_reward, root, claimed) = raw
    return RoundRecord(
        round_id=round_id,
        model_hash=bytes(model_hash),
        new_model_hash=bytes(new_model_hash),
        deadline=int(deadline),
        state=RoundState(int(state)),
        commit_count=int(commit_count),
        total_reward=int(total_reward),
        rewards_root=bytes(root),
        claimed_reward=int(claimed),
    )


def _commitment(raw: Sequence[Any]) -> CommitmentRecord | None:
    """``commitmentOf``'s answer as a CommitmentRecord (None: no commitment)."""
    update_hash, num_samples = raw
    if bytes(update_hash) == ZERO_HASH:
        return None
    return CommitmentRecord(update_hash=bytes(update_hash), num_samples=int(num_samples))


def _organisation_records(answers: Sequence[Any]) -> list[OrganisationRecord]:
    """The answers to ``LedgerClient._record_calls``, six an organisation, as records."""
    records = []
    for i in range(len(answers) // 6):
        commitment, settled, score, reward, flags, epsilon = answers[6 * i : 6 * i + 6]
        records.append(
            OrganisationRecord(
                commitment=_commitment(commitment),
                settled=bool(settled),
                score=int(score),
                reward=int(reward),
                flags=int(flags),
                epsilon=from_fixed_point(int(epsilon)) if int(epsilon) else None,
            )
        )
    return records
