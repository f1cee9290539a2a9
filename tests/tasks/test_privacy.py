"""DP-SGD per record with Opacus: the spec's [privacy], the accountant against Opacus's own
analysis, the node's budget, and the node refusing to train past it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedledger.errors import ErrorCode, TaskError
from fedledger.tasks import BUILTIN_DIGITS, DigitsTask, load_spec, parse_spec
from fedledger.tasks.privacy import PrivacyBudgetSpent, PrivacyLedger, train_private
from fedledger.tasks.spec import PrivacySection
from fedledger.tasks.training import TrainConfig

PRIVACY = (
    "\n[privacy]\nnoise_multiplier = 1.1\nmax_grad_norm = 1.0\nepsilon = {eps}\ndelta = 1e-5\n"
)


def dp_digits(tmp_path: Path, epsilon: float = 8.0) -> Path:
    path = tmp_path / "spec.toml"
    path.write_bytes(BUILTIN_DIGITS.read_bytes() + PRIVACY.format(eps=epsilon).encode())
    return path


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("noise_multiplier = -1.0", "privacy.noise_multiplier"),
        ("max_grad_norm = 0.0", "privacy.max_grad_norm"),
        ("delta = 1.0", "privacy.delta"),
        ("epsilon = 0.0", "privacy.epsilon"),
        ('accountant = "moments"', "privacy.accountant"),
    ],
)
def test_dp_settings_out_of_range_are_refused(line: str, field: str) -> None:
    key = line.split(" ")[0]
    text = BUILTIN_DIGITS.read_text() + "\n".join(
        other if not other.startswith(key) else line for other in PRIVACY.format(eps=8).splitlines()
    )
    if key == "accountant":
        text += "\n" + line + "\n"
    with pytest.raises(TaskError) as info:
        parse_spec(text.encode())
    assert info.value.code is ErrorCode.BAD_SPEC and field in info.value.message


def test_fedprox_and_dp_sgd_do_not_combine() -> None:
    text = BUILTIN_DIGITS.read_text().replace("batch_size = 32", "batch_size = 32\nprox_mu = 0.1")
    with pytest.raises(TaskError, match="prox_mu must be 0 with"):
        parse_spec((text + PRIVACY.format(eps=8)).encode())


def test_the_ledger_composes_rounds_as_opacus_s_own_analysis_does(tmp_path: Path) -> None:
    """Reference: Opacus's RDP analysis (Mironov et al. 2019's sampled Gaussian) computed
    directly for the same schedule, not through the accountant the ledger uses."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    privacy = PrivacySection(noise_multiplier=1.1, max_grad_norm=1.0, epsilon=100.0, delta=1e-5)
    ledger = PrivacyLedger(privacy)
    for round_id in (1, 2, 3):
        ledger.charge(round_id, 463, epochs=3, batch_size=32)  # 15 batches: q = 1/15, 45 steps
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1 / 15, noise_multiplier=1.1, steps=3 * 45, orders=orders)
    reference, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert ledger.spent().epsilon == pytest.approx(reference, rel=1e-12)
    assert 1.0 < reference < 10.0  # a real, finite guarantee for this schedule


def test_the_budget_stops_the_round_that_would_exceed_it_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "privacy.json"
    probe = PrivacyLedger(
        PrivacySection(noise_multiplier=1.1, max_grad_norm=1.0, epsilon=1e9, delta=1e-5)
    )
    probe.charge(1, 463, epochs=3, batch_size=32)
    one_round = probe.spent().epsilon
    probe.charge(2, 463, epochs=3, batch_size=32)
    budget = (one_round + probe.spent().epsilon) / 2  # room for one round, not two
    privacy = PrivacySection(noise_multiplier=1.1, max_grad_norm=1.0, epsilon=budget, delta=1e-5)
    ledger = PrivacyLedger(privacy, path)
    ledger.charge(1, 463, epochs=3, batch_size=32)
    ledger.charge(1, 463, epochs=3, batch_size=32)  # a retrained round costs nothing more
    assert ledger.spent().rounds == 1
    with pytest.raises(PrivacyBudgetSpent) as refused:
        ledger.charge(2, 463, epochs=3, batch_size=32)
    assert refused.value.code is ErrorCode.PRIVACY_BUDGET_SPENT
    assert "past the budget" in refused.value.message
    restarted = PrivacyLedger(privacy, path)  # a restarted node remembers what it spent
    assert restarted.spent() == ledger.spent() and restarted.spent().epsilon == one_round
    path.write_text("{not json")
    with pytest.raises(TaskError, match="do not delete it"):
        PrivacyLedger(privacy, path)


