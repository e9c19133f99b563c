"""``maskdp.save_checkpoint`` / ``load_checkpoint``: a resumed run continues like an
uninterrupted one, and a refused checkpoint changes nothing."""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import tiny_cnn, tiny_vit, wrap
from test_optimizer import STEPS, assert_params_close, params, run
from torch import nn

import maskdp
from maskdp.data.poisson import PoissonDataLoader
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureSeededRandomness
from maskdp.mechanism.views import RandomFillView

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")
KW = dict(noise_multiplier=0.7, max_grad_norm=0.5, sample_rate=0.2)


def setup(seed: int = 0, model_seed: int = 0, view_seed: int = 5):
    model = tiny_vit(model_seed)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    view = RandomFillView(seed=view_seed)
    opt = wrap(model, inner=inner, view=view, randomness=InsecureSeededRandomness(seed), **KW)
    return model, opt


def loader(rate: float) -> PoissonDataLoader:
    data = torch.utils.data.TensorDataset(torch.zeros(10, 1))
    return PoissonDataLoader(data, sample_rate=rate)


@SEEDED
def test_resumed_run_matches_the_uninterrupted_run(tmp_path):
    model_a, opt_a = setup()
    run(model_a, opt_a, STEPS)

    model_b, opt_b = setup()
    run(model_b, opt_b, STEPS[:2])
    maskdp.save_checkpoint(tmp_path / "c.pt", model=model_b, optimizer=opt_b, extra={"step": 2})
    # everything that differs here must come from the file: weights, Adam moments, ledger,
    # the noise randomness and the random fill's generator
    model_c, opt_c = setup(seed=99, model_seed=3, view_seed=77)
    extra = maskdp.load_checkpoint(tmp_path / "c.pt", model=model_c, optimizer=opt_c)
    assert extra == {"step": 2}
    run(model_c, opt_c, STEPS[2:])

    assert_params_close(params(model_a), params(model_c), atol=0)
    assert opt_c.ledger == opt_a.ledger and opt_c.steps == len(STEPS)


def _corrupt_model(state):
    state["model"].popitem()


@SEEDED
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other model", "model tensor"),
        ("missing key", "model does not match"),
        ("loader rate", "loader sample_rate"),
        ("plain optimizer", "another kind"),
        ("torn file", "cannot be read"),
        ("pickled code", "cannot be read"),
        ("foreign file", "not a MaskDP checkpoint"),
        ("bad ledger", "ledger"),
    ],
)
def test_a_refused_checkpoint_changes_nothing(tmp_path, case, message):
    path = tmp_path / "c.pt"
    model_b, opt_b = setup()
    run(model_b, opt_b, STEPS[:2])
    maskdp.save_checkpoint(path, model=model_b, optimizer=opt_b, loader=loader(0.2))

    model, opt = setup(seed=4, model_seed=1)
    live_loader = loader(0.2)
    if case == "other model":
        model = maskdp.models.VideoViT(
            num_classes=4, frames=4, image_size=16, dim=16, depth=1, heads=2
        )
        model = model.double()  # same keys as tiny_vit, a 4-class head
        opt = wrap(model, inner=torch.optim.AdamW(model.parameters()), view=opt.view, **KW)
    elif case == "missing key":
        state = torch.load(path, weights_only=True)
        _corrupt_model(state)
        torch.save(state, path)
    elif case == "loader rate":
        live_loader = loader(0.3)
    elif case == "plain optimizer":
        opt = torch.optim.AdamW(model.parameters())
    elif case == "torn file":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "pickled code":
        path.write_bytes(pickle.dumps(nn.Linear(1, 1)))
    elif case == "foreign file":
        torch.save({"model": model.state_dict()}, path)
    elif case == "bad ledger":
        state = torch.load(path, weights_only=True)
        state["optimizer"]["ledger"] = {"format": "nope"}
        torch.save(state, path)

    before = params(model)
    view_before = opt.view.state_dict() if hasattr(opt, "view") else None
    ledger_before = getattr(opt, "ledger", None)
    inner_before = opt.state_dict() if not hasattr(opt, "ledger") else None
    with pytest.raises(InvalidInputError, match=message):
        maskdp.load_checkpoint(path, model=model, optimizer=opt, loader=live_loader)
    assert_params_close(before, params(model), atol=0)
    if view_before is not None:
        assert torch.equal(view_before["generator"], opt.view.state_dict()["generator"])
        assert opt.ledger == ledger_before
    else:
        assert opt.state_dict() == inner_before


def test_a_plain_optimizer_round_trips(tmp_path):
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 4, 16, 16, dtype=torch.float64)
    model(x).sum().backward()
    opt.step()
    maskdp.save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt)
    other = tiny_cnn(seed=5)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    maskdp.load_checkpoint(tmp_path / "c.pt", model=other, optimizer=other_opt)
    assert_params_close(params(model), params(other), atol=0)
    buf_a = [s["momentum_buffer"] for s in opt.state.values()]
    buf_b = [s["momentum_buffer"] for s in other_opt.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(buf_a, buf_b, strict=True))
