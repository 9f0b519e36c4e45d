"""Choosing trials by any recorded value: `--where` constraints and a `--pick` rule, shared by
`kdsearch pareto`, `export` and `measure`.

A constraint is `COLUMN OP VALUE` with OP one of <=, <, >=, >, ==, != (`latency_ms<=5`,
`params<2e6`, `student.pos_embed==rope`): COLUMN is any objective or trials.parquet column
(a config column may drop its section when the rest is unique: `pos_embed==rope`), or a
figure of measured.parquet (`with_measured`). The rule is always the same:

    1. the completed trials that meet every constraint (a trial without a value of the
       column meets none of its constraints, `!=` included);
    2. the Pareto front of what is left, in the run's objectives (kdsearch.results.pareto);
    3. with a pick, the one member it names: `max:COL`, `min:COL` or `knee` (`pick_row`).

So the front of a filtered run is the front of the trials that meet the constraints, not the
run's front cut down (a trial the constraints remove no longer hides the ones it dominated).
Everything here is a pure function of rows; nothing reads a run but `with_measured`'s caller.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kdsearch.errors import KdsearchError
from kdsearch.results.outcomes import Status
from kdsearch.results.pareto import front_rows
from kdsearch.results.tables import Run, front_records
from kdsearch.space import objectives as objective_table
from kdsearch.space.objectives import Pairs

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
ORDERING = ("<=", "<", ">=", ">")  # the operators that need a number
_EXPR = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*(\S.*?)\s*$")
WHERE_HELP = (
    "COLUMN OP VALUE with OP one of <=, <, >=, >, ==, != (e.g. latency_ms<=5, params<2e6, student.pos_embed==rope)"
)
PICK_HELP = "max:COLUMN, min:COLUMN or knee"
MEASURED = "measured.parquet"  # the run's table of `kdsearch measure` (kdsearch.results.measured writes it)
MEASURED_FIGURES = ("latency_ms", "throughput", "inference_memory")  # its figures


@dataclass(frozen=True)
class Constraint:
    """One parsed `--where`: `column op value`; `text` is the expression as given."""

    column: str
    op: str
    value: float | str | bool
    text: str

    def resolved(self) -> str:
        """The constraint with its column's full name and its value as compared (`flops<=5e+08`)."""
        value = f"{self.value:g}" if isinstance(self.value, float) else str(self.value)
        return f"{self.column}{self.op}{value}"

    def holds(self, row: dict[str, Any]) -> bool:
        """Whether `row` meets it; a row without a value (None, NaN) never does."""
        v = row.get(self.column)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        if isinstance(self.value, float) and not isinstance(v, (bool, str)):
            v = float(v)
        elif isinstance(self.value, str):
            v = str(v)
        return bool(OPERATORS[self.op](v, self.value))


@dataclass(frozen=True)
class Pick:
    """One parsed `--pick`: `kind` is "max", "min" or "knee"; `column` None for the knee."""

    kind: str
    column: str | None
    text: str

    def resolved(self) -> str:
        """The rule as applied (`max:val_acc`, `knee`)."""
        return self.kind if self.column is None else f"{self.kind}:{self.column}"


def parse_where(expr: str) -> Constraint:
    """Parse one `--where` expression.

    Args:
        expr: `COLUMN OP VALUE`, e.g. "latency_ms<=5" or "student.pos_embed==rope". A value that
            parses as a float is a number (2e6 too); true/false is a bool; any other is text
            (quotes around it are dropped), allowed with == and != only.

    Returns:
        The Constraint (its column not yet checked against a run: `resolve_columns`).

    Raises:
        KdsearchError: One line saying what is allowed, when `expr` is not of that form.
    """
    m = _EXPR.match(expr)
    if not m:
        raise KdsearchError(f"--where {expr!r}: not an expression; allowed: {WHERE_HELP}")
    column, op, raw = m.groups()
    raw = raw.strip("'\"")
    value: float | str | bool
    try:
        value = float(raw)
    except ValueError:
        value = {"true": True, "false": False}.get(raw.lower(), raw)
        if op in ORDERING:
            raise KdsearchError(f"--where {expr!r}: {op} needs a number, got {raw!r}; allowed: {WHERE_HELP}") from None
    return Constraint(column, op, value, expr)


def parse_pick(rule: str) -> Pick:
    """Parse a `--pick` rule: "max:COLUMN", "min:COLUMN" or "knee".

    Raises:
        KdsearchError: One line saying what is allowed, when `rule` is none of them.
    """
    text = rule.strip()
    if text == "knee":
        return Pick("knee", None, rule)
    kind, _, column = text.partition(":")
    if kind not in ("max", "min") or not re.fullmatch(r"[A-Za-z_][\w.]*", column.strip()):
        raise KdsearchError(f"--pick {rule!r}: allowed: {PICK_HELP} (e.g. max:val_acc, min:latency_ms)")
    return Pick(kind, column.strip(), rule)


