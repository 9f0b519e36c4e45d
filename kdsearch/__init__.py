"""kdsearch: find the best small vision-transformer students for a teacher.

The public names are imported lazily, so `import kdsearch` stays fast and never imports
Ray (only `kdsearch.search` and the CLI do) or torch until a model is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_space": "kdsearch.space_file",
    "parse_space": "kdsearch.space_file",
    "SearchSpace": "kdsearch.space",
    "Budget": "kdsearch.space",
    "TrialSpec": "kdsearch.specs",
    "StudentSpec": "kdsearch.specs",
    "RecipeSpec": "kdsearch.specs",
    "TrainSpec": "kdsearch.specs",
    "DataSpec": "kdsearch.specs",
    "TeacherSpec": "kdsearch.specs",
    "POS_EMBEDS": "kdsearch.specs",
    "build_student": "kdsearch.student",
    "count_flops": "kdsearch.flops",
    "FlopCount": "kdsearch.flops",
    "run_trial": "kdsearch.trial",
    "TrialDiverged": "kdsearch.training",
    "Objective": "kdsearch.objectives",
    "load_run": "kdsearch.results",
    "load_teacher": "kdsearch.teacher",
    "load_data": "kdsearch.data",
    "DistillLoss": "kdsearch.distill",
    "load_student": "kdsearch.export",
    "export_student": "kdsearch.export",
    "KdsearchError": "kdsearch.errors",
    "SpaceError": "kdsearch.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
