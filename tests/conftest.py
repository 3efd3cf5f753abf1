"""Shared test fixtures.

- `shared_data`: the real data samples (../shared/data beside the checkout, or $NANOCHAT_TEST_DATA);
  tests that need them are skipped with a message when they are absent (a user's clone has none).
- `http_mirror`: a real http.server on 127.0.0.1 serving those samples, laid out like a mirror.
- `base_dir`: a fresh NANOCHAT_BASE_DIR per test, so nothing touches ~/.cache/nanochat.
The summary ends with one line saying how many tests skipped for want of the samples and how to supply them.
"""
import functools
import http.server
import os
import pathlib
import sys
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def find_shared_data():
    candidates = [os.environ.get("NANOCHAT_TEST_DATA"), ROOT.parent / "shared" / "data"]
    for c in candidates:
        if c and (pathlib.Path(c) / "pretrain").is_dir():
            return pathlib.Path(c)
    return None


NO_SAMPLES = "real data samples not found"
SAMPLES_HINT = "set NANOCHAT_TEST_DATA=<a folder laid out like shared/data> or place shared/data beside the checkout"


@pytest.fixture(scope="session")
def shared_data():
    path = find_shared_data()
    if path is None:
        pytest.skip(f"{NO_SAMPLES}: {SAMPLES_HINT}")
    return path


def pytest_terminal_summary(terminalreporter):
    """Skips are otherwise silent without -rs: say in one line how many lacked the samples and the fix."""
    skipped = terminalreporter.stats.get("skipped", [])
    missing = sum(1 for report in skipped if NO_SAMPLES in str(report.longrepr))
    if missing:
        terminalreporter.write_line(f"{missing} tests skipped for want of the real data samples: {SAMPLES_HINT} "
                                    "(README: Tests)",
                                    yellow=True, bold=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_directory(directory):
    """Start a threaded http.server on an ephemeral 127.0.0.1 port; returns (server, base_url)."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="session")
def http_mirror(shared_data):
    """Base URL of a local HTTP server that serves the shared data like a NANOCHAT_MIRROR."""
    server, url = serve_directory(shared_data)
    yield url
    server.shutdown()


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster, and on a busy machine a second thread's wake-up latency dominates."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    monkeypatch.delenv("NANOCHAT_MIRROR", raising=False)
    return d
