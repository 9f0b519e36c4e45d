"""A space file's YAML: plain data only, YAML 1.2 numbers, bounded nesting, one-line errors."""

from __future__ import annotations

import re
from typing import Any

import yaml

from kdsearch.errors import SpaceError


class SpaceLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` as a float (YAML 1.2, as every user expects; PyYAML
    follows YAML 1.1, where it is a string).

    Nesting stops at MAX_DEPTH levels: PyYAML's scanner is quadratic in the depth of flow
    collections and its composer recursive, so deeper documents cost seconds, then a
    RecursionError."""

    MAX_DEPTH = 50
    nesting = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.nesting += 1
        try:
            if self.nesting > self.MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {self.MAX_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self.nesting -= 1


SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One value as a space file would read it (YAML 1.2 numbers: `1e-3` is a float)."""
    return yaml.load(text, Loader=SpaceLoader)


def read_yaml(text: str, source: str) -> Any:
    """A space file's text as plain Python data.

    Args:
        text: The file's text.
        source: The file, named by the error.

    Returns:
        What the YAML holds (mappings, lists, scalars; no object a tag makes).

    Raises:
        SpaceError: One line saying where the YAML is broken, or which tag it may not use.
    """
    try:
        return yaml.load(text, Loader=SpaceLoader)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        tag = re.search(r"tag '([^']*)'", e.problem or "")
        if tag:  # !!python/object/apply:... and friends: never constructed, always refused
            name = tag[1].replace("tag:yaml.org,2002:", "!!")
            raise SpaceError(
                source,
                "",
                f"{where}the tag {name} is not allowed; a space file holds plain YAML (no tags that make objects)",
            ) from None
        raise SpaceError(source, "", f"not valid YAML: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpaceError(source, "", f"not valid YAML: {where}{problem}") from None
    except ValueError as e:  # PyYAML's constructors: a date like 2001-13-45, an int of over 4,300 digits
        raise SpaceError(source, "", f"not valid YAML: a value cannot be read: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise SpaceError(source, "", "not valid YAML: nested too deeply for the parser") from None
