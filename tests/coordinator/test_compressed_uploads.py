"""Compressed updates end to end through the coordinator: nodes commit and upload the encoded
bytes of the spec's ``[compression]``, the coordinator decodes them the same way, refuses any
other encoding, prices the decoded update and an auditor closes the same books."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedledger.coordinator.audit import audit_round
from fedledger.incentive.commitment import canonical_bytes, decode_tensors, keccak, specs_of
from fedledger.incentive.compression import Codec, FeedbackFile, compress
from fedledger.tasks import BUILTIN_DIGITS, DigitsTask, load_spec

COMPRESSION = {
    "int8": '\n[compression]\nscheme = "int8"\n',
    "topk": ('\n[compression]\nscheme = "topk"\nfraction = 0.1\n'),
}


def spec_with(tmp_path: Path, scheme: str) -> Path:
    path = tmp_path / f"{scheme}.toml"
    path.write_bytes(BUILTIN_DIGITS.read_bytes() + COMPRESSION[scheme].encode())
    return path


@pytest.mark.parametrize("scheme", ["int8", "topk"])
def test_nodes_send_and_the_coordinator_prices_the_compressed_update(
    make_harness: Callable[..., object], tmp_path: Path, scheme: str
) -> None:
    from fedledger.coordinator.api import create_app
    from fedledger.demo import serve_in_thread
    from fedledger.node.client import CoordinatorClient
    from fedledger.node.runner import NodeRunner

    spec_file = spec_with(tmp_path, scheme)
    harness = make_harness(total_rounds=2, task_spec=spec_file)
    harness.service.start_driver()  # type: ignore[attr-defined]
    task = DigitsTask(load_spec(spec_file))
    with serve_in_thread(create_app(harness.service)) as url:  # type: ignore[attr-defined]
        runners = [
            NodeRunner(
                CoordinatorClient(url),
                harness.org_ledger(org),  # type: ignore[attr-defined]
                task,
                task.load_data(f"{k}/3"),
                seed=k,
                feedback=FeedbackFile(Codec.of(task.spec.compression), tmp_path / f"fb-{k}.st"),
                poll_interval_s=0.02,
                clock=lambda: harness.clock[0],  # type: ignore[attr-defined]
            )
            for k, org in enumerate(harness.orgs)  # type: ignore[attr-defined]
        ]
        threads = [threading.Thread(target=r.run) for r in runners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    service = harness.service  # type: ignore[attr-defined]
    store = service.store
    for round_id in (1, 2):
        result = service.round_result(round_id)
        assert result.status == "finalized"
        accepted = [o for o in result.organisations if o.status == "accepted"]
        assert len(accepted) == 3 and not any(o.flags for o in accepted)
        for o in accepted:
            # Stored as uploaded: the encoding, whose keccak is the on-chain commitment.
            body = store.get_blob(o.update_hash)
            assert body is not None and "0x" + keccak(body).hex() == o.update_hash
            suffix = ".q" if scheme == "int8" else ".idx"
            assert all(name.endswith((suffix, ".scale", ".val")) for name in decode_tensors(body))
            commitment = harness.ledger.commitment_of(round_id, o.organisation)  # type: ignore[attr-defined]
            assert "0x" + commitment.update_hash.hex() == o.update_hash
        report = audit_round(round_id, harness.ledger, store.data_dir)  # type: ignore[attr-defined]
        assert report.ok, report
    assert service.round_result(2).validation_accuracy > 0.5


def test_an_encoding_other_than_the_spec_s_is_refused(
    make_harness: Callable[..., object], tmp_path: Path
) -> None:
    """A dense float32 update (or int8 to a top-k task) is refused with bad_encoding before
    anything is stored; the right encoding of the same update is then accepted."""
    harness = make_harness(task_spec=spec_with(tmp_path, "topk"))
    org = harness.orgs[0]  # type: ignore[attr-defined]
    delta = harness.delta(seed=1)  # type: ignore[attr-defined]
    dense = harness.make_upload(org, body=canonical_bytes(delta))  # type: ignore[attr-defined]
    other = harness.orgs[1]  # type: ignore[attr-defined]
    upload = harness.make_upload(other, body=canonical_bytes(compress(delta, "int8")))  # type: ignore[attr-defined]
    good = harness.make_upload(harness.orgs[2], body=canonical_bytes(compress(delta, "topk", 0.1)))  # type: ignore[attr-defined]
    response = harness.post(dense)  # type: ignore[attr-defined]
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "bad_encoding"
    response = harness.post(upload)  # type: ignore[attr-defined]
    assert response.json()["code"] == "bad_encoding"
    assert "top-k encoding does not match the model" in response.json()["message"]
    assert harness.post(good).status_code == 201  # type: ignore[attr-defined]


def test_a_restarted_node_re_encodes_a_committed_round_exactly(tmp_path: Path) -> None:
    """Error feedback makes round r's bytes depend on what earlier rounds held back: the file
    gives a restarted node the same residual, so the same delta gives the committed bytes."""
    codec = Codec("topk", 0.1)
    path = tmp_path / "feedback.st"
    generator = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(20, 5, generator=generator)} for _ in range(3)]
    node = FeedbackFile(codec, path)
    first = canonical_bytes(node.encode(1, deltas[0]))
    second = canonical_bytes(node.encode(2, deltas[1]))
    restarted = FeedbackFile(codec, path)  # crashed after committing round 2
    assert canonical_bytes(restarted.encode(2, deltas[1])) == second
    assert canonical_bytes(FeedbackFile(codec, path).encode(3, deltas[2])) != canonical_bytes(
        FeedbackFile(codec).encode(3, deltas[2])
    )  # round 3 carries what rounds 1 and 2 held back
    assert first != canonical_bytes(compress(deltas[1], "topk", 0.1))
    assert path.stat().st_mode & 0o777 == 0o600
    assert specs_of(restarted.after) == specs_of(deltas[0])
