r"""Identity leakage: what an attacker learns about sensitive content from a trained model.

Two attacks, each reported as an accuracy with a Clopper-Pearson interval
(:func:`maskdp.analysis.stats.clopper_pearson`) next to its chance level (a uniform guess
among :math:`K` identities, :math:`1/K`):

- :func:`identity_probe` (the feature probe of the avatar-anonymisation literature, e.g.
  Schneider et al. 2024): freeze the model, take its penultimate features (or logits) on
  held-out clips of known identities, fit a linear probe (multinomial logistic regression)
  on one half and report its identity accuracy on the other half. It measures how much the
  model's *representation* of a new clip tells about the identity in it. It is not a
  privacy measure of the training data: a model that never saw sensitive content (even an
  untrained one) can encode identity cues of its input (colour, texture), so compare with
  the same architecture trained without sensitive content (public views only) or at
  initialisation, not only with chance.
- :func:`identity_inference` (attribute inference on training records): for a record of the
  training set the attacker knows everything but the identity; it redraws the record with
  each of the :math:`K` identities and guesses the one with the lowest loss. With the
  identity uniform over :math:`K` values and an :math:`(\epsilon, \delta)`-MaskDP model
  under the ``erase`` relation, the expected success is at most
  :func:`attribute_inference_bound` :math:`= e^\epsilon / K + \delta` (each world with
  identity :math:`j` is adjacent to the world with the record's sensitive content erased;
  sum the DP inequality over :math:`j`). Held-out records give the attack's rate without
  memorisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskdp.analysis.stats import clopper_pearson
from maskdp.checks import check_choice, check_count
from maskdp.errors import InvalidInputError


@dataclass(frozen=True)
class LeakageResult:
    """An attack's accuracy with its two-sided Clopper-Pearson interval and chance level."""

    attack: str
    correct: int
    trials: int
    accuracy: float
    lower: float
    upper: float
    chance: float
    confidence: float

    @property
    def at_chance(self) -> bool:
        """Whether chance lies inside the interval (no leakage detected at this size)."""
        return self.lower <= self.chance <= self.upper

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at_chance": self.at_chance}


def _result(
    attack: str, correct: int, trials: int, classes: int, confidence: float
) -> LeakageResult:
    low, high = clopper_pearson(correct, trials, confidence)
    return LeakageResult(
        attack, correct, trials, correct / trials, low, high, 1.0 / classes, confidence
    )


def attribute_inference_bound(epsilon: float, delta: float, classes: int) -> float:
    r"""Upper bound :math:`\min(1, e^\epsilon / K + \delta)` on the expected success of
    guessing a uniform :math:`K`-valued sensitive attribute of one record from an
    :math:`(\epsilon, \delta)`-DP output (see module docstring)."""
    check_count("classes", classes, 1)
    return min(1.0, math.exp(epsilon) / classes + delta)


def _feature_module(model: nn.Module) -> nn.Module:
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InvalidInputError(
            f"{type(model).__name__} has no `head` and no nn.Linear: pass module= to choose "
            "the layer whose input is the feature"
        )
    return linears[-1]


@torch.no_grad()
def model_features(
    model: nn.Module,
    inputs: Tensor,
    *,
    feature: str = "penultimate",
    module: nn.Module | None = None,
    batch_size: int = 128,
) -> Tensor:
    """Features (N, d) of a frozen model: the input of its last layer, or its logits.

    ``feature="penultimate"`` reads the input of ``module`` (default: ``model.head`` or the
    last ``nn.Linear``) through a forward pre-hook, removed afterwards; ``"logits"`` the
    output. The model runs in eval mode and is put back in its previous mode.
    """
    check_choice("feature", feature, ("penultimate", "logits"))
    captured: list[Tensor] = []
    handle = None
    if feature == "penultimate":
        target = module if module is not None else _feature_module(model)
        handle = target.register_forward_pre_hook(
            lambda _m, args: captured.append(args[0].detach().flatten(1))
        )
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for start in range(0, len(inputs), batch_size):
            out = model(inputs[start : start + batch_size])
            outputs.append(out.detach().flatten(1))
    finally:
        model.train(was_training)
        if handle is not None:
            handle.remove()
    return torch.cat(captured if feature == "penultimate" else outputs)


