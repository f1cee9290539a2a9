"""docs/inspect-with-cast.md, run: every `cast` command it shows, against a devnet with a round
settled directly and one settled by claims, answers what fedledger's own client reads."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from fedledger.devnet.anvil import DEVNET_DIR, AnvilProcess
from fedledger.devnet.deploy import deploy_devnet
from fedledger.incentive.chain import connect, devnet_account
from fedledger.incentive.ledger import LedgerClient
from fedledger.incentive.merkle import SettlementLeaf, SettlementTree
from fedledger.incentive.onchain import TOKEN_UNIT, Flag, ValuationRecord, to_fixed_point

DOC = Path(__file__).resolve().parents[2] / "docs" / "inspect-with-cast.md"
CAST_BIN = DEVNET_DIR / "node_modules" / ".bin"

pytestmark = pytest.mark.e2e


def doc_commands() -> list[str]:
    """Every `cast ...` line of the page's ```sh blocks, as written."""
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("cast ")]


def settle_two_rounds(ledger: LedgerClient) -> list[str]:
    """Round 1 settled directly (organisation 1 flagged), round 2 by claims (organisation 0
    claims); organisation 0 commits with DP in round 1. Returns the organisations."""
    orgs = [devnet_account(2), devnet_account(3)]
    coordinator = ledger.with_account(devnet_account(1))
    members = [ledger.with_account(o) for o in orgs]
    coordinator.open_round(1, b"\x11" * 32, ledger.block_timestamp() + 600)
    members[0].commit_update(1, b"\xa0" * 32, 120, epsilon=2.5)
    members[1].commit_update(1, b"\xa1" * 32, 80)
    coordinator.finalize_round(
        1,
        b"\x22" * 32,
        [o.address for o in orgs],
        [to_fixed_point(0.125), to_fixed_point(-0.01)],
        [3 * TOKEN_UNIT, 0],
        flags=[0, int(Flag.NEGATIVE_CONTRIBUTION)],
        valuation=ValuationRecord("exact:neg_log_loss", 0, b"\x33" * 32),
    )
    coordinator.open_round(2, b"\x22" * 32, ledger.block_timestamp() + 600)
    for k, member in enumerate(members):
        member.commit_update(2, bytes([0xB0 + k]) * 32, 100)
    tree = SettlementTree.build(
        [
            SettlementLeaf(2, orgs[0].address, to_fixed_point(0.25), 5 * TOKEN_UNIT, 0),
            SettlementLeaf(2, orgs[1].address, to_fixed_point(0.05), TOKEN_UNIT, 0),
        ]
    )
    coordinator.finalize_round_with_root(2, b"\x44" * 32, tree.root, tree.total_reward, 2)
    members[0].claim_reward(2, to_fixed_point(0.25), 5 * TOKEN_UNIT, 0, tree.proof(orgs[0].address))
    return [o.address for o in orgs]


