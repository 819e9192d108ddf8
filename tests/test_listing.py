"""Listing files to score (cifar_core/listing.py): labels, symlinks, special files."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_core.listing import label_of, list_source
from tests.imaging import encode, sample_image


def test_labels_from_class_folders_and_file_names():
    assert label_of("cat/0001.jpg") == "cat"
    assert label_of("train/Dog/x/0001.jpg") == "dog"
    assert label_of("frog_00012.png") == "frog"
    assert label_of("ship.png") == "ship"
    assert label_of("catalog/photo.png") is None
    assert label_of("photos/IMG_0001.jpg") is None


def test_listing_refuses_escaping_symlinks_and_special_files(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    src.mkdir(), outside.mkdir()
    (outside / "secret.png").write_bytes(encode(sample_image()))
    (src / "a.png").write_bytes(encode(sample_image()))
    (src / "up.png").symlink_to(outside / "secret.png")
    (src / "dir_link").symlink_to(outside)
    (src / "inside_link.png").symlink_to(src / "a.png")
    os.mkfifo(src / "pipe")
    listing = list_source(str(src)).set_index("path")
    kinds = {Path(p).name: row.error.split(":")[0] for p, row in listing.iterrows()}
    assert kinds == {"a.png": "", "up.png": "symlink outside SRC",
                     "dir_link": "symlink outside SRC", "inside_link.png": "",
                     "pipe": "not a regular file"}


def test_an_s3_src_with_hash_and_question_marks_lists_exactly_its_own_prefix(s3_bucket):
    """'#' and '?' are ordinary key characters: "in#1" must not list "in" (urlparse would
    have cut the prefix there and listed the neighbour's files)."""
    from cifar_core import storage

    for key in ("in#1/a.png", "in#1/b?.png", "in/other.png", "in#10/c.png"):
        storage.write_bytes(f"s3://{s3_bucket}/{key}", encode(sample_image()))
    listing = list_source(f"s3://{s3_bucket}/in#1")
    assert list(listing["path"]) == [f"s3://{s3_bucket}/in#1/a.png",
                                     f"s3://{s3_bucket}/in#1/b?.png"]
