"""Test configuration shared by tests/ and verification/: reproducible hypothesis profiles."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=8, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=60, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("SNOPT_HYPOTHESIS_PROFILE", "fast"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
