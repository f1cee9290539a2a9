"""A run's record read back from the ledger: every organisation's row in every round, and its totals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from web3 import Web3

from fedledger.incentive.ledger import LedgerClient, RetirementRecord
from fedledger.incentive.onchain import (
    NO_VALUATION,
    TOKEN_UNIT,
    RoundState,
    flag_names,
    from_fixed_point,
)


@dataclass(frozen=True)
class RewardRow:
    """One organisation in one round, as ``fedledger rewards`` reads it from the ledger."""

    round: int
    state: str
    settlement: str
    organisation: str
    committed: str | None
    settled: bool
    payment: str
    score: str  # scoreOf: the Shapley value in fixed point (1e18 = 1.0), as a decimal string
    value: float  # the same score as a float
    reward: str  # rewardOf: token units (18 decimals), as a decimal string
    reward_tokens: float  # the same in tokens, as a float (for reading, not for sums)
    flags: list[str]
    epsilon: float | None  # epsilonOf: DP-SGD epsilon spent so far, as committed (None: no DP)
    samples: int | None = None  # the sample count committed (None: no commitment)


@dataclass(frozen=True)
class LedgerRound:
    """A round's outcome on the ledger."""

    round_id: int
    state: str  # the contract's RoundState, lower case: "open" or "finalized"
    failed: bool  # finalized without a valuation: no new model, nothing paid
    total_reward: int  # token units the round paid (or left to be claimed)


@dataclass(frozen=True)
class LedgerLog:
    """What the contract holds about a run, for ``fedledger rewards`` and ``fedledger report``."""

    ledger: str
    chain_id: int
    rounds: list[LedgerRound]
    rows: list[RewardRow]  # round by round, and in each round organisation by organisation
    balances: dict[str, int]  # token balance of each organisation, in token units
    total_rewards: dict[str, int]  # totalRewardOf each organisation, in token units
    retired: dict[str, RetirementRecord]  # the organisations that retired, and when

    @property
    def organisations(self) -> list[str]:
        """The organisations read, in the order the ledger lists them."""
        return list(self.balances)


def read_ledger(ledger: LedgerClient, organisations: Sequence[str] | None = None) -> LedgerLog:
    """Every round's record of ``organisations`` (default: every registered one) on ``ledger``,
    their token balances, rewards paid in all and retirements."""
    orgs = (
        [Web3.to_checksum_address(org) for org in organisations]
        if organisations
        else ledger.organisations()
    )
    rounds: list[LedgerRound] = []
    rows: list[RewardRow] = []
    for round_id in range(1, ledger.round_count() + 1):
        record, valuation, held_all = ledger.round_log(round_id, orgs)  # one batch a round
        finalized = record.state == RoundState.FINALIZED
        valuation = valuation if finalized else None
        rounds.append(
            LedgerRound(
                round_id=round_id,
                state=record.state.name.lower(),
                failed=valuation is not None and valuation.method == NO_VALUATION.method,
                total_reward=record.total_reward,
            )
        )
        for address, held in zip(orgs, held_all, strict=True):
            committed, settled, score = held.commitment, held.settled, held.score
            if not finalized or committed is None:
                payment = "-"
            elif not record.by_claims:
                payment = "paid" if settled else "-"
            else:
                payment = "claimed" if settled else "unclaimed"
            rows.append(
                RewardRow(
                    round=round_id,
                    state=record.state.name.lower(),
                    settlement="claims" if record.by_claims else "direct",
                    organisation=address,
                    committed=None if committed is None else "0x" + committed.update_hash.hex(),
                    settled=settled,
                    payment=payment,
                    score=str(score),
                    value=from_fixed_point(score),
                    reward=str(held.reward),
                    reward_tokens=held.reward / TOKEN_UNIT,
                    flags=flag_names(held.flags),
                    epsilon=held.epsilon if committed else None,
                    samples=None if committed is None else committed.num_samples,
                )
            )
    standings = dict(zip(orgs, ledger.standings_of(orgs), strict=True))  # one batch
    return LedgerLog(
        ledger=ledger.address,
        chain_id=ledger.chain_id(),
        rounds=rounds,
        rows=rows,
        balances={address: balance for address, (balance, _, _) in standings.items()},
        total_rewards={address: total for address, (_, total, _) in standings.items()},
        retired={address: r for address, (_, _, r) in standings.items() if r is not None},
    )
