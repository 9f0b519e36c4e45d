"""The sandwich rule's students (one-shot screening): the largest, the smallest and random ones.

A supernet serves only the students a search may train: those that build and meet the
space's budget (`space.budget.violations(student)` all <= 0). The sandwich's largest is, for
each positional encoding, the buildable student with the most FLOPs within the budget (found
over every architecture when the space holds at most MAX_ENUMERATED, else over the size
extremes and SEARCH_DRAWS seeded random draws); without a budget it is the space's size
extreme. The smallest is the space's size extreme; random students are drawn within the budget.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kdsearch.errors import SpaceError
from kdsearch.space.flops import count_flops
from kdsearch.space.search_space import SearchSpace
from kdsearch.space.specs import StudentSpec

__all__ = ["SandwichRule", "extreme_student", "largest_within_budget", "random_student", "sandwich"]

SIZE_DIMS = ("embed_dim", "head_dim", "depth", "mlp_ratio", "distill_token")
MAX_ENUMERATED = 20_000  # spaces with at most this many architectures are searched whole
SEARCH_DRAWS = 4_000  # random draws that search a larger space's largest student within its budget


def trainable(space: SearchSpace, student: StudentSpec) -> bool:
    """Whether a search may train `student`: it builds and meets the space's budget."""
    return not student.problems() and space.budget.feasible(student)


def extreme_student(space: SearchSpace, rng: np.random.Generator, largest: bool) -> StudentSpec:
    """The space's largest (or smallest) student by size, budget aside: every size dimension at
    its end (width, depth, MLP ratio, distillation token; the smallest patch size for the
    largest), the most (fewest) heads that build, its encoding drawn from those that build.

    Raises:
        SpaceError: no such student builds.
    """
    pick = max if largest else min
    dims = space.student_dims()
    values = {k: d.default for k, d in space.dims.items() if not k.startswith("student.")}
    for key, dim in dims.items():
        name = key.removeprefix("student.")
        if name in SIZE_DIMS:
            values[key] = pick(dim.values())
        elif name == "patch_size":
            values[key] = (min if largest else max)(dim.values())
        else:
            values[key] = dim.default
    heads = sorted(dims["student.num_heads"].values(), reverse=largest) if "student.num_heads" in dims else [None]
    encodings = list(dims["student.pos_embed"].values()) if "student.pos_embed" in dims else [None]
    encodings = [encodings[i] for i in rng.permutation(len(encodings))]
    for h in heads:
        for pe in encodings:
            chosen = {"student.num_heads": h, "student.pos_embed": pe}
            student = space.build({**values, **{k: v for k, v in chosen.items() if v is not None}}).student
            if not student.problems():
                return student
    raise SpaceError(space.source, "student", f"no {'largest' if largest else 'smallest'} student builds")


def random_student(
    space: SearchSpace, rng: np.random.Generator, tries: int = 1000, within_budget: bool = False
) -> StudentSpec:
    """A uniformly random student of `space` that builds (and meets the budget when
    `within_budget`): `space.sample`, drawn again while it does not."""
    for _ in range(tries):
        student = space.sample(rng).student
        if trainable(space, student) if within_budget else not student.problems():
            return student
    what = "within the budget" if within_budget else "that builds"
    raise SpaceError(space.source, "student", f"no student {what} in {tries} random draws")


def candidates(space: SearchSpace) -> Iterator[StudentSpec]:
    """Every architecture of a small space; a large one's size extremes and seeded random draws."""
    if space.num_architectures() <= MAX_ENUMERATED:
        yield from space.architectures()
        return
    rng = np.random.default_rng(0)
    for largest in (True, False):
        yield extreme_student(space, rng, largest)
    for _ in range(SEARCH_DRAWS):
        yield space.sample(rng).student


def largest_within_budget(space: SearchSpace) -> dict[str, StudentSpec]:
    """Per positional encoding, the trainable student with the most FLOPs (ties: more params,
    then more heads; then the first found), deterministic.

    Raises:
        SpaceError: no student of the space builds within its budget.
    """
    best: dict[str, tuple[tuple[float, ...], StudentSpec]] = {}
    for student in candidates(space):
        if not trainable(space, student):
            continue
        fc = count_flops(student)
        key = (float(fc.flops), float(fc.params), float(student.num_heads))
        if student.pos_embed not in best or key > best[student.pos_embed][0]:
            best[student.pos_embed] = (key, student)
    if not best:
        raise SpaceError(space.source, "budget", "no student of the space builds within the budget")
    return {pe: student for pe, (_, student) in best.items()}


class SandwichRule:
    """The sandwich of a space, its largest students searched once (see the module docstring)."""

    def __init__(self, space: SearchSpace):
        self.space = space
        limited = any(v is not None for v in (space.budget.max_gflops, space.budget.max_params))
        self.tops = largest_within_budget(space) if limited else None

    def largest(self, rng: np.random.Generator) -> StudentSpec:
        """The largest trainable student, its encoding drawn (each encoding's own largest)."""
        if self.tops is None:
            return extreme_student(self.space, rng, largest=True)
        encodings = sorted(self.tops)
        return self.tops[encodings[int(rng.integers(len(encodings)))]]

    def __call__(self, rng: np.random.Generator, n: int) -> list[StudentSpec]:
        """`n` students: the largest, then the smallest, then n - 2 random ones within the budget."""
        out = [self.largest(rng)]
        if n >= 2:
            out.append(extreme_student(self.space, rng, largest=False))
        out.extend(random_student(self.space, rng, within_budget=True) for _ in range(n - 2))
        return out


def sandwich(space: SearchSpace, rng: np.random.Generator, n: int) -> list[StudentSpec]:
    """The sandwich rule's subnets for one step: the largest, the smallest and n - 2 random
    ones, each trainable (it builds and meets the budget). Searches the largest each call:
    a loop holds one `SandwichRule` instead.

    Args:
        space: the space the supernet holds.
        rng: the draws (the encodings of the two extremes and the random students).
        n: how many (>= 1: the largest alone; 2: the two extremes).

    Returns:
        `n` students, the largest first, then the smallest.
    """
    return SandwichRule(space)(rng, n)
