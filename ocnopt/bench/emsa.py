r"""E-MSA: the extended method of successive approximations (Li, Chen, Tai and E, "Maximum
Principle Based Algorithms for Deep Learning", JMLR 18(165), 2018), a benchmark peer.

The network is read as a discrete control system: a chain ``nn.Sequential`` is cut into layers
f_t (a module with parameters theta_t followed by the parameter-free modules after it, e.g.
Linear + Sigmoid), x_{s,t+1} = f_t(x_{s,t}, theta_t) for the samples s = 1..S of a batch, the
terminal cost the batch mean (1/S) sum_s Phi(x_{s,T}, y_s) and the running cost L_t(theta) =
wd/2 |theta_t|^2 (``weight_decay``, 0 by default). The Hamiltonian of layer t is

    H_t(x, p, theta) = p . f_t(x, theta) - (1/S) L_t(theta)

and one E-MSA iteration (the paper's extended MSA, on one minibatch) is:

1. forward states: x_{s,0} = input_s, x_{s,t+1} = f_t(x_{s,t}, theta_t^k);
2. backward co-states: p_{s,T} = -(1/S) grad_x Phi(x_{s,T}, y_s),
   p_{s,t} = grad_x H_t(x_{s,t}, p_{s,t+1}, theta_t^k) = (d f_t / d x)^T p_{s,t+1};
3. per layer t, maximisation of the augmented (extended) Hamiltonian with the states and
   co-states of step 1-2 held fixed:

       theta_t^{k+1} = argmax_theta sum_s Htilde_t(x_{s,t}, p_{s,t+1}, theta, x_{s,t+1}, p_{s,t}),

       Htilde_t(x, p, theta, v, q) = H_t(x, p, theta) - rho/2 |v - f_t(x, theta)|^2
                                     - rho/2 |q - grad_x H_t(x, p, theta)|^2.

   The two rho terms vanish at theta = theta_t^k and penalise moves that break the forward
   equation (v = x_{t+1}) and the backward equation (q = p_t) of the current iterate; with
   rho = 0 this is the basic MSA.

Where this follows the paper (its Algorithm 3, the discrete-time E-MSA, and Section 5):

- Hamiltonian H_n(x, p, theta) = p . g_n(x, theta) - delta L(theta) with g_n the layer map
  (delta = 1: the layers here are not residual Euler steps); co-states p_N = -grad Phi(x_N),
  p_n = grad_x H_n(x_n, p_{n+1}, theta_n); step 12's augmented Hamiltonian with one rho on both
  squared 2-norms, the backward term written p_n - grad_x H_n (Algorithm 3; the continuous
  form (8) writes q + grad_x H with q = dP/dt = -grad_x H, the same condition).
- Batch scaling: Algorithm 3 treats the whole batch as one state x (the samples stacked) and
  Section 5 averages the loss over the samples, Phi = (1/S) sum_s Phi_s. So the co-state of
  sample s carries the 1/S (p_{s,T} = -(1/S) grad Phi_s), H is the sum over samples of
  p_s . f_t(x_s, theta) minus L once, and the norms of the rho terms are norms of the stacked
  vectors (sums over samples). Section 4.3 writes the mini-batch co-states without the 1/S
  (the sum of the losses); with the mean used here, rho weighs the forward residual S times
  more and the backward residual 1/S times as much, relative to H, as it would with the sum. For
  a Linear layer the exact maximiser is a preconditioned gradient step of size about
  1/(rho S) (E[x x^T]^{-1} times the mean gradient), so rho sets the step length.
- Inner solver: the paper maximises with 10 iterations of L-BFGS per layer (Section 5, both
  experiments), layer by layer ("the layers are decoupled through the PMP"). ``inner="lbfgs"``
  (the default, ``inner_steps=10``) does that: one ``torch.optim.LBFGS`` per layer, a fresh one
  at every outer iteration, ``max_iter=inner_steps``, initial step ``lr`` (1 by default) and a
  strong-Wolfe line search, gradient tolerance 0 (the early layers of a deep Sigmoid chain have
  gradients far below torch's default 1e-7, which would skip them); torch's other stopping
  rules stay (tolerance_change 1e-9: stop when the directional derivative g . d is above -1e-9,
  when the step or the change of Htilde_t is below 1e-9): on digits-deep they leave the first six
  of the twelve layers unchanged (the first search direction is -g with |g|^2 < 1e-9 there). The paper does
  not name a line search; its TensorFlow L-BFGS (scipy's L-BFGS-B) always uses one, so this is
  our choice.
  ``inner="adam"`` / ``"sgd"``: ``inner_steps`` steps of torch Adam with learning rate ``lr`` /
  plain gradient ascent theta <- theta + lr grad_theta Htilde_t, run jointly on the separable
  sum sum_t Htilde_t (the same as per layer: both act elementwise); not the paper's, kept for
  cheap runs and for the tests' hand-written updates.
- rho: 1.0 by default, the one value the paper states (its sine experiment); it does not give
  its MNIST value. Running cost L = ``weight_decay``/2 |theta|^2 (0 by default).

grad_x H_t depends on theta, so step 3 differentiates through a vector-Jacobian product
(``create_graph=True``): one E-MSA iteration costs, per layer, one double-backward pass per
function evaluation of the inner solver (L-BFGS: about 10 to 25 per layer) plus the forward and
backward of steps 1-2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

INNER = ("lbfgs", "adam", "sgd")


def chain_layers(model: nn.Module) -> list[nn.Sequential]:
    """The layers f_t of a chain: ``model`` (an ``nn.Sequential``) cut before every module with
    trainable parameters; parameter-free modules before the first one form a layer without
    parameters. ``TypeError`` if ``model`` is not an ``nn.Sequential``; ``ValueError`` if a
    module keeps buffers (BatchNorm: its statistics are not part of the control system) or has
    no parameters at all."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"emsa: model must be an nn.Sequential chain (Linear + activations), got "
                        f"{type(model).__name__}")
    layers: list[list[nn.Module]] = []
    for name, mod in model.named_children():
        if any(True for _ in mod.buffers()):
            raise ValueError(f"emsa: module {name!r} ({type(mod).__name__}) keeps buffers; "
                             "accepted: modules without buffers (Linear, Conv, activations)")
        if any(p.requires_grad for p in mod.parameters()) or not layers:
            layers.append([mod])
        else:
            layers[-1].append(mod)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("emsa: model has no trainable parameters")
    return [nn.Sequential(*mods) for mods in layers]


