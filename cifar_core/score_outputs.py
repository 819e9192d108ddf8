"""Where ``cifar score`` writes: OUT's file names, a streaming CSV/Parquet writer whose
``commit`` replaces the outputs atomically, and CSV cells made inert for spreadsheets.

A re-run into the same OUT replaces the file (never appends); a crash or an error leaves the
previous output intact; s3:// outputs are uploaded in one piece at commit. ``commit``
returns each output's rows and SHA-256 for the summary, which is written after it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cifar_core.provenance import digest_of
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

    def write(self, frame) -> None:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet

        table = pa.Table.from_pandas(frame[self.columns], schema=self.schema,
                                     preserve_index=False)
        for uri, path in zip(self.uris, self.temporary):
            if uri.endswith(".csv"):
                if self._csv is None:
                    self._csv = pyarrow.csv.CSVWriter(str(path), self.schema)
                self._csv.write_table(pa.Table.from_pandas(
                    spreadsheet_safe(frame[self.columns]), schema=self.schema,
                    preserve_index=False))
            else:
                if self._parquet is None:
                    self._parquet = pyarrow.parquet.ParquetWriter(str(path), self.schema)
                self._parquet.write_table(table)
        self.rows += len(frame)

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


#: Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame):
    """The frame with every text cell that a spreadsheet would execute prefixed by ``'``
    (OWASP's advice for CSV injection); Parquet output keeps the exact values."""
    frame = frame.copy()
    for column in frame.columns:
        values = frame[column].tolist()
        if any(isinstance(v, str) for v in values):
            frame[column] = [("'" + v) if isinstance(v, str) and v.startswith(FORMULA_STARTS)
                             else v for v in values]
    return frame
