import shutil

import pytest

from tapa_megatron.data.corpus import load_gutenberg_books
from tapa_megatron.data.prepare import prepare

TRAIN_BOOKS = ("Northanger Abbey", "Persuasion", "The War of the Worlds")


@pytest.fixture(scope="session")
def novels_data(tmp_path_factory):
    """A prepared corpus of three real novels (two train, one held out), byte-level BPE with 1024 tokens."""
    if shutil.which("apt-get") is None:
        pytest.skip("the Gutenberg novels come from Debian packages via `apt-get download`; apt-get is not on PATH")
    books = load_gutenberg_books(tmp_path_factory.mktemp("gutenberg-cache"))
    root = tmp_path_factory.mktemp("novels")
    paths = []
    for title in TRAIN_BOOKS:
        path = root / (title.replace(" ", "_") + ".txt")
        path.write_text(books[title], encoding="utf-8")
        paths.append(path)
    out = root / "data"
    prepare(out, inputs=paths, test_books=["The_War_of_the_Worlds"], vocab_size=1024)
    return out
