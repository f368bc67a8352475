"""Test helper: run several processes together (e.g. the members of a ``jax.distributed`` job on localhost),
bounded by a timeout so that CI never hangs."""

import os
import socket
import subprocess

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(devices: int) -> str:
    """This process's ``XLA_FLAGS`` (without its device count) for a subprocess with ``devices`` fake CPU devices."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def run_together(argvs: list[list[str]], env: dict, timeout_s: float, cwd=None) -> list[str]:
    """Starts every command of ``argvs`` at once, waits for all, kills the rest on timeout (a test failure)
    and asserts every exit status is 0; returns each process's combined stdout and stderr."""
    procs = [
        subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for argv in argvs
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"{len(argvs)} processes did not finish within {timeout_s} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(log[-3000:] for log in logs)
    return logs
