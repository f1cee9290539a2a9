"""The consortium's cap on each organisation's declared sample count, enforced at commit: a
declared count steers FedAvg, so the admin may bound it by the dataset an organisation
brought (0, the default, sets no cap)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedledger.incentive.ledger import LedgerClient

if TYPE_CHECKING:
    from tests.contracts.conftest import Chain

ADMIN_ROLE = b"\x00" * 32
ExpectRevert = Callable[..., object]


def test_only_the_admin_sets_a_cap_and_only_for_an_organisation(
    chain: Chain, admin_ledger: LedgerClient, coordinator_ledger: LedgerClient,
    org_ledgers: tuple[LedgerClient, ...], expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    org = chain.orgs[0].address
    assert chain.ledger.sample_cap_of(org) == 0
    receipt = admin_ledger.set_sample_cap(org, 500)
    events = chain.ledger.contract.events.SampleCapSet().process_receipt(receipt)
    assert [dict(e["args"]) for e in events] == [{"org": org, "previousCap": 0, "cap": 500}]
    assert chain.ledger.sample_cap_of(org) == 500
    for client, account in (
        (coordinator_ledger, chain.coordinator),
        (org_ledgers[0], chain.orgs[0]),
    ):
        expect_revert(
            lambda c=client: c.set_sample_cap(org, 10**12),
            "AccessControlUnauthorizedAccount",
            account.address,
            ADMIN_ROLE,
        )
    expect_revert(
        lambda: admin_ledger.set_sample_cap(chain.outsider.address, 10),
        "OrganisationNotRegistered",
        chain.outsider.address,
    )


def test_a_commitment_above_the_cap_reverts_and_one_at_it_is_taken(
    chain: Chain, admin_ledger: LedgerClient, org_ledgers: tuple[LedgerClient, ...],
    open_round: Callable[..., tuple[int, int]], expect_revert: ExpectRevert,
) -> None:  # fmt: skip
    capped, free = chain.orgs[0].address, chain.orgs[1].address
    admin_ledger.set_sample_cap(capped, 500)
    round_id, _ = open_round()
    expect_revert(
        lambda: org_ledgers[0].commit_update(round_id, b"\xa0" * 32, 501),
        "SamplesAboveCap",
        capped,
        501,
        500,
    )
    org_ledgers[0].commit_update(round_id, b"\xa0" * 32, 500)
    org_ledgers[1].commit_update(round_id, b"\xa1" * 32, 10**12)  # no cap set: any count
    assert chain.ledger.commitment_of(round_id, capped).num_samples == 500  # type: ignore[union-attr]
    assert chain.ledger.commitment_of(round_id, free).num_samples == 10**12  # type: ignore[union-attr]
    # Lifted again: 0 is no cap.
    admin_ledger.set_sample_cap(capped, 0)
    assert chain.ledger.sample_cap_of(capped) == 0
