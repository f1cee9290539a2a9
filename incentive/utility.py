"""Batched coalition utility of a PyTorch model: every coalition's aggregated model scored at once."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from fedledger.devices import resolve_device
from fedledger.incentive.onchain import METRICS, Metric
from fedledger.incentive.tensors import flatten, unflatten_batched


def capped_weights(num_samples: Sequence[int], max_share: float) -> list[float]:
    """FedAvg's weights n_k / n, none above ``max_share``: water-filling.

    The updates whose share would pass the cap get exactly ``max_share``; the others share
    what is left in proportion to their counts, repeated until no share passes the cap (at
    most K rounds). A cap below 1/K cannot be met and gives the uniform 1/K. The weights sum
    to 1 (up to float rounding), keep the counts' order, and equal n_k / n when nobody is
    above the cap. A declared count is the organisation's own word (the ledger takes any
    positive number): the cap bounds what a false one buys.
    """
    if not (0 < max_share <= 1) or math.isnan(max_share):
        raise ValueError(f"max_share must be in (0, 1], got {max_share!r}")
    count = len(num_samples)
    cap = max(max_share, 1.0 / count) if count else max_share
    capped: set[int] = set()
    while True:
        free = [k for k in range(count) if k not in capped]
        left = 1.0 - cap * len(capped)
        free_total = sum(int(num_samples[k]) for k in free)
        over = [k for k in free if left * int(num_samples[k]) > cap * free_total]
        if not over:
            break
        capped.update(over)
    return [cap if k in capped else left * int(num_samples[k]) / free_total for k in range(count)]


def coalition_weights(
    masks: np.ndarray, num_samples: Sequence[int], max_multiple: float | None = None
) -> Tensor:
    """a[S, k] = n_k / n_S for k in S, else 0 (float32, shape (C, K)); the empty coalition's row is 0.

    These are the FedAvg weights of McMahan et al. (2017), eq. (1), restricted to coalition S;
    with ``max_multiple``, capped in each coalition as the aggregate caps them
    (``capped_weights`` with a share of at most ``max_multiple`` / |S|).
    """
    masks = np.asarray(masks)
    if masks.dtype != np.bool_ or masks.ndim != 2:
        raise ValueError(f"masks must be a 2-D bool array, got {masks.dtype} {masks.shape}")
    if masks.shape[1] != len(num_samples):
        raise ValueError(
            f"masks have {masks.shape[1]} players but {len(num_samples)} sample counts were given"
        )
    n = _sample_counts(num_samples)
    if max_multiple is not None:
        return torch.from_numpy(_capped_rows(masks, num_samples, max_multiple).astype(np.float32))
    in_s = masks * n[None, :]
    n_s = in_s.sum(axis=1, keepdims=True)
    weights = np.divide(in_s, n_s, out=np.zeros_like(in_s), where=n_s > 0)
    return torch.from_numpy(weights.astype(np.float32))


def _capped_rows(masks: np.ndarray, num_samples: Sequence[int], max_multiple: float) -> np.ndarray:
    """``capped_weights`` of each row's members with a share of at most ``max_multiple`` / |S|,
    all rows at once (float64, shape (C, K)): the same water-filling, operation for operation,
    so the weights are the same floats; a loop over 2^K coalitions in Python was a tenth of an
    exact valuation."""
    if not max_multiple > 0:
        raise ValueError(f"max_multiple must be > 0, got {max_multiple!r}")
    counts = np.asarray([int(c) for c in num_samples], dtype=np.int64)
    sizes = masks.sum(axis=1)
    members = np.maximum(sizes, 1)  # an empty row's cap is never used: it has no members
    cap = np.maximum(np.minimum(1.0, max_multiple / members), 1.0 / members)[:, None]  # (C, 1)
    capped = np.zeros(masks.shape, dtype=np.bool_)
    while True:
        free = masks & ~capped
        left = 1.0 - cap * capped.sum(axis=1, keepdims=True)
        free_total = (free * counts).sum(axis=1, keepdims=True)
        over = free & (left * counts > cap * free_total)
        if not over.any():
            break
        capped |= over
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 where no member is free
        shares = left * counts / free_total
    weights: np.ndarray = np.where(capped, cap, np.where(free, shares, 0.0))
    return weights


def _sample_counts(num_samples: Sequence[int]) -> np.ndarray:
    for k, n in enumerate(num_samples):
        if n <= 0:
            raise ValueError(f"organisation {k} has num_samples={n}; sample counts must be > 0")
    return np.asarray(num_samples, dtype=np.float64)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")


def per_sample_scores(logits: Tensor, y: Tensor, metric: Metric) -> Tensor:
    """Each validation sample's score (float64, shape (n,)); the utility is their mean.

    accuracy: 1 if the sample is classified right; neg_log_loss: minus its cross-entropy;
    neg_brier: minus the squared distance of its predicted probabilities from the one-hot label
    (Brier 1950), in [-2, 0]; neg_mse: minus the squared error of a one-output regression model.
    """
    if metric == "neg_mse":
        error = logits.to(torch.float64).reshape(y.shape) - y.to(torch.float64)
        return -(error**2)
    if metric == "accuracy":
        return (logits.argmax(dim=-1) == y).to(torch.float64)
    logits = logits.to(torch.float64)
    if metric == "neg_log_loss":
        # log softmax(logits)[y]: minus F.cross_entropy(reduction="none") to 1e-15, in half the
        # time on a CPU (its per-row kernel was half of an exact valuation's on digits).
        picked = torch.gather(logits, -1, y.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    if metric == "neg_brier":
        probabilities = torch.softmax(logits, dim=-1)
        one_hot = F.one_hot(y, num_classes=logits.shape[-1]).to(torch.float64)
        return -((probabilities - one_hot) ** 2).sum(dim=-1)
    _check_metric(metric)
    raise AssertionError("unreachable")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_names(model: torch.nn.Module, params: Mapping[str, Tensor], what: str) -> None:
    expected = set(model.state_dict())
    if set(params) != expected:
        missing = sorted(expected - set(params))
        extra = sorted(set(params) - expected)
        raise ValueError(f"{what} does not match the model: missing {missing}, unexpected {extra}")


def evaluate_params(
    model: torch.nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    metric: Metric,
) -> float:
    """The utility of ``model`` with state ``params`` on (x, y), evaluated on x's device, eval mode."""
    _check_names(model, params, "params")
    on_device = {name: t.to(x.device) for name, t in params.items()}
    with torch.no_grad(), _eval_mode(model):
        logits = functional_call(model, on_device, (x,))
        return float(per_sample_scores(logits, y.to(x.device), metric).mean())


