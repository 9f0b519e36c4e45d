"""A table written by appending parts: `NAME.parquet` (the compacted table, one file) plus
`NAME.parts/part-SEQ-LEVEL.parquet` (rows appended since), so the driver's cost per row stays
flat however long the run (rewriting the whole table on every trial end would grow with it).

The layout, and what every reader sees at any moment:

- `NAME.parquet` is always a whole table (written then renamed locally, one PUT in a bucket):
  pandas, pyarrow and DuckDB read it as one Parquet file; during a run it may lag the parts. Read by
  path during a run, pyarrow (and pandas through it) opens the file twice, for its footer
  then for its pages, and a compaction that replaces the file in between makes that read fail
  ("Page was smaller than expected"): read again, or read the bytes once (as kdsearch does).
- The parts are the rows written since the last compaction, in order: `SEQ` (9 digits) grows
  with each append, and a merged part takes the largest SEQ it holds with `LEVEL` one above.
  The table is: the rows of `NAME.parquet`, then of each part in (SEQ, LEVEL) order, folded
  with the table's rule (`merge`: for trials.parquet a later row of a trial replaces the
  earlier one; for epochs.parquet a later epoch of a trial also drops that trial's earlier
  rows at that epoch and after, which is what a retry means). `read_table_rows` does exactly
  this, and so does every compaction, so the rule holds whoever reads. Files whose names
  start with "." are temporary and never read (pyarrow and DuckDB skip them too).
- Compaction keeps reading cheap: 8 parts of one level merge into one part of the next
  level (so a run of n appends holds at most 8 parts per level, log8(n) levels), and when
  the parts hold as many rows as the compacted file, all of it is folded into a new
  `NAME.parquet` (its size doubles each time: each row is rewritten a constant number of
  times on average). At the end of a search everything is folded into `NAME.parquet` and
  the parts are deleted. A merge writes its output before it deletes what it merged, so a
  reader meets each row at least once; one that finds a listed part gone (merged while it
  read) reads again.

From outside kdsearch, the live table is `NAME.parquet` plus the parts, e.g. with pyarrow:
`ds.dataset([base, *sorted(parts)], schema=pa.unify_schemas([...], promote_options="permissive"))`
then the rule above; `kdsearch.results.tables.read_rows` is the one entry point that applies it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdsearch.storage import Storage

Rows = list[dict[str, Any]]
Merge = Callable[[Rows], Rows]

FANOUT = 8  # parts of one level that merge into one of the next
_PART = re.compile(r"^part-(\d{9})-(\d+)\.parquet$")


def parts_dir(name: str) -> str:
    """trials.parquet -> trials.parts (beside it, not inside: the compacted table stays one file)."""
    return name.removesuffix(".parquet") + ".parts"


def part_name(name: str, seq: int, level: int) -> str:
    """The path of table `name`'s part with sequence number `seq` at `level`, relative to the store."""
    return f"{parts_dir(name)}/part-{seq:09d}-{level}.parquet"


def list_parts(store: Storage, name: str) -> list[tuple[int, int, str]]:
    """(seq, level, relative path) of each part, in the order they apply."""
    found = []
    for file in store.files(parts_dir(name)):
        if m := _PART.match(file):
            found.append((int(m.group(1)), int(m.group(2)), f"{parts_dir(name)}/{file}"))
    return sorted(found)


def _read(store: Storage, rel: str) -> Rows:
    return pq.read_table(pa.BufferReader(store.read_bytes(rel))).to_pylist()


def read_table_rows(store: Storage, name: str, merge: Merge | None) -> Rows:
    """The table's rows as the layout above defines them ([] before anything was written)."""
    for attempt in range(100):
        parts = list_parts(store, name) if merge is not None else []
        try:
            rows = _read(store, name) if store.exists(name) else []
            for _, _, rel in parts:
                rows.extend(_read(store, rel))
        except FileNotFoundError:  # a part merged away while we read: its rows are in a newer file
            time.sleep(0.001 * attempt)  # a writer appends every few seconds at most: the next read wins
            continue
        return merge(rows) if parts else rows
    raise RuntimeError(f"{store.uri_of(name)}: its parts kept changing while being read")


