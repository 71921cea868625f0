"""Subprocesses of this checkout's commands, each in its own session so that a failing or timed-out test kills it
together with everything it started (DDP ranks, data workers): no orphans."""

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment with this checkout's psdclip first on the path, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def kill_session(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_in_session(
    command: list[str], timeout: float, env: dict[str, str] | None = None, merge_output: bool = True
) -> subprocess.CompletedProcess:
    """``command`` from the repository root, its output captured (stderr into stdout with ``merge_output``); its
    session is killed when it ends, fails or times out."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env or checkout_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    finally:
        kill_session(process)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_ranks_as(rank: int, world_size: int, port: int) -> None:
    """This process's environment as a launcher sets it for rank ``rank`` of ``world_size`` on this host (a
    ``torch.multiprocessing`` worker then joins the process group like a separately started rank)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )


class Child:
    """A subprocess in its own session whose merged output is read line by line in the background."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env or checkout_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.received: queue.Queue = queue.Queue()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.process.stdout:
            self.received.put(line)
        self.received.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching ``pattern``; fails on timeout or when the child ends first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.received.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"ended (rc {self.process.wait()}) before printing {pattern!r}:\n{self.output[-3000:]}")
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.output[-3000:]}")

    def finish(self, timeout: float) -> int:
        """The exit status; fails when the child is still running after ``timeout`` seconds."""
        try:
            rc = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s:\n{self.output[-3000:]}")
        while (line := self.received.get(timeout=30)) is not None:
            self.lines.append(line)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


def left_in_session(session: int, grace_s: float = 10.0) -> list[str]:
    """The processes of ``session`` (a ``child``'s id) still running ``grace_s`` seconds after its leader ended, as
    ``<pid> <command line>``; zombies, which run nothing, are not counted."""
    deadline = time.monotonic() + grace_s
    while True:
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):  # a process that ends while it is read
                state, _parent, _group, member_of = stat.read_text().rpartition(")")[2].split()[:4]
                if int(member_of) == session and state != "Z":
                    command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    members.append(f"{stat.parent.name} {command}")
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.5)


@contextlib.contextmanager
def child(command: list[str], env: dict[str, str] | None = None):
    started = Child(command, env)
    try:
        yield started
    finally:
        kill_session(started.process)


@contextlib.contextmanager
def separate_ranks(command: list[str], world_size: int = 2, **extra_env: str):
    """``command`` started once per rank on this host, as srun and torchrun start ranks (each told its RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; no launcher between them); every one is killed, with its
    children, when the block ends."""
    port = str(free_port())
    ranks = []
    try:
        for rank in range(world_size):
            env = checkout_env(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                WORLD_SIZE=str(world_size),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                NODE_RANK="0",
                OMP_NUM_THREADS="1",
                **extra_env,
            )
            ranks.append(Child(command, env))
        yield ranks
    finally:
        for started in ranks:
            kill_session(started.process)
