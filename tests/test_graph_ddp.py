"""Graphs at order 2, exact backend (the graph identity of docs/method.md's test list): one
step of OCNOpt(order=2, curvature="full", backend="autograd", trust=None) on an fx-traceable
model equals dense DDP on its augmented chain (tests/reference_ddp.py, which shares no code
with the engine): parameters after the step, predicted change and loss after.

Models (tests/_graphs.py): a residual block, an inception block merged by torch.cat, and a
branch merged by addition with a projection shortcut; B = 1 and 3, Gauss-Newton and Newton.
Games: on the residual block no two players are simultaneous, so "nash" is "cooperative"; on
the inception block they differ, and "nash" equals the reference's feedback Nash step.

Convention the reference takes from the method: the network input is a block of the augmented
state while it is read (``include_input=True``). Under Newton with the PSD clip this matters
(the clip acts on the whole per-sample block matrix V_XX); under Gauss-Newton it does not.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ocnopt
from tests._graphs import GRAPHS, graph_batch, make_graph
from tests.reference_ddp import dense_ddp_step

RTOL = 1e-8
INCLUDE_INPUT = False  # ocnopt: the network input is not a block (dx_0 = 0; docs/method.md section 7)
# Newton needs a larger damping for a sane step (the contraction terms make Qbar_uu indefinite)
HP = {True: dict(lr=1.0, damping=1e-2), False: dict(lr=1.0, damping=1.0)}


def engine_step(model, x, y, *, loss, game, gauss_newton, lr, damping, weight_decay=0.0):
    model = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature="full", backend="autograd", order=2, game=game,
                        trust=None, lr=lr, damping=damping, weight_decay=weight_decay,
                        gauss_newton=gauss_newton, track_loss_after=True)
    opt.step(x, y)
    return ({k: p.detach() for k, p in model.named_parameters()}, opt.last_step.predicted_change,
            opt.last_step.loss_after)


def reference_step(model, x, y, *, loss, game, gauss_newton, lr, damping, weight_decay=0.0):
    return dense_ddp_step(model, x, y, loss=loss, game=game, gauss_newton=gauss_newton, lr=lr,
                          damping=damping, weight_decay=weight_decay, include_input=INCLUDE_INPUT)


def step_vector(model, params):
    """new - old parameters, all tensors stacked in the model's order."""
    return torch.cat([(params[k] - p.detach()).reshape(-1) for k, p in model.named_parameters()])


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def assert_same(model, ref, got, rtol=RTOL):
    (ref_p, ref_pred, ref_after), (p, pred, after) = ref, got
    assert rel_err(step_vector(model, p), step_vector(model, ref_p)) <= rtol
    assert rel_err(pred, ref_pred) <= rtol
    assert rel_err(after, ref_after) <= rtol


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("gauss_newton", [True, False])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_graph_step_equals_dense_ddp(name, gauss_newton, B):
    """cooperative game: params after one step, predicted change, loss after = the reference."""
    loss = "cross_entropy" if B == 1 else "mse"
    model = make_graph(name, seed=B)
    x, y = graph_batch(B, loss)
    kw = dict(loss=loss, game="cooperative", gauss_newton=gauss_newton, **HP[gauss_newton])
    ref = reference_step(model, x, y, **kw)
    assert float(step_vector(model, ref[0]).abs().max()) > 1e-3  # not a trivial step
    assert_same(model, ref, engine_step(model, x, y, **kw))


@pytest.mark.parametrize("gauss_newton", [True, False])
def test_graph_step_with_weight_decay(gauss_newton):
    model = make_graph("projection", seed=5)
    x, y = graph_batch(3, "cross_entropy")
    kw = dict(loss="cross_entropy", game="cooperative", gauss_newton=gauss_newton,
              weight_decay=5e-2, **HP[gauss_newton])
    assert_same(model, reference_step(model, x, y, **kw), engine_step(model, x, y, **kw))


@pytest.mark.parametrize("gauss_newton", [True, False])
@pytest.mark.parametrize("B", [1, 3])
def test_nash_is_cooperative_without_simultaneous_players(B, gauss_newton):
    """Residual block: every player is an ancestor of the next, so the two games coincide."""
    model = make_graph("residual", seed=B)
    x, y = graph_batch(B, "cross_entropy")
    kw = dict(loss="cross_entropy", gauss_newton=gauss_newton, **HP[gauss_newton])
    coop = engine_step(model, x, y, game="cooperative", **kw)
    nash = engine_step(model, x, y, game="nash", **kw)
    for k in coop[0]:
        assert torch.equal(coop[0][k], nash[0][k]), k
    assert coop[1] == nash[1]


@pytest.mark.parametrize("name", ["inception", "projection"])
@pytest.mark.parametrize("B", [1, 3])
def test_nash_differs_and_equals_reference(name, B):
    """Inception (and projection shortcut): simultaneous players, so the feedback Nash step
    differs from the cooperative one, and equals the reference's feedback Nash step."""
    model = make_graph(name, seed=B)
    x, y = graph_batch(B, "cross_entropy")
    kw = dict(loss="cross_entropy", gauss_newton=True, **HP[True])
    nash = engine_step(model, x, y, game="nash", **kw)
    coop = engine_step(model, x, y, game="cooperative", **kw)
    assert rel_err(step_vector(model, nash[0]), step_vector(model, coop[0])) > 1e-3
    assert rel_err(nash[1], coop[1]) <= 1e-12  # same value recursion: same predicted change
    assert_same(model, reference_step(model, x, y, game="nash", **kw), nash)
