import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--dtype auto` on a CPU with native bf16 scores in bf16 (loading.CPU_BF16_STAGES): the suite's numbers
# must not depend on which CPU runs it, so it pins float32; test_numerics.py tests the choice itself
os.environ["LAYERPRUNE_CPU_DTYPE"] = "float32"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: a worker (and the commands it starts) computes on one thread,
    # or two workers' thread pools fight over the two cores (tiny models: many times slower)
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixture_lm():
    """The bundled trained model, loaded once (float32, CPU). Tests must not modify it."""
    from layerprune.models.loading import load

    return load("fixture", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is ~50x faster than two contending ones on a busy small machine.
    A module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class CliResult:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(capsys):
    """Run the `layerprune` command in this process: same parser, verbs, exit codes and stderr as the
    console script, without paying for a fresh interpreter and torch import per call."""
    from layerprune.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: --help, usage errors
            code = e.code
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