def column_kinds(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Every column holding a value in some row -> "number", "bool" or "text" (its first value's)."""
    kinds: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            if k in kinds or v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            kinds[k] = "bool" if isinstance(v, (bool, np.bool_)) else "text" if isinstance(v, str) else "number"
    return kinds


def _full_name(column: str, kinds: dict[str, str], flag: str) -> str:
    """`column` as the rows name it: itself, or the one config column ending in `.column`;
    KdsearchError, listing what the run has, otherwise."""
    if column in kinds:
        return column
    ends = [k for k in kinds if k.split(".", 1)[-1] == column and "." in k]
    if len(ends) == 1:
        return ends[0]
    have = [o for o in objective_table.OBJECTIVES if o in kinds]
    sections = sorted({k.split(".")[0] + ".*" for k in kinds if "." in k})
    raise KdsearchError(
        f"{flag}: the run recorded no {column}; it has the objectives {', '.join(have)} "
        f"and the columns {', '.join(k for k in kinds if '.' not in k and k not in have)}, {', '.join(sections)}"
    )


def resolve_columns(
    constraints: Sequence[Constraint], pick: Pick | None, rows: Sequence[dict[str, Any]]
) -> tuple[list[Constraint], Pick | None]:
    """The constraints and the pick with their columns checked against `rows` and given their full names.

    Raises:
        KdsearchError: One line for a column no row holds (listing what they hold), an
            ordering on a text column, a text value against a number column, or a pick on a
            column that is not a number.
    """
    kinds = column_kinds(rows)
    out = []
    for c in constraints:
        name = _full_name(c.column, kinds, f"--where {c.text!r}")
        kind = kinds[name]
        wanted = "bool" if isinstance(c.value, bool) else "text" if isinstance(c.value, str) else "number"
        if wanted != kind and not (kind == "bool" and wanted == "number"):
            raise KdsearchError(f"--where {c.text!r}: {name} is a {kind} column, compared with a {wanted}")
        out.append(Constraint(name, c.op, c.value, c.text))
    if pick is not None and pick.column is not None:
        name = _full_name(pick.column, kinds, f"--pick {pick.text!r}")
        if kinds[name] != "number":
            raise KdsearchError(f"--pick {pick.text!r}: {name} is a {kinds[name]} column; max and min need numbers")
        pick = Pick(pick.kind, name, pick.text)
    return out, pick


def with_measured(trials: Sequence[dict[str, Any]], measured: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials with measured.parquet's figures (latency_ms, throughput, inference_memory) added.

    Args:
        trials: trials.parquet's rows.
        measured: measured.parquet's rows (one per trial, device and runtime).

    Returns:
        New rows; a trial's own value of a column wins over a measured one (None counts as none).

    NOTE: one (device, runtime) is used, the one measured last (the largest `time`), so a
    constraint never mixes a CPU latency with a GPU one; measuring on another device after
    makes that one the one used.
    """
    if not measured:
        return [dict(r) for r in trials]
    last = max(measured, key=lambda m: m.get("time") or 0)
    where = (last.get("device"), last.get("runtime"))
    figures = {
        m["trial_id"]: m for m in measured if (m.get("device"), m.get("runtime")) == where
    }  # one row per trial of that pair
    out = []
    for r in trials:
        row = dict(r)
        for n in MEASURED_FIGURES:
            if row.get(n) is None and r["trial_id"] in figures:
                row[n] = figures[r["trial_id"]].get(n)
        out.append(row)
    return out


def filter_rows(rows: Sequence[dict[str, Any]], constraints: Sequence[Constraint]) -> list[dict[str, Any]]:
    """The rows that meet every constraint, in their order."""
    return [r for r in rows if all(c.holds(r) for c in constraints)]


def _tie_key(row: dict[str, Any], objectives: Pairs) -> tuple:
    """Ties are broken by the run's objectives in order, each in its direction, then the lower trial id."""
    return (*(-float(row[m]) if d == "max" else float(row[m]) for m, d in objectives), str(row["trial_id"]))


def knee(front: Sequence[dict[str, Any]], objectives: Pairs) -> dict[str, Any]:
    """The front member with the best trade-off between the objectives.

    Each objective is normalized to [0, 1] over the front's range, oriented so that 0 is
    the best (an objective the front does not vary in is 0 for all). In two objectives the
    knee is the member farthest below the line joining the front's two extremes, which are
    (0, 1) and (1, 0): the distance is (1 - x - y) / sqrt(2), so the knee is the member with
    the smallest x + y. In three or more, it is the member closest (Euclidean) to the ideal
    point (0, ..., 0). Ties: the lower trial id.

    Args:
        front: The front's rows (non-empty; every objective holds a number).
        objectives: The (metric, "max"|"min") pairs it is a front of.

    Returns:
        The knee's row.
    """
    pts = np.array([[float(r[m]) for m, _ in objectives] for r in front]).reshape(len(front), len(objectives))
    pts = np.where([d == "max" for _, d in objectives], -pts, pts)
    span = pts.max(axis=0) - pts.min(axis=0)
    norm = np.where(span > 0, (pts - pts.min(axis=0)) / np.where(span > 0, span, 1.0), 0.0)
    score = norm.sum(axis=1) if len(objectives) == 2 else np.sqrt((norm**2).sum(axis=1))
    best = np.flatnonzero(np.isclose(score, score.min(), rtol=0, atol=1e-12))
    return min((front[i] for i in best), key=lambda r: str(r["trial_id"]))


def pick_row(front: Sequence[dict[str, Any]], pick: Pick, objectives: Pairs) -> dict[str, Any] | None:
    """The one front member `pick` names (None for an empty front).

    `max:COL` / `min:COL`: the member with the largest / smallest COL; members without a
    value of COL are never picked; ties are broken by the run's objectives in order, each in
    its direction, then by the lower trial id. `knee`: see `knee`.

    Raises:
        KdsearchError: No member of a non-empty front holds a value of COL.
    """
    if not front:
        return None
    if pick.column is None:
        return knee(front, objectives)
    col = pick.column
    have = [r for r in front if r.get(col) is not None and not math.isnan(float(r[col]))]
    if not have:
        raise KdsearchError(f"--pick {pick.text!r}: no front member has a value of {col}")
    sign = -1.0 if pick.kind == "max" else 1.0
    return min(have, key=lambda r: (sign * float(r[col]), *_tie_key(r, objectives)))


def select(
    trials: Sequence[dict[str, Any]], objectives: Pairs, where: Sequence[Constraint] = (), pick: Pick | None = None
) -> list[dict[str, Any]]:
    """The module's rule: the front of the completed trials meeting `where`, or its one `pick`.

    Args:
        trials: Rows (trials.parquet's, with measured figures: `with_measured`).
        objectives: The run's (metric, direction) pairs.
        where: Constraints whose columns are resolved (`resolve_columns`).
        pick: A resolved pick, or None for the whole front.

    Returns:
        The front (cheapest first), or a list of the picked member; [] when no completed
        trial meets the constraints.
    """
    done = [r for r in trials if r.get("status") == Status.COMPLETED]
    front = front_rows(filter_rows(done, where), objectives)
    if pick is None:
        return front
    row = pick_row(front, pick, objectives)
    return [] if row is None else [row]


def choose(
    trials: Sequence[dict[str, Any]],
    objectives: Pairs,
    where: Sequence[str] = (),
    pick: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Parse, check and apply `--where` and `--pick` as given on the command line.

    Args:
        trials: The rows to choose from (with measured figures already joined).
        objectives: The run's (metric, direction) pairs.
        where: The `--where` expressions.
        pick: The `--pick` rule, or None.

    Returns:
        The chosen rows (`select`) and the rule: {"where": the expressions verbatim,
        "pick": the rule verbatim, "resolved": [...constraints resolved, "pick ..."]}.
    """
    constraints, parsed = resolve_columns([parse_where(w) for w in where], parse_pick(pick) if pick else None, trials)
    rows = select(trials, objectives, constraints, parsed)
    resolved = [c.resolved() for c in constraints] + ([f"pick {parsed.resolved()}"] if parsed else [])
    return rows, {"where": list(where), "pick": pick, "resolved": resolved}


def empty_line(given: str, trials: Sequence[dict[str, Any]]) -> str:
    """The one line said when no completed trial meets the constraints `given` (the options as typed)."""
    done = sum(r.get("status") == Status.COMPLETED for r in trials)
    return f"{given}: no completed trial meets it (of {done} completed); relax a constraint"


def given_text(where: Sequence[str], pick: str | None) -> str:
    """The options as typed, quoted for a shell (`--where 'params<2e6' --pick knee`)."""
    return " ".join([f"--where '{w}'" for w in where] + ([f"--pick {pick}"] if pick else []))


def record_columns(objectives: Pairs) -> list[str]:
    """The columns of `front_records` rows for `objectives` (an empty front's CSV header)."""
    return list(front_records([{"trial_id": None}], objectives)[0])


def restrict(run: Run, where: Sequence[str] = (), pick: str | None = None) -> tuple[Run, list[dict[str, Any]], dict]:
    """A run cut down to the completed trials meeting `where`, and the rows `choose` gives.

    Args:
        run: A loaded run (kdsearch.results.tables.load_run); its measured.parquet, when it
            has one, adds the measured figures (`with_measured`).
        where: The `--where` expressions.
        pick: The `--pick` rule, or None.

    Returns:
        (the run with only those trials, so its hypervolume and pictures are theirs; the
        front of them or the picked member; the rule as `choose` returns it).
    """
    trials = with_measured(run.trials, run.paths.rows(MEASURED)) if where or pick else run.trials
    rows, rule = choose(trials, run.objectives, where, pick)
    constraints, _ = resolve_columns([parse_where(w) for w in where], None, trials)
    kept = filter_rows([t for t in trials if t.get("status") == Status.COMPLETED], constraints)
    return replace(run, trials=kept), rows, rule


def export_rule(
    trial_id: str | None, max_gflops: float | None, min_acc: float | None, where: Sequence[str], pick: str | None
) -> tuple[list[str], str | None, str]:
    """`kdsearch export`'s options as one rule: (the --where expressions, the pick, the options as given).

    --max-gflops X is `flops<=X*1e9` and --min-acc Y is `val_acc>=Y`; the pick, when none is
    given, is what those options always picked: `min:flops` with --min-acc alone, else
    `max:val_acc` (ties, as `pick_row` breaks them, as before: by the objectives, then the id).
    """
    given = [f"--trial {trial_id}"] if trial_id is not None else []
    exprs = []
    if max_gflops is not None:
        given.append(f"--max-gflops {max_gflops:g}")
        exprs.append(f"flops<={max_gflops * 1e9!r}")
    if min_acc is not None:
        given.append(f"--min-acc {min_acc:g}")
        exprs.append(f"val_acc>={min_acc!r}")
    given += [given_text(where, pick)] if where or pick else []
    default = "min:flops" if min_acc is not None and max_gflops is None else "max:val_acc"
    return exprs + list(where), pick or default, " ".join(given)


def choose_student(
    run: Run,
    trial_id: str | None = None,
    max_gflops: float | None = None,
    min_acc: float | None = None,
    where: Sequence[str] = (),
    pick: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial `kdsearch export` exports and the rule that chose it (the card's `chosen_by`).

    Args:
        run: The loaded run.
        trial_id: --trial (alone: any completed or early-stopped trial with weights).
        max_gflops: --max-gflops, a shorthand for --where flops<=X*1e9.
        min_acc: --min-acc, a shorthand for --where val_acc>=Y.
        where: --where expressions.
        pick: --pick rule [default: see `export_rule`].

    Returns:
        (the trial's row, {"rule": the options as given, "where": the constraints resolved,
        "pick": the pick resolved, "candidates": how many front members met the constraints}).

    Raises:
        KdsearchError: --trial with another option, no option at all, or no trial meeting
            the rule (one line; the CLI exits 2).
    """
    from kdsearch.results.export import select_trial

    exprs, rule_pick, given = export_rule(trial_id, max_gflops, min_acc, where, pick)
    if trial_id is not None:
        if exprs or pick:
            raise KdsearchError(f"export {given}: --trial names the student; give it alone")
        row = select_trial(run.trials, run.objectives, trial_id=trial_id)
        return row, {"rule": given, "where": [f"trial_id=={trial_id}"], "pick": None, "candidates": 1}
    if not exprs and not pick:
        raise KdsearchError(
            "export: give exactly one of --trial ID, or a rule: --max-gflops X, --min-acc Y, --where EXPR, --pick RULE"
        )
    if min_acc is not None and min_acc > 1:
        raise KdsearchError(f"--min-acc {min_acc:g}: give accuracy as a fraction in [0, 1], e.g. 0.95")
    if not where and not pick:  # the shorthands alone: export's own lines when nothing qualifies
        select_trial(run.trials, run.objectives, max_gflops=max_gflops, min_acc=min_acc)
    trials = with_measured(run.trials, run.paths.rows(MEASURED))
    front, rule = choose(trials, run.objectives, exprs)
    picked = pick_row(front, resolve_columns([], parse_pick(rule_pick), trials)[1], run.objectives)
    if picked is None:
        raise KdsearchError(empty_line(f"export {given}", run.trials))
    chosen = {"rule": given, "where": rule["resolved"], "pick": rule_pick, "candidates": len(front)}
    return picked, chosen