def loss_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The mean training loss called ``name``: cross-entropy of logits against class indices, or
    the squared error of a one-output regression model (shape (n,) or (n, 1)) against targets.
    Local training minimises it; ``descent_direction`` differentiates it."""
    if name == "cross_entropy":
        return torch.nn.CrossEntropyLoss()
    if name == "mse":
        mse = torch.nn.MSELoss()
        return lambda output, target: mse(output.reshape(target.shape), target)
    raise ValueError(f"unknown loss {name!r}; expected cross_entropy or mse")


def descent_direction(
    model: torch.nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    regression: bool = False,
) -> dict[str, Tensor]:
    """Minus the gradient of the mean training loss on (x, y) at ``params`` (eval mode): the
    direction an update trained on data like (x, y) points in, to first order. The loss is the
    cross-entropy, or the squared error with ``regression``. Tensors that are not floating point
    (counters, masks) get zeros."""
    _check_names(model, params, "params")
    floating = {n: t.detach() for n, t in params.items() if t.is_floating_point()}
    fixed = {n: t for n, t in params.items() if not t.is_floating_point()}
    targets = y.to(x.device, torch.float32 if regression else torch.int64)
    training_loss = loss_function("mse" if regression else "cross_entropy")

    # Plain autograd, not torch.func.grad: that one imports torch._dynamo (2 s) on first use.
    leaves = {n: t.clone().requires_grad_(True) for n, t in floating.items()}
    with torch.enable_grad(), _eval_mode(model):
        value = training_loss(functional_call(model, {**fixed, **leaves}, (x,)), targets)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    gradient = {
        n: torch.zeros_like(t) if g is None else g.detach()
        for (n, t), g in zip(leaves.items(), grads, strict=True)
    }
    return {n: -gradient[n] if n in gradient else torch.zeros_like(t) for n, t in params.items()}


MAX_BATCH_FLOATS = 1 << 26
"""Parameters of the coalition models scored in one batch, at most (256 MiB of float32):
a batch's forward pass holds activations of every model at once, so large models go in
smaller batches."""


ELEMENTWISE = (
    torch.nn.ReLU,
    torch.nn.LeakyReLU,
    torch.nn.ELU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Tanh,
    torch.nn.Sigmoid,
    torch.nn.Softplus,
    torch.nn.Identity,
    torch.nn.Dropout,  # the identity in eval mode, where coalitions are scored
)
"""Modules an MLP's layers may be joined with for ``mlp_layers``: they act on each number
alone, whatever the tensor's shape."""

