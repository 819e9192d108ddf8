"""Where ``cifar score`` writes: OUT's file names, a streaming CSV/Parquet writer whose
``commit`` replaces the outputs atomically, and CSV cells made inert for spreadsheets.

A re-run into the same OUT replaces the file (never appends); a crash or an error leaves the
previous output intact; s3:// outputs are uploaded in one piece at commit. ``commit``
returns each output's rows and SHA-256 for the summary, which is written after it.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from cifar_core.provenance import digest_of
from cifar_core.settings import CLASS_NAMES
from cifar_core.storage import is_s3, upload_file

OUTPUT_FORMATS = ("csv", "parquet")


class OutputError(ValueError):
    """OUT does not name a file of a known format."""


def output_uris(out: str, formats: tuple[str, ...]) -> tuple[list[str], str]:
    """(output file URIs, summary URI) for OUT: ``scores.csv`` -> scores.csv and
    scores.summary.json; with both formats, ``scores.csv`` and ``scores.parquet``."""
    stem = out
    for fmt in OUTPUT_FORMATS:
        if out.lower().endswith("." + fmt):
            stem = out[: -len(fmt) - 1]
    if not stem or stem.endswith("/"):
        raise OutputError(f"OUT {out!r} must name a file, e.g. scores.csv")
    return [f"{stem}.{fmt}" for fmt in formats], f"{stem}.summary.json"


def formats_for(out: str, requested: str | None) -> tuple[str, ...]:
    """Formats from ``--format`` (csv, parquet, both) or else OUT's suffix."""
    if requested == "both":
        return OUTPUT_FORMATS
    if requested:
        return (requested,)
    for fmt in OUTPUT_FORMATS:
        if out.lower().endswith("." + fmt):
            return (fmt,)
    raise OutputError(f"OUT {out!r} must end in .csv or .parquet (or pass --format)")


class OutputWriter:
    """Streams row batches into temporary files; ``commit`` replaces the outputs atomically.

    A re-run into the same OUT therefore replaces the file (never appends), and a crash leaves
    the previous output intact. s3:// outputs are uploaded in one piece at commit.
    """

    def __init__(self, uris: list[str], columns: list[str], endpoint: str | None = None):
        import pyarrow as pa

        self.uris, self.columns, self.endpoint = uris, columns, endpoint
        self.schema = pa.schema([(name, pa.float64() if name.endswith("confidence")
                                  else pa.string()) for name in columns])
        self.temporary: list[Path] = []
        for uri in uris:
            folder = tempfile.gettempdir() if is_s3(uri) else os.path.dirname(
                os.path.abspath(uri))
            os.makedirs(folder, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(uri),
                                            suffix=".partial")
            os.close(handle)
            self.temporary.append(Path(name))
        self._csv = None
        self._parquet = None
        self.rows = 0

    def write(self, table) -> None:
        """Append an Arrow table holding (at least) the output columns."""
        import pyarrow.csv
        import pyarrow.parquet

        table = table.select(self.columns).cast(self.schema)
        for uri, path in zip(self.uris, self.temporary):
            if uri.endswith(".csv"):
                if self._csv is None:
                    self._csv = pyarrow.csv.CSVWriter(str(path), self.schema)
                self._csv.write_table(spreadsheet_safe(table))
            else:
                if self._parquet is None:
                    self._parquet = pyarrow.parquet.ParquetWriter(str(path), self.schema)
                self._parquet.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> dict[str, dict]:
        """Put every output in place; their sizes and SHA-256, for the summary written next."""
        for writer in (self._csv, self._parquet):
            if writer is not None:
                writer.close()
        written = {}
        for uri, path in zip(self.uris, self.temporary):
            digest = digest_of(path)
            written[uri] = {"rows": self.rows, "bytes": digest.size, "sha256": digest.sha256}
            if is_s3(uri):
                upload_file(path, uri, self.endpoint)
                path.unlink()
            else:
                os.replace(path, uri)
        self.temporary = []
        return written

    def abort(self) -> None:
        for writer in (self._csv, self._parquet):
            try:
                if writer is not None:
                    writer.close()
            except Exception:
                pass
        for path in self.temporary:
            path.unlink(missing_ok=True)


