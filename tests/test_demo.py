"""The demo runs a whole federation in one process and reports what the contract says."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from web3 import Web3

from fedledger.coordinator.policy import PricingPolicy
from fedledger.demo import run_demo
from fedledger.devnet.embedded import embedded_web3
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.onchain import TOKEN_UNIT, RoundState, from_fixed_point

pytestmark = pytest.mark.slow

ORGANISATIONS = 3
ROUNDS = 2
BUDGET = PricingPolicy().reward_per_round  # the defaults the demo keeps
PER_GAIN = PricingPolicy().reward_per_gain
CHANCE = 0.1  # digits has ten classes
FINAL_ACCURACY = 0.75  # chance is 0.1; two rounds of the demo's training reach about 0.88


def test_demo_learns_and_its_table_is_what_the_contract_pays(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    chains: list[Web3] = []

    def keep_the_chain(*args: Any, **kwargs: Any) -> Web3:
        w3 = embedded_web3(*args, **kwargs)
        chains.append(w3)
        return w3

    # To read the chain after the demo (which imports the in-process EVM when it starts one).
    monkeypatch.setattr("fedledger.devnet.embedded.embedded_web3", keep_the_chain)
    out = io.StringIO()
    result = run_demo(  # the demo's own training settings, fewer organisations and rounds
        organisations=ORGANISATIONS,
        rounds=ROUNDS,
        console=Console(file=out, width=200),
        report_dir=tmp_path / "report",
    )

    # It learns: every round's model is far above chance, and the last one well above that.
    assert len(result.accuracies) == ROUNDS
    assert all(a > 3 * CHANCE for a in result.accuracies), result.accuracies
    assert result.accuracies[-1] >= FINAL_ACCURACY, result.accuracies

    # Every round was finalized on-chain and paid by the README's rule: a pool of at most the
    # budget, split as reward_k = pool * max(phi_k, 0) / sum_j max(phi_j, 0), nothing to a
    # flagged one, nobody more than reward_per_gain * phi_k.
    [w3] = chains
    ledger = LedgerClient(w3, result.ledger)
    addresses = [org.address for org in result.organisations]
    assert ledger.round_count() == ROUNDS
    assert sorted(addresses) == sorted(ledger.organisations())
    for round_id in range(1, ROUNDS + 1):
        record = ledger.get_round(round_id)
        assert record.state == RoundState.FINALIZED
        assert 0 < record.total_reward == record.claimed_reward <= BUDGET
        rewards = [ledger.reward_of(round_id, a) for a in addresses]
        scores = [
            0.0
            if ledger.flags_of(round_id, a)
            else max(from_fixed_point(ledger.score_of(round_id, a)), 0.0)
            for a in addresses
        ]
        pool = record.total_reward
        assert sum(rewards) == pool
        assert sum(scores) > 0
        for reward, score in zip(rewards, scores, strict=True):
            assert reward == pytest.approx(pool * score / sum(scores), rel=1e-9)
            assert (reward == 0) == (score == 0)
            assert reward <= PER_GAIN * score * (1 + 1e-12)

    # The summary is the chain's: summed rewards and contributions, and balances equal to
    # them (tokens come only from round rewards).
    paid = sum(ledger.get_round(r).total_reward for r in range(1, ROUNDS + 1))
    assert ledger.total_supply() == paid
    for org in result.organisations:
        assert org.reward == sum(ledger.reward_of(r, org.address) for r in range(1, ROUNDS + 1))
        assert org.balance == ledger.balance_of(org.address) == org.reward
        assert org.value == pytest.approx(
            sum(from_fixed_point(ledger.score_of(r, org.address)) for r in range(1, ROUNDS + 1))
        )
        committed = ledger.commitment_of(ROUNDS, org.address)
        assert committed is not None and org.num_samples == committed.num_samples > 0
    assert sum(org.reward for org in result.organisations) == paid

    # And the printed table shows those numbers, one row per organisation.
    printed = out.getvalue()
    assert result.ledger in printed
    for round_id, accuracy in enumerate(result.accuracies, start=1):
        assert f"round {round_id:>2}: validation accuracy {accuracy:.1%}" in printed
    rows = re.findall(
        r"│ (0x\w+)…(\w+) │ +(\d+) │ +([+-][\d.]+) │ +([\d,.]+) │ +([\d,.]+) │", printed
    )
    assert len(rows) == ORGANISATIONS
    for org, (head, tail, samples, contribution, reward, balance) in zip(
        result.organisations, rows, strict=True
    ):
        assert org.address.startswith(head) and org.address.endswith(tail)
        assert int(samples) == org.num_samples
        assert contribution == f"{org.value:+.4f}"
        assert reward == f"{org.reward / TOKEN_UNIT:,.2f}"
        assert balance == f"{org.balance / TOKEN_UNIT:,.2f}"
    assert f"final validation accuracy {result.accuracies[-1]:.1%}" in printed

    # Its report is written, with the coordinator's metrics, and said where.
    assert result.report == tmp_path / "report" / "summary.md"
    summary = result.report.read_text()
    assert f"Final validation metrics (round {ROUNDS}):" in summary
    assert f"accuracy {result.accuracies[-1]:.4f}" in summary
    for chart in ("accuracy.png", "reward_shares.png", "contributions.png"):
        assert (tmp_path / "report" / chart).read_bytes()[:4] == b"\x89PNG"
    assert f"written to {result.report}" in printed
