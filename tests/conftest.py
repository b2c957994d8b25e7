import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton kernels run in Triton's interpreter (numpy on the CPU), at tiny sizes. The
# variable must be set before headmix.ops imports its triton package (its @triton.jit reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Markers that transformers' test mixins put on their tests (tests/test_hf_common.py imports them from the
# installed version's sources): registered so that --strict-markers accepts them.
TRANSFORMERS_MARKERS = ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                        "torch_compile_test", "is_agent_test", "is_expert_parallel_test", "is_fsdp_test",
                        "is_pipeline_test", "is_staging_test", "is_tensor_parallel_test", "is_training_test",
                        "order", "generate")


def pytest_configure(config):
    for name in TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{name}: a marker of transformers' own tests (tests/test_hf_common.py)")
