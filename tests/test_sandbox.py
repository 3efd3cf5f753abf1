"""The code sandbox (common.execute_code, §12.2): results, limits (time, memory, output) and the calls
it refuses (process creation, kill, deletion/writes outside the scratch directory, the parent's secrets);
then the escapes of code written to get out, each stopped by an operating-system layer or skipped where
this machine lacks it. Each test starts real child interpreters; nothing here needs data or a GPU."""
import concurrent.futures
import contextlib
import os
import random
import signal
import socket
import time

import pytest

from common import SANDBOX_LAYERS, execute_code, sandbox_layers


def test_passing_program_output_and_scratch_dir():
    result = execute_code("import os\nprint('hello', 6 * 7)\nprint(os.getcwd())\nopen('note.txt', 'w').write('x')")
    assert result.success and not result.timeout and not result.memory_exceeded and result.error is None
    lines = result.stdout.splitlines()
    assert lines[0] == "hello 42"
    scratch = lines[1]
    assert os.path.basename(scratch) == "scratch" and not os.path.exists(scratch)  # deleted afterwards


def test_exception_is_a_failure_with_its_message():
    result = execute_code("def f():\n    return {}['missing']\nf()")
    assert not result.success and not result.timeout
    assert result.error == "KeyError: 'missing'" and "Traceback" in result.stderr


def test_infinite_loop_is_killed_within_the_limit():
    t0 = time.time()
    result = execute_code("print('started', flush=True)\nwhile True:\n    pass", timeout=1.0)
    assert time.time() - t0 < 3.0
    assert result.timeout and not result.success and result.error == "Execution timed out"
    assert result.stdout == "started\n"  # output before the kill is kept


def test_one_gigabyte_allocation_is_stopped():
    result = execute_code("block = bytearray(1024 ** 3)\nprint('allocated')", maximum_memory_bytes=256 * 1024**2)
    assert not result.success and result.memory_exceeded and "allocated" not in result.stdout
    assert execute_code("block = bytearray(16 * 1024 ** 2)\nprint(len(block))").stdout == f"{16 * 1024**2}\n"


def test_output_flood_is_capped():
    result = execute_code("while True:\n    print('x' * 10000)", timeout=3.0, maximum_output_bytes=1024**2)
    assert not result.success and len(result.stdout) <= 1024**2


def test_process_creation_and_kill_fail():
    attempts = {
        "fork": "import os\nos.fork()",
        "subprocess": "import subprocess\nsubprocess.run(['echo', 'spawned'])",
        "system": "import os\nos.system('echo spawned')",
        "exec": "import os\nos.execv('/bin/echo', ['echo', 'spawned'])",
        "multiprocessing": "import multiprocessing\np = multiprocessing.Process(target=print, args=('spawned',))\np.start(); p.join()",
        "kill": "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
        "ctypes": "import ctypes\nctypes.CDLL(None).fork()",
    }
    for name, code in attempts.items():
        result = execute_code(code)
        assert not result.success and "spawned" not in result.stdout, name
        assert "PermissionError" in result.error or "ModuleNotFoundError" in result.error, (name, result.error)


def test_deletion_outside_scratch_fails_inside_works(tmp_path):
    victim = tmp_path / "keep" / "important.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    attempts = [f"import os\nos.remove({str(victim)!r})", f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
                f"import shutil\nshutil.rmtree({str(victim.parent)!r})", f"import os\nos.rename({str(victim)!r}, 'mine')",
                f"open({str(victim)!r}, 'w').write('overwritten')",
                f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('overwritten')"]
    for code in attempts:
        result = execute_code(code)  # refused by the guard, or the path is not there (the "fs" layer)
        assert not result.success and result.error.startswith(("PermissionError", "FileNotFoundError")), code
    assert victim.read_text() == "precious"
    inside = execute_code("import os, shutil\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\n"
                          "os.rename('a/b/f', 'g')\nos.remove('g')\nshutil.rmtree('a')\nprint(os.listdir('.'))")
    assert inside.success and inside.stdout == "[]\n", inside.error


def test_parent_secrets_are_not_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    secret_file = tmp_path / "token"
    secret_file.write_text("hunter2")
    env = execute_code("import os\nprint(sorted(os.environ))\nprint(os.environ.get('NANOCHAT_TEST_SECRET'))")
    assert env.success and "hunter2" not in env.stdout and env.stdout.endswith("None\n")
    for code in ["import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())",
                 f"print(open({str(secret_file)!r}).read())",
                 f"import os\nfd = os.open({str(secret_file)!r}, os.O_RDONLY)\nprint(os.read(fd, 100))"]:
        result = execute_code(code)
        assert not result.success and "hunter2" not in result.stdout and "PermissionError" in result.error, code


def test_early_exit_is_not_a_success():
    # a program that exits 0 before reaching the tests must not count as passing them
    for code in ["import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)", "exit()"]:
        result = execute_code(code)
        assert not result.success and not result.timeout, code