def linear_probe(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int | None = None,
    train_fraction: float = 0.5,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    seed: int = 0,
    confidence: float = 0.95,
) -> LeakageResult:
    r"""Fit multinomial logistic regression on a random ``train_fraction`` of (features,
    labels) and report its accuracy on the rest.

    Features are standardised with the training half's mean and standard deviation; the
    probe is trained full-batch with Adam for ``steps`` steps on the mean cross-entropy plus
    ``weight_decay`` times the squared weight norm.
    """
    if features.dim() != 2 or labels.shape != (features.shape[0],):
        raise InvalidInputError(
            f"need features (N, d) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not 0.0 < train_fraction < 1.0:
        raise InvalidInputError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    n = features.shape[0]
    n_train = int(round(train_fraction * n))
    if n_train < 1 or n_train >= n:
        raise InvalidInputError(f"{n} samples cannot be split at train_fraction {train_fraction}")
    labels = labels.to(torch.int64)
    classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    train_idx, test_idx = order[:n_train], order[n_train:]
    x = features.detach().double()
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp_min(1e-8)
    x = ((x - mean) / std).float()
    probe = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=gen)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(probe(x[train_idx]), labels[train_idx])
            (loss + weight_decay * probe.weight.square().sum()).backward()
            optimizer.step()
    with torch.no_grad():
        correct = int((probe(x[test_idx]).argmax(1) == labels[test_idx]).sum())
    return _result("linear_probe", correct, len(test_idx), classes, confidence)


def _identities(dataset: Any) -> tuple[Tensor, int]:
    identities = getattr(dataset, "identities", None)
    classes = getattr(dataset, "num_identities", None)
    if not isinstance(identities, Tensor) or not isinstance(classes, int):
        raise InvalidInputError(
            "the dataset must expose `identities` (N,) and `num_identities` "
            "(e.g. maskdp.data.SyntheticPrivateActions)"
        )
    return identities, classes


def identity_probe(
    model: nn.Module,
    dataset: Any,
    *,
    feature: str = "penultimate",
    seed: int = 0,
    confidence: float = 0.95,
    **probe_options: Any,
) -> LeakageResult:
    """Linear identity probe on a frozen model's features of ``dataset``'s full clips.

    ``dataset`` holds held-out clips (never the training set) with known identities: it
    exposes ``tensors()`` (clips, masks, actions), ``identities`` and ``num_identities``.
    """
    identities, classes = _identities(dataset)
    clips, _, _ = dataset.tensors()
    features = model_features(model, clips, feature=feature)
    result = linear_probe(
        features,
        identities,
        num_classes=classes,
        seed=seed,
        confidence=confidence,
        **probe_options,
    )
    return LeakageResult(f"{feature}_probe", *list(asdict(result).values())[1:])


@torch.no_grad()
def identity_inference(
    model: nn.Module,
    dataset: Any,
    indices: Sequence[int],
    *,
    confidence: float = 0.95,
) -> LeakageResult:
    r"""Guess each record's identity as the one whose redrawn clip has the lowest loss.

    ``dataset.render(i, identity=j)`` must redraw record ``i`` with identity ``j`` changing
    only its sensitive pixels (:class:`maskdp.data.SyntheticPrivateActions` does). Run it on
    training records to measure memorisation, on held-out ones for the baseline.
    """
    identities, classes = _identities(dataset)
    if len(indices) == 0:
        raise InvalidInputError("identity_inference needs at least one record index")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in indices:
            items = [dataset.render(int(i), identity=j) for j in range(classes)]
            clips = torch.stack([item.clip for item in items])
            targets = torch.full((classes,), items[0].action, dtype=torch.int64)
            losses = nn.functional.cross_entropy(model(clips), targets, reduction="none")
            correct += int(int(losses.argmin()) == int(identities[int(i)]))
    finally:
        model.train(was_training)
    return _result("identity_inference", correct, len(indices), classes, confidence)