def to_parquet(rows: Sequence[dict[str, Any]], first_columns: Sequence[str]) -> bytes:
    """Rows as Parquet bytes. Columns: `first_columns`, then the rest sorted."""
    names = list(first_columns) + sorted({k for r in rows for k in r} - set(first_columns))
    columns = {n: [r.get(n) for r in rows] for n in names}
    table = pa.table(columns) if rows else pa.table({n: pa.array([], pa.null()) for n in names})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


class PartsWriter:
    """Appends rows to one table of a run as parts and compacts them (the layout above).

    One writer per table and run (the search's driver). Created on a run that already has
    parts (a resumed driver), it continues after the last one."""

    def __init__(self, store: Storage, name: str, first_columns: Sequence[str], merge: Merge, fanout: int = FANOUT):
        self.store, self.name, self.first_columns, self.merge, self.fanout = store, name, first_columns, merge, fanout
        self._parts = {rel: (seq, level, _num_rows(store, rel)) for seq, level, rel in list_parts(store, name)}
        self._next = max((seq for seq, _, _ in self._parts.values()), default=-1) + 1
        self._base_rows = _num_rows(store, name) if store.exists(name) else 0
        self._cached: dict[str, Rows] = {}  # the rows of the small parts this writer wrote (levels 0 and 1)

    @property
    def parts(self) -> int:
        """How many parts the table has now (0 right after a full compaction)."""
        return len(self._parts)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write `rows` as a new part, then compact as the layout says."""
        if not rows:
            return
        rel = part_name(self.name, self._next, 0)
        self.store.write_bytes(rel, to_parquet(rows, self.first_columns))
        self._parts[rel] = (self._next, 0, len(rows))
        self._cached[rel] = list(rows)
        self._next += 1
        if sum(n for _, _, n in self._parts.values()) >= self._base_rows:
            self.compact()
            return
        level = 0
        while True:
            same = sorted((seq, rel) for rel, (seq, lv, _) in self._parts.items() if lv == level)
            if len(same) < self.fanout:
                break
            self._merge_parts([rel for _, rel in same], same[-1][0], level + 1)
            level += 1

    def _merge_parts(self, rels: list[str], seq: int, level: int) -> None:
        rows: Rows = []
        for rel in rels:
            rows.extend(self._rows(rel))
        merged = self.merge(rows)
        out = part_name(self.name, seq, level)
        self.store.write_bytes(out, to_parquet(merged, self.first_columns))  # first the merged part...
        self._parts[out] = (seq, level, len(merged))
        if level <= 1:
            self._cached[out] = merged
        for rel in rels:  # ...then what it replaces
            self._delete(rel)

    def compact(self) -> None:
        """Fold every part into NAME.parquet (written whole, then renamed) and delete the parts."""
        if not self._parts:
            return
        rels = [rel for rel, _ in sorted(self._parts.items(), key=lambda kv: kv[1][:2])]
        rows = _read(self.store, self.name) if self.store.exists(self.name) else []
        for rel in rels:
            rows.extend(self._rows(rel))
        merged = self.merge(rows)
        self.store.write_bytes(self.name, to_parquet(merged, self.first_columns))
        self._base_rows = len(merged)
        for rel in rels:
            self._delete(rel)
        if self.store.local:  # an empty folder left behind says nothing; a bucket has none
            try:
                self.store.fs.delete_dir(self.store.path(parts_dir(self.name)))
            except OSError:
                pass

    def _rows(self, rel: str) -> Rows:
        return self._cached[rel] if rel in self._cached else _read(self.store, rel)

    def _delete(self, rel: str) -> None:
        self._parts.pop(rel, None)
        self._cached.pop(rel, None)
        self.store.delete(rel)


def _num_rows(store: Storage, rel: str) -> int:
    return pq.read_metadata(pa.BufferReader(store.read_bytes(rel))).num_rows
