"""Local differential privacy: DP-SGD per record with Opacus, and the node's privacy ledger.

Each round the node trains with Opacus's per-sample gradients, clipped to ``max_grad_norm`` and
noised with ``noise_multiplier`` x that bound (Abadi et al. 2016, "Deep Learning with
Differential Privacy", Algorithm 1), on Poisson-sampled batches. Opacus's accountant (RDP,
Mironov 2017; or PRV, Gopi et al. 2021) composes every step the node has ever taken on its
data: ``PrivacyLedger`` keeps each round's (noise multiplier, sample rate, steps), persisted
in a file so a restarted node neither forgets what it spent nor counts a round twice, and
refuses a round that would take epsilon past the consortium's budget.

The privacy unit is one record (row) of the organisation's data; the guarantee covers what
leaves the node (the updates), against anyone who sees them: the coordinator, other members,
the public. It does not cover the sample count sent with each update, nor records repeated in
the data (a patient with ten rows is protected as ten records, i.e. less).

The noise must be unpredictable to whoever sees the update, yet a restarted node must redraw
the same noise for an update it already committed on-chain. So each round's noise (and batch
sampling) is seeded from a 32-byte secret drawn with ``os.urandom`` when the ledger is created
and kept in the ledger file (mode 0600), hashed with the round number. The generator it seeds
is torch's Mersenne Twister, not a cryptographic one: Opacus's ``secure_mode`` needs
torchcsprng, which has no build for this torch; a deployment that needs a CSPRNG against an
adversary able to reconstruct generator state must add it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedledger.errors import ErrorCode, TaskError
from fedledger.incentive.utility import loss_function
from fedledger.tasks.spec import PrivacySection
from fedledger.tasks.training import LocalResult, TrainConfig

# Opacus's hooks fire on the output of a first layer whose input needs no gradient: harmless,
# and said once per step otherwise (catch_warnings is not thread-safe, so not scoped).
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class PrivacyBudgetSpent(TaskError):
    """Training one more round would take the node's epsilon past the consortium's budget."""


@dataclass(frozen=True)
class Spent:
    """What the node has spent after a round: epsilon at the spec's delta, of the budget."""

    epsilon: float
    delta: float
    budget: float
    rounds: int


