"""Test configuration: keep JAX on the CPU and quiet TensorFlow's start-up chatter."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-size configurations (still run in CI)")