#: Text columns where "" means "none": written as empty (null) cells.
OPTIONAL_TEXT = ("label", "error", "predicted_class", "top2_class", "top3_class")
#: Per-row seconds each stage spent (worker time); summed into the summary, never written.
TIMING_COLUMNS = ("list_s", "read_s", "decode_s", "predict_s")


def with_nulls(table):
    """``table`` with "" in the ``OPTIONAL_TEXT`` columns as nulls (empty cells)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in OPTIONAL_TEXT:
        if name in table.column_names:
            index = table.column_names.index(name)
            column = table.column(index)
            table = table.set_column(index, name, pc.if_else(
                pc.equal(column, ""), pa.scalar(None, column.type), column))
    return table


class Tally:
    """The summary's numbers, counted as row batches stream past the driver: counts, error
    kinds, stage seconds and a confusion matrix, never a list per row, so the driver's memory
    does not grow with the number of files. ``add`` also checks the listing's ``seq``/``last``
    columns: every listed file comes back exactly once, in order (N files in, N rows out)."""

    def __init__(self):
        self.files = self.errors = self.labelled = 0
        self.kinds: Counter = Counter()
        self.stage_s: Counter = Counter()
        self.confusion = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
        self.complete = False

    def add(self, table) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        seq = table.column("seq").to_numpy()
        last = table.column("last").to_numpy(zero_copy_only=False)
        if self.complete or not np.array_equal(seq, np.arange(self.files,
                                                              self.files + len(seq))):
            raise RuntimeError(f"internal error: rows arrived out of order or twice (expected "
                               f"row {self.files}, got {seq[:3].tolist()}...); output not "
                               "replaced")
        if last[:-1].any():
            raise RuntimeError("internal error: rows after the last listed file; output not "
                               "replaced")
        self.complete = bool(last[-1]) if len(last) else False
        self.files += len(seq)
        for name in TIMING_COLUMNS:
            if name in table.column_names:
                self.stage_s[name.removesuffix("_s")] += float(
                    pc.sum(table.column(name)).as_py() or 0.0)
        failed = pc.equal(table.column("status"), "error")
        errors = int(pc.sum(failed).as_py() or 0)
        self.errors += errors
        if errors:  # rare: the per-row Python work is for failed rows only
            for error in table.column("error").filter(failed).to_pylist():
                self.kinds[str(error).split(":", 1)[0]] += 1
        classes = pa.array(CLASS_NAMES)
        label = pc.index_in(table.column("label"), value_set=classes)
        predicted = pc.index_in(table.column("predicted_class"), value_set=classes)
        self.labelled += int(pc.sum(pc.is_valid(label)).as_py() or 0)
        scored = pc.and_(pc.and_(pc.is_valid(label), pc.is_valid(predicted)),
                         pc.invert(failed))
        pairs = (pc.filter(label, scored).to_numpy() * len(CLASS_NAMES)
                 + pc.filter(predicted, scored).to_numpy())
        self.confusion += np.bincount(pairs.astype(np.int64), minlength=self.confusion.size
                                      ).reshape(self.confusion.shape)

    def labels(self) -> dict | None:
        """Accuracy and confusion matrix over the labelled files that scored ok (None when no
        file has a label)."""
        from cifar_core.evaluate import confusion_summary

        if not self.labelled:
            return None
        scored = int(self.confusion.sum())
        if not scored:
            return {"labelled_files": self.labelled, "scored": 0, "accuracy": None}
        return {"labelled_files": self.labelled, "scored": scored,
                **confusion_summary(self.confusion)}


#: Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(table):
    """The table (Arrow, or a pandas frame) with every text cell that a spreadsheet would
    execute prefixed by ``'`` (OWASP's advice for CSV injection); Parquet output keeps the
    exact values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(table, pa.Table):  # a pandas DataFrame
        return spreadsheet_safe(pa.Table.from_pandas(table, preserve_index=False)).to_pandas()
    starts = "^[" + "".join("\\" + c if c in "-+" else c for c in FORMULA_STARTS) + "]"
    for index, column in enumerate(table.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            formula = pc.fill_null(pc.match_substring_regex(column, starts), False)
            quote = pa.scalar("'", column.type)
            table = table.set_column(index, table.field(index), pc.if_else(
                formula, pc.binary_join_element_wise(quote, column, pa.scalar("", column.type)),
                column))
    return table