class PrivacyLedger:
    """Every DP-SGD round this node trained, composed by Opacus's accountant."""

    def __init__(self, privacy: PrivacySection, path: Path | None = None) -> None:
        self.privacy = privacy
        self.path = path
        self.rounds: dict[int, tuple[float, float, int]] = {}
        self.secret = os.urandom(32)
        if path is not None and path.exists():
            try:
                stored = json.loads(path.read_text())
                self.secret = bytes.fromhex(stored["secret"])
                self.rounds = {
                    int(r): (float(a), float(b), int(c))
                    for r, (a, b, c) in stored["rounds"].items()
                }
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TaskError(
                    ErrorCode.BAD_SPEC,
                    f"the privacy ledger {path} is unreadable ({exc}); it records the epsilon "
                    "this node has spent: restore it, do not delete it",
                ) from None

    def epsilon(self, extra: tuple[float, float, int] | None = None) -> float:
        """Epsilon at the spec's delta over every recorded round (and ``extra``, if given)."""
        from opacus.accountants import create_accountant

        history = [self.rounds[r] for r in sorted(self.rounds)]
        if extra is not None:
            history.append(extra)
        if not history:
            return 0.0
        accountant = create_accountant(mechanism=self.privacy.accountant)
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=self.privacy.delta))

    def noise_seed(self, round_id: int) -> int:
        """Round ``round_id``'s seed of noise and batches: secret, and the same after a restart."""
        digest = hashlib.sha256(self.secret + round_id.to_bytes(8, "big")).digest()
        return int.from_bytes(digest[:8], "big") >> 1  # torch takes a non-negative 63-bit seed

    def spent(self) -> Spent:
        return Spent(self.epsilon(), self.privacy.delta, self.privacy.epsilon, len(self.rounds))

    def charge(
        self, round_id: int, num_samples: int, *, epochs: int, batch_size: int
    ) -> tuple[float, float, int]:
        """Record round ``round_id``'s steps (once: a retrained round costs nothing more), or
        refuse with ``PrivacyBudgetSpent`` if they would take epsilon past the budget."""
        if round_id in self.rounds:
            return self.rounds[round_id]
        entry = self.check_next(
            num_samples, epochs=epochs, batch_size=batch_size, what=f"round {round_id}"
        )
        self.rounds[round_id] = entry
        self.save()
        return entry

    def check_next(
        self, num_samples: int, *, epochs: int, batch_size: int, what: str = "another round"
    ) -> tuple[float, float, int]:
        """The accountant's entry of one more round, or ``PrivacyBudgetSpent`` if it would take
        epsilon past the budget (a node checks this at start-up, before anything is sent)."""
        batches = math.ceil(num_samples / batch_size)  # Opacus: sample rate 1 / batches
        entry = (self.privacy.noise_multiplier, 1.0 / batches, epochs * batches)
        projected = self.epsilon(entry)
        if projected > self.privacy.epsilon:
            raise PrivacyBudgetSpent(
                ErrorCode.PRIVACY_BUDGET_SPENT,
                f"{what} would take this node's epsilon to {projected:.3f} (delta "
                f"{self.privacy.delta:g}), past the budget of {self.privacy.epsilon:g}: it "
                f"stops training ({self.spent().epsilon:.3f} spent over {len(self.rounds)} "
                "rounds)",
                epsilon=self.spent().epsilon,
                budget=self.privacy.epsilon,
            )
        return entry

    def save(self) -> None:
        """Write the ledger (and its secret) atomically, readable by this user only."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        document = {
            "accountant": self.privacy.accountant,
            "secret": self.secret.hex(),
            "rounds": self.rounds,
        }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle)
        tmp.replace(self.path)


def train_private(
    model: nn.Module,
    global_params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    privacy: PrivacySection,
    *,
    device: torch.device | None = None,
) -> LocalResult:
    """DP-SGD from ``global_params`` on (x, y) with Opacus: per-sample clipping and Gaussian
    noise, Poisson-sampled batches; seeded by ``config.seed``, so reproducible on CPU."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedledger.devices import resolve_device

    num_samples = int(y.shape[0])
    if num_samples == 0:
        raise ValueError("this organisation has no training samples; nothing to train on")
    device = resolve_device(device)
    local = copy.deepcopy(model).to(device)
    local.load_state_dict({n: t.to(device) for n, t in global_params.items()})
    optimiser: torch.optim.Optimizer = (
        torch.optim.Adam(local.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if config.optimiser == "adam"
        else torch.optim.SGD(
            local.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    )
    loader = DataLoader(TensorDataset(x.to(device), y.to(device)), batch_size=config.batch_size)
    loss_fn = loss_function(config.loss)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # see the docstring
        torch.manual_seed(config.seed)  # Poisson sampling draws from the global generator
        engine = PrivacyEngine(accountant=privacy.accountant, secure_mode=False)
        private, optimiser, loader = engine.make_private(
            module=local,
            optimizer=optimiser,
            data_loader=loader,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator(device=device).manual_seed(config.seed),
        )
        private.train()
        last_epoch_loss = 0.0
        for _ in range(config.epochs):
            total, seen = 0.0, 0
            for xb, yb in loader:
                if len(yb) == 0:
                    continue  # Poisson sampling can draw an empty batch
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(private(xb), yb)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                total += float(loss.detach()) * len(yb)
                seen += len(yb)
            last_epoch_loss = total / max(seen, 1)
    trained = {n: t.detach() for n, t in local.state_dict().items()}
    delta = {
        n: (trained[n] - global_params[n].to(device)).to("cpu").contiguous() for n in global_params
    }
    return LocalResult(delta=delta, num_samples=num_samples, loss=last_epoch_loss)