MlpLayers = list[str | Callable[[Tensor], Tensor]]
"""An MLP as ``mlp_layers`` sees it: a Linear layer's name, or an elementwise function that
may overwrite its input (which the layer before made)."""


def mlp_layers(model: torch.nn.Module) -> MlpLayers | None:
    """``model``'s layers when it is an MLP (an ``nn.Sequential`` of ``nn.Linear`` layers and
    ``ELEMENTWISE`` modules, starting with a Linear, without buffers), else None.

    Such a model's coalition models are scored with batched matrix products and activations
    applied in place (``batched_mlp``): for a 64-13,333-10 MLP about three times faster than
    ``vmap`` over ``functional_call``, whose activations allocate a new batch of hidden
    states each (1.3 GB for 67 models on 360 samples)."""
    if type(model) is not torch.nn.Sequential or any(True for _ in model.buffers()):
        return None
    layers: MlpLayers = []
    for name, module in model.named_children():
        if type(module) is torch.nn.Linear:
            layers.append(name)
        elif type(module) not in ELEMENTWISE or not layers:
            return None
        elif type(module) not in (torch.nn.Identity, torch.nn.Dropout):
            layers.append(_in_place(module))
    return layers


def _in_place(module: torch.nn.Module) -> Callable[[Tensor], Tensor]:
    """``module`` as a function that may overwrite its input (a copy: ``module`` is kept)."""
    if type(module) is torch.nn.Tanh:
        return torch.tanh_
    if type(module) is torch.nn.Sigmoid:
        return torch.sigmoid_
    if hasattr(module, "inplace"):  # ReLU, LeakyReLU, ELU, SiLU
        twin = copy.copy(module)
        setattr(twin, "inplace", True)  # noqa: B010 (an attribute the type does not declare)
        return twin
    return module  # GELU, Softplus: no in-place form


FirstRows = Callable[[int, int], Tensor]
"""Rows ``start:stop`` of a batch of MLPs' first-layer weights, shape (c, stop - start, in)."""


