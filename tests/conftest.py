"""Make the repository root importable, so tests can use `tools.random_weights` and `tools.toyworld`."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test file (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny models
    gain nothing from threads, and on a busy machine OpenMP's waiting threads make a file several times slower;
    the previous setting is restored for the other files."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """(general.safetensors, expert.safetensors, tokenizer folder): the tiny demo checkpoints, made once."""
    from tools.random_weights import random_pair
    return random_pair(tmp_path_factory.mktemp("weights"))
