"""ocnopt: neural-network training as optimal control.

Backpropagation is the first-order truncation of the Bellman equation of the network seen as
a dynamical system (layers = time steps, activations = state, weights = controls). ``OCNOpt``
runs that expansion: at order 1 it is exactly SGD / RMSprop / Adam / K-FAC / EKFAC, depending
on the curvature model of Q_uu.
"""

from .curvature import CURVATURES, CurvatureModel, CurvatureWarning
from .engine import (
    BellmanEngine,
    Policy,
    QExpansion,
    StepResult,
    Terminal,
    Trajectory,
    ValueFunction,
)
from .graph import Graph, GraphError, build_graph
from .losses import CrossEntropy, Loss, MeanSquaredError, make_loss
from .optimizer import NonFiniteStepWarning, OCNOpt
from .stages import Stage, build_stages

__version__ = "0.1.0"

__all__ = [
    "OCNOpt", "BellmanEngine", "Stage", "build_stages", "Loss", "CrossEntropy",
    "MeanSquaredError", "make_loss", "CURVATURES", "CurvatureModel", "CurvatureWarning",
    "NonFiniteStepWarning", "Policy", "QExpansion", "StepResult", "Terminal", "Trajectory",
    "ValueFunction", "Graph", "GraphError", "build_graph",
]