def batched_mlp(
    layers: MlpLayers,
    params: Mapping[str, Tensor],
    x: Tensor,
    scratch: dict[str, Tensor] | None = None,
    *,
    first_rows: FirstRows | None = None,
    tile: int | None = None,
) -> Tensor:
    """The outputs (c, n, out) of c MLPs whose parameters are batched (``params[name]`` of
    shape (c, *shape)) on the same inputs ``x`` (n, in).

    Hidden states are kept features first, (c, features, n): each layer is then W @ h with
    both operands as laid out, which BLAS runs about 1.6 times faster than h @ W^T with a
    transposed weight (a 64-13,333 first layer on 360 samples). With ``scratch``, each
    layer's outputs are written into the buffer kept there under its name (``scratch_buffer``):
    a batch of hidden states is often gigabytes, and writing it to fresh memory costs more
    than the product that fills it. The result is then a view of that buffer, overwritten by
    the next call.

    With ``first_rows`` (in place of the first layer's weight in ``params``), an MLP of two or
    more Linear layers computes its first hidden layer ``tile`` units at a time (all of them
    when ``tile`` is None): each tile of hidden states goes through the activations and into
    the second layer's product (accumulated over tiles) while it is still in cache. The first
    layer's hidden states (c x width x n floats) then never exist whole, and neither do its
    weights if ``first_rows`` builds them a tile at a time. Rows of ``in + 1`` columns carry
    the first layer's bias in their last (``params`` then has none for it): the inputs get a
    row of ones, and the bias is added by the product itself.
    """
    count = next(iter(params.values())).shape[0]
    h = x.t().contiguous().expand(count, x.shape[1], x.shape[0])  # (c, in, n)
    if first_rows is not None:
        h, layers = _tiled_first_layers(layers, params, h, first_rows, tile, scratch)
    for layer in layers:
        if not isinstance(layer, str):
            h = layer(h)
            continue
        weight = params[f"{layer}.weight"]  # (c, out, in); h is new from here
        shape = (count, weight.shape[1], x.shape[0])
        h = torch.bmm(weight, h, out=_output_buffer(scratch, layer, shape, h))
        bias = params.get(f"{layer}.bias")
        if bias is not None:
            h.add_(bias.unsqueeze(2))
    return h.transpose(1, 2)


def _tiled_first_layers(
    layers: MlpLayers,
    params: Mapping[str, Tensor],
    x: Tensor,
    first_rows: FirstRows,
    tile: int | None,
    scratch: dict[str, Tensor] | None,
) -> tuple[Tensor, MlpLayers]:
    """The second Linear layer's outputs (c, out, n) from inputs ``x`` (c, in, n), the first
    layer a tile of units at a time (``batched_mlp``), and the layers still to run."""
    first = layers[0]
    linear = [k for k, layer in enumerate(layers) if isinstance(layer, str)]
    if not isinstance(first, str) or len(linear) < 2:
        raise ValueError("first_rows needs an MLP of at least two Linear layers")
    second = layers[linear[1]]
    assert isinstance(second, str)
    between = [layer for layer in layers[1 : linear[1]] if not isinstance(layer, str)]
    weight = params[f"{second}.weight"]  # (c, out, width)
    count, width, n = weight.shape[0], weight.shape[2], x.shape[2]
    step = width if tile is None else max(1, min(tile, width))
    shape = (count, weight.shape[1], n)
    out = _output_buffer(scratch, second, shape, x)
    bias = params.get(f"{second}.bias")
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.unsqueeze(2).expand(shape))
    first_bias = params.get(f"{first}.bias")
    ones = torch.ones(1, n, dtype=x.dtype, device=x.device)
    augmented = torch.cat([x[0], ones]).expand(count, x.shape[1] + 1, n)
    for start in range(0, width, step):
        stop = min(width, start + step)
        shape = (count, stop - start, n)
        rows = first_rows(start, stop)
        with_bias = rows.shape[2] == x.shape[1] + 1
        if with_bias and first_bias is not None:
            raise ValueError(f"the first layer's bias is in its rows and in params[{first}.bias]")
        inputs = augmented if with_bias else x
        h = torch.bmm(rows, inputs, out=_output_buffer(scratch, first, shape, x))
        if first_bias is not None:
            h.add_(first_bias[:, start:stop].unsqueeze(2))
        for activation in between:
            h = activation(h)
        out.baddbmm_(weight[:, :, start:stop], h)
    return out, layers[linear[1] + 1 :]


def _output_buffer(
    scratch: dict[str, Tensor] | None, layer: str, shape: tuple[int, ...], like: Tensor
) -> Tensor:
    """Where ``layer``'s outputs go: the scratch buffer named after it (module names have no
    dots, so no other buffer's name is taken), else fresh memory."""
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return scratch_buffer(scratch, f"{layer}.out", shape, like)


