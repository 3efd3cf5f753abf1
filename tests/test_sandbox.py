"""The code sandbox (common.execute_code, §12.2): results, limits (time, memory, output) and the calls
it refuses (process creation, kill, deletion/writes outside the scratch directory, the parent's secrets).
Each test starts real child interpreters; nothing here needs data or a GPU."""
import concurrent.futures
import os
import time

from common import execute_code


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
        result = execute_code(code)
        assert not result.success and "PermissionError" in result.error, code
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
