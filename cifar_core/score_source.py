"""The files of a scoring job as a Ray Data source: listed inside the pipeline, streamed.

One read task walks SRC (``listing.iter_source``: a local folder in name order, an s3://
prefix page by page) and yields blocks of ``LISTING_BLOCK_ROWS`` rows as it goes, so the first
images are read and decoded while the rest are still being listed, and no process holds the
whole listing (the driver holds none of it). Each row carries ``seq`` (0, 1, 2, ... in listing
order) and the last row ``last=True``: the driver checks every row came back exactly once and
in order (N files in, N rows out) without ever knowing N in advance.

The listing task may run on any node, like the reads: on a cluster a local SRC must be on a
filesystem every node mounts (the head node of ``cluster.yaml`` offers Ray no CPU at all).
"""

from __future__ import annotations

import time

from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from cifar_core.listing import COLUMNS, iter_source

#: Rows per block the listing task yields (Ray Data merges them up to its block size).
LISTING_BLOCK_ROWS = 256
#: Columns the listing adds: the driver's completeness check, and seconds spent listing.
CHECK_COLUMNS = ["seq", "last", "list_s"]


def listing_schema():
    import pyarrow as pa

    types = {"path": pa.string(), "source": pa.binary(), "size": pa.int64(),
             "label": pa.string(), "status": pa.string(), "error": pa.string(),
             "seq": pa.int64(), "last": pa.bool_(), "list_s": pa.float64()}
    return pa.schema([(name, types[name]) for name in COLUMNS + CHECK_COLUMNS])


def listing_blocks(src: str, limit: int | None, endpoint: str | None,
                   rows_per_block: int = LISTING_BLOCK_ROWS):
    """Arrow tables of the listing, ``rows_per_block`` rows each, ``last`` on the final row.
    One row is held back so the final block can mark it."""
    import pyarrow as pa

    schema = listing_schema()
    held: list[dict] = []
    seq = 0
    started = time.perf_counter()

    def block(rows: list[dict]):
        nonlocal started
        now = time.perf_counter()
        for row in rows:  # each row's share of the time spent listing its block
            row["list_s"] = (now - started) / len(rows)
        started = now
        return pa.Table.from_pylist(rows, schema=schema)

    for row in iter_source(src, endpoint):
        if limit is not None and seq >= limit:
            break
        held.append({**row, "seq": seq, "last": False})
        seq += 1
        if len(held) > rows_per_block:
            yield block(held[:rows_per_block])
            del held[:rows_per_block]
    if held:
        held[-1]["last"] = True
        yield block(held)


class ListingSource(Datasource):
    """``ray.data.read_datasource(ListingSource(src, limit, endpoint))``: one row per file."""

    def __init__(self, src: str, limit: int | None = None, endpoint: str | None = None):
        """``endpoint``: the S3 endpoint as resolved on the driver (``storage.s3_endpoint``)."""
        super().__init__()
        self.src, self.limit, self.endpoint = src, limit, endpoint

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown until listed: that is the point

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        src, limit, endpoint = self.src, self.limit, self.endpoint

        def read():
            yield from listing_blocks(src, limit, endpoint)

        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None,
                                 exec_stats=None)
        return [ReadTask(read, metadata, schema=listing_schema(),
                         per_task_row_limit=per_task_row_limit)]

    def get_name(self) -> str:
        return "ListFiles"