class EMSA:
    """E-MSA as a benchmark stepper: ``step(inputs, targets)`` is one outer iteration on the
    batch and returns the loss before it (the module docstring has the algorithm).

    ``lr``: the inner optimizer's learning rate (L-BFGS: its initial step, 1 as torch's);
    ``rho``: the penalty weight of the augmented Hamiltonian; ``inner_steps``: inner iterations
    per maximisation; ``inner``: "lbfgs" (the paper's), "adam" or "sgd"; ``loss``:
    "cross_entropy" or "mse" (batch means, as torch's losses)."""

    def __init__(self, model: nn.Module, loss: str = "cross_entropy", lr: float = 1.0,
                 rho: float = 1.0, inner_steps: int = 10, inner: str = "lbfgs",
                 weight_decay: float = 0.0):
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"emsa: invalid loss={loss!r}: accepted 'cross_entropy' or 'mse'")
        if inner not in INNER:
            raise ValueError(f"emsa: invalid inner={inner!r}: accepted {', '.join(INNER)}")
        if not (isinstance(inner_steps, int) and inner_steps >= 1):
            raise ValueError(f"emsa: invalid inner_steps={inner_steps!r}: accepted an int >= 1")
        for name, v in (("lr", lr), ("rho", rho), ("weight_decay", weight_decay)):
            if not (isinstance(v, (int, float)) and v >= 0 and (name != "lr" or v > 0)):
                raise ValueError(f"emsa: invalid {name}={v!r}: accepted a "
                                 f"{'positive' if name == 'lr' else 'non-negative'} float")
        self.model = model
        self.layers = chain_layers(model)
        self.loss, self.lr, self.rho = loss, float(lr), float(rho)
        self.inner_steps, self.inner, self.weight_decay = inner_steps, inner, float(weight_decay)
        self.skipped = 0

    def _phi(self, out: Tensor, targets: Tensor) -> Tensor:
        if self.loss == "cross_entropy":
            return nn.functional.cross_entropy(out, targets)
        return nn.functional.mse_loss(out, targets)

    def states_costates(self, inputs: Tensor, targets: Tensor
                        ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Steps 1-2: the states x_0..x_T and co-states p_0..p_T (detached), and the loss."""
        xs = [inputs.detach()]
        ins: list[Tensor] = []
        outs: list[Tensor] = []
        with torch.enable_grad():
            for layer in self.layers:
                x = xs[-1].requires_grad_(True)
                y = layer(x)
                ins.append(x)
                outs.append(y)
                xs.append(y.detach())
            x_T = xs[-1].requires_grad_(True)
            loss = self._phi(x_T, targets)
            (g,) = torch.autograd.grad(loss, x_T)
            ps = [-g]
            for x, y in zip(reversed(ins), reversed(outs)):
                (p,) = torch.autograd.grad(y, x, ps[0], allow_unused=True)
                ps.insert(0, torch.zeros_like(x) if p is None else p)
        return [x.detach() for x in xs], [p.detach() for p in ps], loss.detach()

    def augmented_hamiltonian(self, t: int, x: Tensor, p_next: Tensor, v: Tensor, q: Tensor
                              ) -> Tensor:
        """sum_s Htilde_t(x_s, p_s, theta_t, v_s, q_s) at the layer's current parameters, a
        scalar differentiable in them."""
        layer = self.layers[t]
        x = x.detach().requires_grad_(True)
        f = layer(x)
        h = (p_next * f).sum()
        (hx,) = torch.autograd.grad(h, x, create_graph=True)
        params = [q for q in layer.parameters() if q.requires_grad]
        reg = 0.5 * self.weight_decay * sum((w * w).sum() for w in params) if params else 0.0
        return (h - reg - 0.5 * self.rho * ((v - f) ** 2).sum()
                - 0.5 * self.rho * ((q - hx) ** 2).sum())

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        xs, ps, loss = self.states_costates(inputs, targets)
        if not bool(torch.isfinite(loss)):
            self.skipped += 1
            return float(loss)
        players = [t for t, layer in enumerate(self.layers)
                   if any(w.requires_grad for w in layer.parameters())]
        if self.inner == "lbfgs":
            kept = [self._lbfgs(t, xs, ps) for t in players]  # each layer on its own (paper)
            self.skipped += int(not all(kept))
            return float(loss)
        params = [w for t in players for w in self.layers[t].parameters() if w.requires_grad]
        opt: torch.optim.Optimizer = (torch.optim.Adam(params, lr=self.lr) if self.inner == "adam"
                                      else torch.optim.SGD(params, lr=self.lr))
        for _ in range(self.inner_steps):
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                total = torch.stack([self.augmented_hamiltonian(t, xs[t], ps[t + 1], xs[t + 1],
                                                                ps[t]) for t in players]).sum()
                (-total).backward()  # maximise: the inner optimizers minimise -Htilde
            opt.step()
        return float(loss)

    def _lbfgs(self, t: int, xs: list[Tensor], ps: list[Tensor]) -> bool:
        """Layer t's maximisation by ``inner_steps`` L-BFGS iterations (strong-Wolfe line search)
        on -Htilde_t, started at theta_t^k; False (and theta_t^k kept) if it left the finite
        range."""
        params = [w for w in self.layers[t].parameters() if w.requires_grad]
        opt = torch.optim.LBFGS(params, lr=self.lr, max_iter=self.inner_steps,
                                tolerance_grad=0.0, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                neg = -self.augmented_hamiltonian(t, xs[t], ps[t + 1], xs[t + 1], ps[t])
                neg.backward()
            return neg.detach()

        before = [w.detach().clone() for w in params]
        opt.step(closure)  # type: ignore[no-untyped-call]
        if not all(bool(torch.isfinite(w).all()) for w in params):
            with torch.no_grad():  # a line search that left the finite range: keep theta^k
                for w, b in zip(params, before):
                    w.copy_(b)
            return False
        return True

    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "rho": self.rho, "inner_steps": self.inner_steps,
                "inner": self.inner, "weight_decay": self.weight_decay}
