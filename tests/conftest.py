import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("QCORRECT_TEST_THREADS", "1")))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)
