"""Sandboxed code execution: hostile snippets are contained and reported, harmless ones run."""

import os
import socket
import subprocess
import time

import pytest

from forkrl.rewards.sandbox import Limits, run_python

FAST = Limits(cpu_s=2, wall_s=4.0, memory_mb=256, output_bytes=10_000)


def test_a_normal_program_runs_with_stdin_and_its_own_files():
    r = run_python("import sys, os\nopen('scratch.txt', 'w').write('ok')\n"
                   "print(sum(int(x) for x in sys.stdin.read().split()), open('scratch.txt').read(), sorted(os.environ))",
                   stdin="1 2 3", limits=FAST)
    assert r.ok, r
    total, text, env = r.stdout.strip().split(" ", 2)
    assert (total, text) == ("6", "ok")
    assert set(eval(env)) <= {"LC_CTYPE"}  # an empty environment (Python itself may set the locale)


def test_infinite_loop_is_stopped():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", limits=FAST)
    assert not r.ok and r.limit in ("cpu", "wall")
    assert time.monotonic() - t0 < 8


def test_sleeping_forever_hits_the_wall_limit():
    r = run_python("import time\ntime.sleep(100)\n", limits=Limits(cpu_s=2, wall_s=1.0))
    assert r.limit == "wall" and r.wall_s < 5


def test_fork_bomb_is_refused_and_leaves_no_process():
    r = run_python("import os\nwhile True:\n    os.fork()\n", limits=FAST)
    assert not r.ok and "os.fork is not allowed" in r.stderr
    r = run_python("import subprocess\nsubprocess.Popen(['sleep', '100'])\n", limits=FAST)
    assert not r.ok and "not allowed" in r.stderr
    leftover = subprocess.run(["pgrep", "-f", "forkrl-sandbox-"], capture_output=True, text=True).stdout.split()
    assert [p for p in leftover if int(p) != os.getpid()] == []


def test_memory_hog_is_stopped():
    r = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')\n", limits=FAST)
    assert not r.ok and r.limit == "memory" and "allocated" not in r.stdout


def test_huge_print_is_cut_at_the_output_limit():
    r = run_python("while True:\n    print('x' * 1000)\n", limits=FAST)
    assert not r.ok and r.limit == "output"
    assert len(r.stdout) <= FAST.output_bytes


def test_write_outside_the_directory_is_refused(tmp_path):
    target = tmp_path / "evil.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('pwned')\n", limits=FAST)
    assert not r.ok and "outside the sandbox directory" in r.stderr
    assert not target.exists()
    r = run_python(f"import os\nos.remove({str(tmp_path)!r})\n", limits=FAST)
    assert "outside the sandbox directory" in r.stderr and tmp_path.exists()


def test_network_connection_is_refused():
    with socket.socket() as server:  # a listener on this machine that the sandboxed code must not reach
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n",
                       limits=FAST)
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    assert not r.ok and "connected" not in r.stdout


def test_pass_rate_of_a_code_answer():
    from forkrl.rewards.sandbox import pass_rate

    cases = [("2 3", "5"), ("10 -4", "6"), ("0 0", "0")]
    assert pass_rate("a, b = map(int, input().split())\nprint(a + b)\n", cases, limits=FAST) == 1.0
    assert pass_rate("a, b = map(int, input().split())\nprint(a * b if a else 0)\n", cases, limits=FAST) == 1 / 3
    assert pass_rate("while True: pass\n", cases[:1], limits=Limits(cpu_s=1, wall_s=2.0)) == 0.0
