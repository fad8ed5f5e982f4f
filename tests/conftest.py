"""Test set-up: the Triton interpreter on CPU, seeding, and markers.

Without ``VTOK_FAST_TEST_GPU=1`` the suite runs on CPU: ``TRITON_INTERPRET=1`` is set here,
before any kernel module is imported, so the Triton kernels run in the interpreter on CPU
tensors. With ``VTOK_FAST_TEST_GPU=1`` (``bench/gpu_check.sh``) tests run on CUDA with real
kernels and the tests marked ``gpu`` are collected too.
"""
import os

GPU_RUN = os.environ.get("VTOK_FAST_TEST_GPU", "0") == "1"
if not GPU_RUN:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; collected only with VTOK_FAST_TEST_GPU=1")
    config.addinivalue_line("markers", "aot: ahead-of-time compilation for sm_80/sm_90")


def pytest_collection_modifyitems(config, items):
    if GPU_RUN:
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("gpu") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


SEED = int(os.environ.get("VTOK_FAST_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from one seed; ``VTOK_FAST_TEST_SEED`` picks another, to check that no
    test depends on a lucky draw."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """References are float64 and the fp32 contract is IEEE: no TF32 in cuDNN convs or matmuls
    (matters on GPU runs only)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test on the PyTorch path and on the Triton kernels (the interpreter on CPU)."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: CUDA on a GPU run, else CPU under the interpreter."""
    return torch.device("cuda" if GPU_RUN else "cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton kernels (interpreter on CPU)."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the PyTorch path."""
    monkeypatch.setenv("VTOK_FAST_BACKEND", "torch")
    yield
