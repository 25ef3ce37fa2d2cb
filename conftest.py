"""Test configuration shared by tests/ and verification/: reproducible hypothesis profiles."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=8, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SNOPT_HYPOTHESIS_PROFILE", "fast"))

# One thread: the suites are many small solves, for which a second thread only adds contention on a
# shared 2-core machine (measured: a conv example at 30 s with 2 threads vs 1 s with 1).
torch.set_num_threads(1)
