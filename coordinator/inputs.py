"""Load a round's books inputs: its stored model and updates, in the chain's commit order.

The one place that turns the data directory (and the ledger's ``committersOf``) into
``RoundInputs``; the coordinator and ``fedledger audit`` both call it, so they close the books on
the same inputs.
"""

from __future__ import annotations

import itertools

import torch

from fedledger import wire
from fedledger.coordinator.books import PUBLIC_STEPS, RoundInputs, UpdateInput
from fedledger.coordinator.store import Store
from fedledger.errors import CoordinatorError, ErrorCode
from fedledger.incentive.commitment import decode_tensors, specs_of
from fedledger.incentive.compression import Codec


def load_tensors(store: Store, digest_hex: str) -> dict[str, torch.Tensor]:
    """The tensors stored under ``digest_hex`` (an update or a global model)."""
    data = store.get_blob(digest_hex)
    if data is None:
        raise CoordinatorError(
            ErrorCode.MISSING_BLOB, f"stored tensors {digest_hex} are missing from {store.data_dir}"
        )
    return decode_tensors(data)


def load_round_inputs(
    store: Store,
    round_id: int,
    commit_order: list[str],
    model: torch.nn.Module,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    codec: Codec | None = None,
) -> RoundInputs:
    """Round ``round_id``'s inputs from ``store``; reads only.

    ``commit_order`` is the chain's order of the round's commitments (``committersOf``): it
    decides who is the original of a copied update, so the updates come in that order. The
    updates are stored as uploaded, encoded by the task's ``codec``; the books see them decoded.
    """
    stored = store.get_round(round_id)
    if stored is None:
        raise CoordinatorError(
            ErrorCode.MISSING_ROUND, f"round {round_id} is not in the store at {store.data_dir}"
        )
    order = {org.lower(): i for i, org in enumerate(commit_order)}
    uploads = sorted(
        store.updates_for(round_id), key=lambda u: order.get(u.organisation.lower(), len(order))
    )

    base = load_tensors(store, stored.model_hash)
    specs = specs_of(base)
    codec = codec or Codec()

    def update(digest_hex: str) -> dict[str, torch.Tensor]:
        data = store.get_blob(digest_hex)
        if data is None:
            raise CoordinatorError(
                ErrorCode.MISSING_BLOB,
                f"stored update {digest_hex} is missing from {store.data_dir}",
            )
        return codec.decode(data, specs)

    def previous(org: str) -> dict[str, torch.Tensor] | None:
        earlier = store.get_update(round_id - 1, org) if round_id > 1 else None
        return None if earlier is None else update(earlier.update_hash)

    before = store.get_round(round_id - 1) if round_id > 1 else None
    flags_before = {
        o.organisation.lower(): o.flags
        for o in (
            wire.RoundResult.model_validate(before.result).organisations
            if before is not None and before.result is not None
            else []
        )
    }

    return RoundInputs(
        round_id=round_id,
        model=model,
        base=base,
        updates=[
            UpdateInput(
                organisation=u.organisation,
                update_hash=u.update_hash,
                num_samples=u.num_samples,
                delta=update(u.update_hash),
                previous=previous(u.organisation),
                previous_flags=flags_before.get(u.organisation.lower(), 0),
            )
            for u in uploads
        ],
        x_val=x_val,
        y_val=y_val,
        public_steps=public_steps(store, round_id, base),
    )


def public_steps(
    store: Store, round_id: int, base: dict[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """The global steps that led to round ``round_id``'s model, newest first (``PUBLIC_STEPS``
    at most): w_r - w_{r-1}, w_{r-1} - w_{r-2}, from the models the store served."""
    models = [base]
    for earlier in range(round_id - 1, max(0, round_id - 1 - PUBLIC_STEPS), -1):
        stored = store.get_round(earlier)
        if stored is None:
            break
        models.append(load_tensors(store, stored.model_hash))
    return [{n: newer[n] - older[n] for n in newer} for newer, older in itertools.pairwise(models)]
