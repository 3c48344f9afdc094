"""Optional dependencies of the benchmark harness, imported with the ``pip install`` hint.

``require("curvlinops", "optimizer curvlinops-kfac")`` returns the module, or raises
``ImportError`` naming what needs it, the distribution and the extra that installs it, e.g.
"optimizer curvlinops-kfac needs curvlinops-for-pytorch: pip install 'ocnopt[bench]'".
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: importable top-level module -> (distribution on PyPI, ocnopt extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "bench"),
    "curvlinops": ("curvlinops-for-pytorch", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "pytorch_optimizer": ("pytorch-optimizer", "bench"),
    "mnist1d": ("mnist1d", "bench"),
    "backpack": ("backpack-for-pytorch", "backpack"),
}


def hint(module: str, what: str) -> str:
    """The one-line message for a missing ``module`` that ``what`` needs."""
    top = module.split(".")[0]
    dist, extra = OPTIONAL.get(top, (top, "bench"))
    return f"{what} needs {dist}: pip install 'ocnopt[{extra}]'"


def require(module: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``; ``ImportError`` with the install hint if missing."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(hint(module, what)) from err