def scratch_buffer(
    scratch: dict[str, Tensor], name: str, shape: tuple[int, ...], like: Tensor
) -> Tensor:
    """A contiguous tensor of ``shape`` on the memory kept in ``scratch`` under ``name``, made
    (or remade larger) as needed: a batch's last, smaller chunk reuses the full batch's
    memory. Its contents are whatever the last user left there."""
    size = math.prod(shape)
    buffer = scratch.get(name)
    if (
        buffer is None
        or buffer.numel() < size
        or buffer.dtype != like.dtype
        or buffer.device != like.device
    ):
        buffer = scratch[name] = torch.empty(size, dtype=like.dtype, device=like.device)
    return buffer[:size].view(shape)


def default_max_batch(num_params: int) -> int:
    """Coalition models per batch for a model of ``num_params`` parameters (1 to 256)."""
    return max(1, min(256, MAX_BATCH_FLOATS // max(num_params, 1)))


class CoalitionUtility:
    """U(S) = metric of w_r + eta * sum_{k in S} a[S, k] delta_k on the validation set.

    a[S, k] = n_k / n_S (``coalition_weights``), capped at ``max_multiple`` / |S| when given.
    With ``rescale_steps`` each coalition's step sum_k a[S, k] delta_k is rescaled to the length
    of the whole consortium's (S = N): the game then compares where the coalitions' data points
    the model, not how far their local training happened to carry it.

    The empty coalition is the global model w_r. A call scores a chunk of ``max_batch``
    coalitions with one matrix product and one ``vmap``-ed forward pass; it is a
    ``BatchUtility`` for ``fedledger.incentive.shapley``. Model buffers come from ``base`` too.
    With ``per_sample`` a call returns every validation sample's score, shape (C, n): the game
    is then vector-valued, one game per validation sample, whose mean is the game above.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        base: Mapping[str, Tensor],
        deltas: Sequence[Mapping[str, Tensor]],
        num_samples: Sequence[int],
        x_val: Tensor,
        y_val: Tensor,
        *,
        eta: float = 1.0,
        metric: Metric = "accuracy",
        device: torch.device | None = None,
        max_batch: int | None = None,
        per_sample: bool = False,
        max_multiple: float | None = None,
        rescale_steps: bool = False,
    ) -> None:
        if len(deltas) != len(num_samples):
            raise ValueError(f"{len(deltas)} deltas but {len(num_samples)} sample counts")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        _check_metric(metric)
        _check_names(model, base, "base")
        for k, delta in enumerate(deltas):
            _check_like(base, delta, f"delta {k}")
        _sample_counts(num_samples)
        self.model = model
        self.num_samples = list(num_samples)
        self.eta = float(eta)
        self.metric: Metric = metric
        self.per_sample = per_sample
        self.max_multiple = max_multiple
        self.device = resolve_device(device)
        num_params = sum(t.numel() for t in base.values())
        self.max_batch = max_batch if max_batch is not None else default_max_batch(num_params)
        self.evaluations = 0
        # Told (coalitions scored, coalitions asked) after each batch of a call.
        self.on_progress: Callable[[int, int], None] | None = None
        self._like = {name: t.detach() for name, t in base.items()}
        # An MLP is scored with batched matrix products; any other model with vmap. An MLP of
        # two or more Linear layers builds its first layer a tile of units at a time
        # (``batched_mlp``'s first_rows): that layer goes last in the flat layout, each unit's
        # weights followed by its bias, so that a tile of units is a block of columns. The
        # rest of the model comes first, in sorted-name order, and is built in one product.
        self._mlp = mlp_layers(model)
        self._rows: tuple[str, str | None] | None = None
        if self._mlp is not None and sum(isinstance(layer, str) for layer in self._mlp) >= 2:
            weight, bias = f"{self._mlp[0]}.weight", f"{self._mlp[0]}.bias"
            self._rows = (weight, bias if bias in base else None)
        self._built_like = {
            name: t
            for name, t in self._like.items()
            if self._rows is None or name not in self._rows
        }
        self._built = sum(t.numel() for t in self._built_like.values())
        self._base_flat = self._flat(base).to(self.device)  # (P,)
        num_params = self._base_flat.numel()
        # (K, P), written row by row: a list of K flat copies beside it would double its memory.
        self._deltas = torch.empty(len(deltas), num_params, device=self.device)
        for k, delta in enumerate(deltas):
            self._deltas[k].copy_(self._flat(delta))
        self._x = x_val.to(self.device)
        self._y = y_val.to(self.device, torch.int64)
        # The coalition models of a batch, and the MLP path's hidden states, reused from batch
        # to batch: fresh memory for them costs page faults on every call.
        self._scratch: dict[str, Tensor] = {}
        self.path = "batched-mlp" if self._mlp is not None else "vmap"
        # With rescale_steps, every coalition's step has the whole consortium's length. The
        # length of a step a @ deltas is sqrt(a G a^T) with G the deltas' Gram matrix (K x K,
        # float64), so a batch's models are built in one pass, already rescaled.
        self._reference: float | None = None
        self._gram: Tensor | None = None
        if rescale_steps and self.num_players:
            self._gram = _gram(self._deltas)
            everyone = np.ones((1, self.num_players), dtype=bool)
            full = coalition_weights(everyone, self.num_samples, max_multiple).to(self.device)
            self._reference = float(self._step_lengths(full)[0])

    def _flat(self, params: Mapping[str, Tensor]) -> Tensor:
        """``params`` in this utility's flat layout (float32, shape (P,))."""
        built = flatten({name: params[name] for name in self._built_like})
        if self._rows is None:
            return built
        weight, bias = self._rows
        rows = params[weight].detach().to(torch.float32)
        if bias is not None:
            rows = torch.cat([rows, params[bias].detach().to(torch.float32).unsqueeze(1)], dim=1)
        return torch.cat([built, rows.reshape(-1)])

    def _tile(self, count: int) -> int | None:
        """First-layer units a tile for a batch of ``count`` models: ``TILE_FLOATS`` on a
        CPU; a GPU takes the whole layer at once (it has no such cache to keep a tile in)."""
        if self.device.type != "cpu":
            return None
        return max(1, TILE_FLOATS // max(1, count * self._y.shape[0]))

    @property
    def num_players(self) -> int:
        return int(self._deltas.shape[0])

    def _step_lengths(self, weights: Tensor) -> Tensor:
        """||weights[c] @ deltas|| for each row, from the Gram matrix (float64, shape (c,))."""
        assert self._gram is not None
        a = weights.to(torch.float64)
        squared = ((a @ self._gram) * a).sum(dim=1)
        return squared.clamp(min=0.0).sqrt()

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """U(S) for every row of ``masks`` (bool, shape (C, K)), as float64 shape (C,), or
        (C, n) per validation sample with ``per_sample``."""
        masks = np.asarray(masks)
        if masks.ndim != 2 or masks.shape[1] != self.num_players:
            raise ValueError(
                f"masks must have shape (C, {self.num_players}), got {tuple(masks.shape)}"
            )
        shape = (masks.shape[0], self._y.shape[0]) if self.per_sample else (masks.shape[0],)
        out = np.empty(shape, dtype=np.float64)
        for start in range(0, masks.shape[0], self.max_batch):
            chunk = masks[start : start + self.max_batch]
            out[start : start + chunk.shape[0]] = self._evaluate_chunk(chunk)
            if self.on_progress is not None:
                self.on_progress(start + chunk.shape[0], masks.shape[0])
        self.evaluations += int(masks.shape[0])
        return out

    def _evaluate_chunk(self, masks: np.ndarray) -> np.ndarray:
        weights = coalition_weights(masks, self.num_samples, self.max_multiple)
        weights = weights.to(self.device)  # (c, K)
        count = masks.shape[0]
        with torch.no_grad(), _eval_mode(self.model):
            # Row S: w_r + eta * sum_k a[S, k] delta_k, all rows in one addmm (a tiled first
            # layer's weights a tile at a time); rescaled, the coefficients of each row carry
            # its step's rescaling (and eta).
            coefficients, alpha = weights, self.eta
            if self._reference is not None:
                # A step shorter than 1e-6 of the consortium's has no direction worth the name
                # (the members' updates cancel to rounding): it stays a zero step.
                lengths = self._step_lengths(weights)
                scale = torch.where(
                    lengths > 1e-6 * self._reference,
                    self.eta * self._reference / lengths.clamp(min=1e-300),
                    0.0,
                )
                coefficients = (weights.to(torch.float64) * scale[:, None]).to(weights.dtype)
                alpha = 1.0

            def build(name: str, start: int, stop: int) -> Tensor:
                """Columns start:stop of the batch's models, into the scratch buffer ``name``."""
                out = scratch_buffer(self._scratch, name, (count, stop - start), self._base_flat)
                return torch.addmm(
                    self._base_flat[start:stop].expand(count, -1),
                    coefficients,
                    self._deltas[:, start:stop],
                    alpha=alpha,
                    out=out,
                )

            flat = build("models", 0, self._built)
            params = unflatten_batched(flat, self._built_like, batch_shape=(count,))
            if self._mlp is not None:
                first_rows: FirstRows | None = None
                if self._rows is not None:
                    weight, bias = self._rows
                    width = self._like[weight].shape[1] + (bias is not None)

                    def first_rows(start: int, stop: int) -> Tensor:
                        offset = self._built
                        rows = build("rows", offset + start * width, offset + stop * width)
                        return rows.view(count, stop - start, width)

                logits = batched_mlp(
                    self._mlp,
                    params,
                    self._x,
                    self._scratch,
                    first_rows=first_rows,
                    tile=self._tile(count),
                )  # (c, n, out)
                n = self._y.shape[0]
                per_sample = per_sample_scores(
                    logits.reshape(count * n, -1), self._y.repeat(count), self.metric
                ).reshape(count, n)
                scores = per_sample if self.per_sample else per_sample.mean(dim=1)
                return scores.to("cpu", torch.float64).numpy()

            def utility_of(p: dict[str, Tensor]) -> Tensor:
                logits = functional_call(self.model, p, (self._x,))
                scores = per_sample_scores(logits, self._y, self.metric)
                return scores if self.per_sample else scores.mean()

            scores = vmap(utility_of)(params)
        result: np.ndarray = scores.to("cpu", torch.float64).numpy()
        return result


TILE_FLOATS = 1 << 21
"""Hidden states a tile of the first layer holds on a CPU, at most (8 MiB of float32): with
its tile of weights it stays in the cache while the activations and the second layer use it
(a 64-13,333-10 MLP on 360 samples, 67 models a batch: the forward pass 1.5 times faster
than with the whole layer at once when the scoring thread is the process's only OpenMP user;
docs/benchmarks.md section 4 on why a second one takes that back)."""


def _gram(deltas: Tensor, chunk: int = 1 << 18) -> Tensor:
    """deltas @ deltas^T in float64 (K x K), a column chunk at a time: no float64 copy of all."""
    gram = torch.zeros(deltas.shape[0], deltas.shape[0], dtype=torch.float64, device=deltas.device)
    for start in range(0, deltas.shape[1], chunk):
        part = deltas[:, start : start + chunk].to(torch.float64)
        gram += part @ part.T
    return gram


def _check_like(base: Mapping[str, Tensor], other: Mapping[str, Tensor], what: str) -> None:
    if set(other) != set(base):
        missing = sorted(set(base) - set(other))
        extra = sorted(set(other) - set(base))
        raise ValueError(f"{what} has different tensors: missing {missing}, unexpected {extra}")
    for name in sorted(base):
        if tuple(other[name].shape) != tuple(base[name].shape):
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(other[name].shape)}, "
                f"expected {tuple(base[name].shape)}"
            )
