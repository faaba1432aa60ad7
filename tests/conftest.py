import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def fixture_lm():
    """The bundled trained model, loaded once (float32, CPU). Tests must not modify it."""
    from layerprune.models.loading import load

    return load("fixture", device="cpu", quiet=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
