"""Small helpers shared by test files (fixtures live in conftest.py)."""
import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging if the code under test blocks (opening a FIFO waits for a writer)."""
    def expire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s: something opened a FIFO or read an endless file")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