def test_works_from_worker_threads():
    programs = ["print(sum(range(10)))", "while True:\n    pass", "raise ValueError('no')"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        ok, looping, failing = pool.map(lambda code: execute_code(code, timeout=1.0), programs)
    assert ok.success and ok.stdout == "45\n"
    assert looping.timeout and not looping.success
    assert not failing.success and failing.error == "ValueError: no"


# ---- escapes by code written to get out: each bypasses the in-process guard on purpose, so only the
# operating-system layers (common.sandbox_layers) can stop it; a test is skipped where its layer is missing.

LAYERS = sandbox_layers()
REAL_FILEIO = "import sys\nFileIO = type(sys.stdin.buffer.raw)\n"            # the real io.FileIO class
REAL_POSIX = "import sys\ndel sys.modules['posix']\nimport posix\n"         # fresh, unpatched posix module


def needs(*layers):
    """Skip unless one of `layers` is active on this machine."""
    return pytest.mark.skipif(not set(layers) & set(LAYERS),
                              reason=f"sandbox layer {' or '.join(layers)} not available here (active: {LAYERS})")


def test_layers_are_reported():
    assert {"rlimits", "guard"} <= set(LAYERS) <= set(SANDBOX_LAYERS), LAYERS
    assert sandbox_layers() == LAYERS  # probed once, then cached


@needs("fs")
def test_fileio_cannot_write_or_read_outside_scratch(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    result = execute_code(REAL_FILEIO + f"FileIO({str(victim)!r}, 'w').write(b'overwritten')")
    assert not result.success and victim.read_text() == "precious"
    result = execute_code(REAL_FILEIO + "print(FileIO('/etc/passwd').read())")
    assert not result.success and "root:" not in result.stdout


@needs("fs", "uid")  # a fresh /proc, or a uid that may not read the parent's
def test_fileio_cannot_read_parent_environ(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code(REAL_FILEIO + f"print(FileIO('/proc/{os.getpid()}/environ').read())")
    assert not result.success and "hunter2" not in result.stdout


@needs("fs", "uid")
def test_reimported_posix_cannot_touch_host_files(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    result = execute_code(REAL_POSIX + f"posix.system('echo pwned > {victim}')\n"
                          f"fd = posix.open({str(victim)!r}, posix.O_WRONLY | posix.O_TRUNC)")
    assert not result.success and victim.read_text() == "precious"


def processes_with(marker):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() in f.read():
                found.append(int(pid))
    return found


@needs("pidns")
@pytest.mark.parametrize("ending", ["print('parent returns')", "while True:\n    pass",
                                    "posix.setsid()\nwhile True:\n    pass"])  # out of the killed group
def test_setsid_child_does_not_outlive_the_sandbox(ending):
    marker = f"{random.randint(10**6, 10**7)}.25"  # a unique `sleep` argument to find the child by
    code = REAL_POSIX + f"if posix.fork() == 0:\n    posix.setsid()\n    posix.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    execute_code(code + ending, timeout=2.0)
    deadline = time.time() + 2.0
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.05)
    survivors = processes_with(marker)
    for pid in survivors:  # don't leave it behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors


@needs("nproc")
def test_fork_bomb_is_capped():
    code = REAL_POSIX + ("import signal\nn = 0\ntry:\n    for n in range(1000):\n        if posix.fork() == 0:\n"
                         "            signal.pause()\nfinally:\n    print('forked', n, flush=True)")
    result = execute_code(code, timeout=5.0)
    assert "BlockingIOError" in result.stderr and int(result.stdout.split()[1]) < 100, (result.stdout, result.stderr)


@needs("fs", "uid")
def test_ctypes_loaded_from_file_cannot_touch_host(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    code = ("import glob, importlib.util, os, sys\n"
            "path = next(p for d in sys.path for p in glob.glob(os.path.join(d, '_ctypes.*')))\n"
            "spec = importlib.util.spec_from_file_location('_ctypes', path)\n"
            "sys.modules['_ctypes'] = module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "del sys.modules['ctypes']\nimport ctypes\nlibc = ctypes.CDLL(None)\n"
            f"fd = libc.open({str(victim).encode()!r}, os.O_WRONLY | os.O_TRUNC)\n"
            "print('open', fd, 'write', libc.write(fd, b'pwned', 5))\n"
            f"print('kill', libc.kill({os.getpid()}, 0))\n")
    result = execute_code(code)
    assert result.success, result.error  # ctypes loads; what it can reach is the question
    assert victim.read_text() == "precious" and "open -1" in result.stdout
    if "pidns" in LAYERS or "uid" in LAYERS:
        assert "kill -1" in result.stdout


@needs("netns")
def test_no_network_not_even_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        code = (f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                f"s.connect(('127.0.0.1', {server.getsockname()[1]}))\nprint('connected')")
        result = execute_code(code)
        assert not result.success and "connected" not in result.stdout
        with pytest.raises(socket.timeout):
            server.accept()


@needs("fs")
def test_total_written_bytes_are_capped():
    # many files, each under the per-file limit: only the size of the scratch filesystem stops them
    code = ("written = 0\ntry:\n    for i in range(300):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(bytes(1024 ** 2))\n        written += 1024 ** 2\n"
            "finally:\n    print(written)")
    t0 = time.time()
    result = execute_code(code, maximum_output_bytes=4 * 1024**2)
    assert not result.success and "No space left" in result.error, result.error
    assert int(result.stdout) <= 4 * 1024**2 and time.time() - t0 < 5
