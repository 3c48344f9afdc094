"""Curvature models of Q_uu: sgd, rmsprop, adam, adamw, kfac, ekfac, full, shampoo, soap
(docs/method.md, curvature models)."""

from __future__ import annotations

from .adam import Adam, AdamW
from .base import CurvatureModel, StageStatistics
from .ekfac import EKFAC
from .full import Full
from .kfac import KFAC, CurvatureWarning
from .rmsprop import RMSprop
from .sgd import SGD
from .shampoo import Shampoo
from .soap import SOAP

CURVATURES: dict[str, type[CurvatureModel]] = {
    cls.name: cls for cls in (SGD, RMSprop, Adam, AdamW, KFAC, EKFAC, Full, Shampoo, SOAP)
}

__all__ = ["CURVATURES", "CurvatureModel", "StageStatistics", "CurvatureWarning",
           "SGD", "RMSprop", "Adam", "AdamW", "KFAC", "EKFAC", "Full",
           "Shampoo", "SOAP"]
