"""kdsearch: find the best small vision-transformer students for a teacher.

The public names are imported lazily, so `import kdsearch` stays fast and never imports
Ray (only `kdsearch.search` and the CLI do) or torch until a model is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_space": "kdsearch.space.file",
    "parse_space": "kdsearch.space.file",
    "SearchSpace": "kdsearch.space.search_space",
    "Budget": "kdsearch.space.search_space",
    "TrialSpec": "kdsearch.space.specs",
    "StudentSpec": "kdsearch.space.specs",
    "RecipeSpec": "kdsearch.space.specs",
    "TrainSpec": "kdsearch.space.specs",
    "DataSpec": "kdsearch.space.specs",
    "TeacherSpec": "kdsearch.space.specs",
    "POS_EMBEDS": "kdsearch.space.specs",
    "build_student": "kdsearch.models.student",
    "count_flops": "kdsearch.space.flops",
    "FlopCount": "kdsearch.space.flops",
    "run_trial": "kdsearch.train.trial",
    "TrialSetup": "kdsearch.train.setup",
    "TrialDiverged": "kdsearch.train.loop",
    "Objective": "kdsearch.space.objectives",
    "load_run": "kdsearch.results.tables",
    "load_teacher": "kdsearch.train.teacher",
    "load_data": "kdsearch.train.data",
    "DistillLoss": "kdsearch.train.distill",
    "load_student": "kdsearch.results.export",
    "export_student": "kdsearch.results.export",
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
