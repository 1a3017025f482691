"""Polling for a condition that another thread or process makes true, for tests and the scripts they run."""

import time


def wait_until(condition, timeout: float = 300):
    """`condition()`'s first truthy value, polled every 50 ms; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(condition)
        time.sleep(0.05)
    return value
