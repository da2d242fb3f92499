import os

import pytest
import torch

# Two cores are shared by everything on CI machines; more threads only add contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
