import os
import shutil
import socket

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The variable is read when a
# kernel is decorated, so it must be set before anything imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def megatron_single_rank():
    """torch.distributed (gloo, one rank) and Megatron's parallel state with every size 1."""
    from megatron.core import parallel_state

    address = f"tcp://127.0.0.1:{free_port()}"  # not via MASTER_* variables: they would leak into later launches
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=address)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


TRAIN_BOOKS = ("Northanger Abbey", "Persuasion", "The War of the Worlds")


@pytest.fixture(scope="session")
def novels_data(tmp_path_factory):
    """A prepared corpus of three real novels (two train, one held out), byte-level BPE with 1024 tokens."""
    from tapa_megatron.data.corpus import load_gutenberg_books
    from tapa_megatron.data.prepare import prepare

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