def run_cast(command: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"{command}\n{done.stderr}"
    return done.stdout.strip()


def first_int(output: str) -> int:
    """cast prints a number as ``7000000000000000000 [7e18]``: the digits before the note."""
    return int(output.split()[0])


def test_every_cast_command_of_the_page_answers_what_the_ledger_client_reads(
    anvil: AnvilProcess,
) -> None:
    w3 = connect(anvil.rpc_url)
    deployment = deploy_devnet(w3, 2)
    ledger = LedgerClient(w3, deployment.ledger)
    orgs = settle_two_rounds(ledger)
    commands = doc_commands()
    assert len(commands) >= 11, commands
    valuations: dict[int, str] = {}
    for org, round_id in ((orgs[0], 1), (orgs[1], 1), (orgs[0], 2)):
        env = {
            **os.environ,
            "PATH": f"{CAST_BIN}{os.pathsep}{os.environ['PATH']}",
            "RPC": anvil.rpc_url,
            "LEDGER": deployment.ledger,
            "ORG": org,
            "ROUND": str(round_id),
        }
        answers = {
            command.split('"')[1].split("(")[0]: run_cast(command, env) for command in commands
        }
        assert first_int(answers["totalRewardOf"]) == ledger.total_reward_of(org)
        assert ledger.total_reward_of(org) == sum(ledger.reward_of(r, org) for r in (1, 2))
        assert first_int(answers["rewardOf"]) == ledger.reward_of(round_id, org)
        assert first_int(answers["roundCount"]) == ledger.round_count() == 2
        assert answers["token"].lower() == ledger.token_address.lower()
        assert first_int(answers["scoreOf"]) == ledger.score_of(round_id, org)
        assert first_int(answers["flagsOf"]) == ledger.flags_of(round_id, org)
        committed = ledger.commitment_of(round_id, org)
        assert committed is not None
        update_hash, samples = answers["commitmentOf"].splitlines()
        assert update_hash == "0x" + committed.update_hash.hex()
        assert first_int(samples) == committed.num_samples
        epsilon = ledger.epsilon_of(round_id, org)
        assert first_int(answers["epsilonOf"]) == (
            0 if epsilon is None else to_fixed_point(epsilon)
        )
        record = ledger.get_round(round_id)
        assert f"0x{record.new_model_hash.hex()}" in answers["getRound"]
        assert answers["getRound"].count(", 2,") == 1  # state 2: finalized
        logs = answers["ContributionRecorded"]
        assert logs.count("transactionHash") == 3  # two direct settlements and one claim
        valuations[round_id] = answers["valuationOf"]
    # Round 1's valuation method, decoded with cast alone.
    method_word = valuations[1].strip("()").split(",")[0]
    assert run_cast(f"cast parse-bytes32-string {method_word}", env) == "exact:neg_log_loss"
    # The figures `fedledger rewards` adds up match: 3 + 5 tokens for organisation 0, 0 for 1
    # (flagged in round 1, its round-2 reward not claimed yet).
    assert ledger.total_reward_of(orgs[0]) == 8 * TOKEN_UNIT
    assert ledger.total_reward_of(orgs[1]) == 0


def test_a_read_is_one_round_trip(anvil: AnvilProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chain id web3 checks before every call is asked once per connection, not each
    time (it doubled the round trips of every read)."""
    from web3.providers.rpc.rpc import HTTPProvider

    w3 = connect(anvil.rpc_url)
    ledger = LedgerClient(w3, deploy_devnet(w3, 1).ledger)
    sent: list[str] = []
    original = HTTPProvider._make_request
    monkeypatch.setattr(
        HTTPProvider,
        "_make_request",
        lambda self, method, params: sent.append(method) or original(self, method, params),
    )
    assert [ledger.round_count() for _ in range(3)] == [0, 0, 0]
    assert sent == ["eth_call"] * 3


def test_batched_reads_answer_what_single_reads_do_in_one_round_trip(
    anvil: AnvilProcess,
) -> None:
    """A round's epsilons and an organisation's reward and flags are read in one JSON-RPC
    batch over HTTP, with the values the reads one by one give."""
    w3 = connect(anvil.rpc_url)
    calls: list[str] = []
    ledger = LedgerClient(
        w3, deploy_devnet(w3, 2).ledger, on_call=lambda name, _s, ok: calls.append(name)
    )
    orgs = settle_two_rounds(ledger)
    calls.clear()
    assert ledger.epsilons_of(1, orgs) == [2.5, None]
    assert ledger.settled_of(1, orgs[1]) == (0, int(Flag.NEGATIVE_CONTRIBUTION))
    assert ledger.settled_of(1, orgs[0]) == (3 * TOKEN_UNIT, 0)
    assert calls == ["batch:epsilonOf", "batch:flagsOf,rewardOf", "batch:flagsOf,rewardOf"]
    calls.clear()
    singles = [ledger.epsilon_of(1, o) for o in orgs]
    singles_settled = [(ledger.reward_of(1, o), ledger.flags_of(1, o)) for o in orgs]
    assert len(calls) == 6
    assert singles == ledger.epsilons_of(1, orgs)
    assert singles_settled == [ledger.settled_of(1, o) for o in orgs]
    for round_id in (1, 2):  # a round settled directly, one by claims
        calls.clear()
        records = ledger.records_of(round_id, orgs)
        assert calls == ["batch:commitmentOf,epsilonOf,flagsOf,isSettled,rewardOf,scoreOf"]
        assert [
            (r.commitment, r.settled, r.score, r.reward, r.flags, r.epsilon) for r in records
        ] == [
            (
                ledger.commitment_of(round_id, o),
                ledger.is_settled(round_id, o),
                ledger.score_of(round_id, o),
                ledger.reward_of(round_id, o),
                ledger.flags_of(round_id, o),
                ledger.epsilon_of(round_id, o),
            )
            for o in orgs
        ]
    assert [r.settled for r in records] == [True, False]  # organisation 1 has not claimed