def test_dp_sgd_is_reproducible_noised_and_still_learns() -> None:
    task = DigitsTask()
    model = task.build_model(seed=0)
    base = model.state_dict()
    x, y = task.load_data("0/2")
    privacy = PrivacySection(noise_multiplier=0.8, max_grad_norm=1.0, epsilon=50.0, delta=1e-5)
    config = TrainConfig(epochs=3, lr=0.2, batch_size=64, seed=7)
    first = train_private(model, base, x, y, config, privacy)
    again = train_private(model, base, x, y, config, privacy)
    other = train_private(model, base, x, y, TrainConfig(**{**config.__dict__, "seed": 8}), privacy)
    assert all(torch.equal(first.delta[n], again.delta[n]) for n in base)  # restart-safe
    assert not torch.equal(first.delta["0.weight"], other.delta["0.weight"])  # fresh noise
    trained = {n: base[n] + first.delta[n] for n in base}
    before = task.score(model, base, task.validation_data())["accuracy"]
    after = task.score(model, trained, task.validation_data())["accuracy"]
    assert after > before + 0.3


def test_a_node_trains_privately_until_its_budget_is_spent(
    make_harness: Callable[..., object], tmp_path: Path
) -> None:
    from fedledger.coordinator.api import create_app
    from fedledger.demo import serve_in_thread
    from fedledger.node.client import CoordinatorClient
    from fedledger.node.runner import NodeRunner

    probe = PrivacyLedger(
        PrivacySection(noise_multiplier=1.1, max_grad_norm=1.0, epsilon=1e9, delta=1e-5)
    )
    samples = len(DigitsTask().load_data("0/3")[1])
    for r in (1, 2, 3):
        probe.charge(r, samples, epochs=3, batch_size=32)
    two_rounds = PrivacyLedger(probe.privacy)
    two_rounds.rounds = dict(list(probe.rounds.items())[:2])
    budget = (two_rounds.spent().epsilon + probe.spent().epsilon) / 2
    spec_file = dp_digits(tmp_path, epsilon=budget)
    harness = make_harness(total_rounds=3, task_spec=spec_file)
    harness.service.start_driver()  # type: ignore[attr-defined]
    task = DigitsTask(load_spec(spec_file))
    assert task.spec.privacy is not None
    with serve_in_thread(create_app(harness.service)) as url:  # type: ignore[attr-defined]
        runners = [
            NodeRunner(
                CoordinatorClient(url),
                harness.org_ledger(org),  # type: ignore[attr-defined]
                task,
                task.load_data(f"{k}/3"),
                seed=k,
                privacy=PrivacyLedger(task.spec.privacy, tmp_path / f"privacy-{k}.json"),
                poll_interval_s=0.02,
                clock=lambda: harness.clock[0],  # type: ignore[attr-defined]
            )
            for k, org in enumerate(harness.orgs)  # type: ignore[attr-defined]
        ]
        outcomes: dict[int, list[object]] = {}
        threads = [
            threading.Thread(target=lambda k=k: outcomes.__setitem__(k, runners[k].run()))
            for k in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    # Organisation 0 (the partition the budget was sized on) stops after two rounds.
    assert [o.round_id for o in outcomes[0]] == [1, 2]  # type: ignore[attr-defined]
    assert runners[0].budget_spent is not None
    assert outcomes[0][-1].epsilon == pytest.approx(two_rounds.spent().epsilon)  # type: ignore[attr-defined]
    assert harness.ledger.commitment_of(3, harness.orgs[0].address) is None  # type: ignore[attr-defined]
    assert all(
        o.epsilon is not None and o.epsilon <= budget
        for r in runners
        for o in outcomes[runners.index(r)]
    )  # type: ignore[attr-defined]
    # Each commitment carries its epsilon on-chain, and the coordinator reports it.
    ledger = harness.ledger  # type: ignore[attr-defined]
    for k, org in enumerate(harness.orgs):  # type: ignore[attr-defined]
        for outcome in outcomes[k]:
            on_chain = ledger.epsilon_of(outcome.round_id, org.address)  # type: ignore[attr-defined]
            assert on_chain == pytest.approx(outcome.epsilon, rel=1e-12)  # type: ignore[attr-defined]
    # Out of budget (the partitions are alike: all three), each retired on-chain with what it
    # spent; round 3 waits for none of them and reports them retired, not missing.
    for k, org in enumerate(harness.orgs):  # type: ignore[attr-defined]
        retirement = ledger.retirement_of(org.address)
        assert retirement is not None and retirement.since_round == 3
        assert retirement.epsilon == pytest.approx(outcomes[k][-1].epsilon, rel=1e-12)  # type: ignore[attr-defined]
    service = harness.service  # type: ignore[attr-defined]
    current = service.current()
    while current.status not in ("failed", "finalized"):  # the driver closes round 3
        current = service.current_after((current.round_id, current.status, None), wait_s=10)
    third = service.round_result(3)
    assert third.status == "failed" and "every organisation has retired" in third.reason
    assert sorted(o.status for o in third.organisations) == ["retired"] * 3
    assert all(o.epsilon is not None for o in third.organisations)
    # Restarted with its ledger, a spent node says so at start-up, before asking the
    # coordinator anything (here nothing listens), and does not retire twice.
    restarted = NodeRunner(
        CoordinatorClient("http://127.0.0.1:9"),
        harness.org_ledger(harness.orgs[0]),  # type: ignore[attr-defined]
        task,
        task.load_data("0/3"),
        privacy=PrivacyLedger(task.spec.privacy, tmp_path / "privacy-0.json"),
    )
    assert restarted.run() == []
    assert restarted.budget_spent is not None
    assert restarted.budget_spent.code == ErrorCode.PRIVACY_BUDGET_SPENT
    assert ledger.retirement_of(harness.orgs[0].address).since_round == 3  # type: ignore[attr-defined]


def test_the_noise_seed_is_secret_per_node_and_stable_across_a_restart(tmp_path: Path) -> None:
    """Noise anyone could predict (a seed from the round number) would protect nothing; a
    restarted node must still redraw the noise of an update it committed."""
    privacy = PrivacySection(noise_multiplier=1.1, max_grad_norm=1.0, epsilon=50.0, delta=1e-5)
    path = tmp_path / "privacy.json"
    ledger = PrivacyLedger(privacy, path)
    ledger.charge(1, 100, epochs=1, batch_size=10)
    restarted = PrivacyLedger(privacy, path)
    assert restarted.noise_seed(1) == ledger.noise_seed(1) != ledger.noise_seed(2)
    assert PrivacyLedger(privacy, tmp_path / "other.json").noise_seed(1) != ledger.noise_seed(1)
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_simulator_trains_privately_when_asked() -> None:
    """bench/privacy.py's federations: the same organisations, DP-SGD updates instead of SGD."""
    from fedledger.simulation import run_federation

    privacy = PrivacySection(noise_multiplier=2.0, max_grad_norm=1.0, epsilon=1e9, delta=1e-5)
    plain = run_federation(num_orgs=3, rounds=1)
    private = run_federation(num_orgs=3, rounds=1, privacy=privacy)
    assert plain.rounds[0].values != private.rounds[0].values
    assert private.accuracy != plain.accuracy
