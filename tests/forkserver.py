"""The suite's launcher of scripts: a Python process that has imported torch and transformers once, then forks a child
for each script the tests run, so that a launch skips the ~5 s of imports that every fresh interpreter pays.

A child is the script run as `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would run it: its own process and
session, the requested working folder, environment and standard streams, sys.argv and sys.path[0] as the interpreter
sets them, the script executed as __main__, and the interpreter's normal exit (atexit, finalisation) at its end. What
differs: the modules below are imported before the script starts instead of when it first imports them, and what
those imports made is frozen out of the garbage collector's reach (serve). So the launcher is used only where that
cannot matter: the environment asked for must be the launcher's own (a module that reads a variable at import reads
the same one), and the script's own modules (common, tiny_world) are never preloaded.

A torchrun launched with "fork_workers" runs through torch's public launcher API (torchrun's own argument parser,
torch.distributed.launcher.api.elastic_launch) with the workers' entrypoint a function and torch's `fork` start
method: each worker is forked by its agent, which has torch and transformers imported, and runs the script as
__main__. Nothing of torch is patched. A worker's environment is the agent's plus what torchrun sets (RANK,
MASTER_PORT, TORCHELASTIC_*, read when the script runs, not at import). Such a worker shares its agent's process group and
torch's multiprocessing wrapper catches its uncaught errors, so the tests of signals, killed agents and workers, lost
nodes and aborts start their workers fresh, as a user's torchrun does.
tests/test_forkserver.py checks that forked runs, one-process and torchrun, write a fresh interpreter's bytes.

Protocol (one Unix-socket connection per child): the client (launch) sends a JSON line {"argv", "cwd", "env",
"fork_workers", "file_size_limit"} with three file descriptors (stdin, stdout, stderr); the launcher answers
{"pid": N}, then {"returncode": R} when the child has ended (R as subprocess gives it: -signal for a signal). Started
by tests/conftest.py; MOLMA_TEST_FORKSERVER=0 turns it off.
"""
import gc
import json
import locale
import os
import selectors
import signal
import socket
import subprocess
import sys
import uuid


def preload():
    """What every script imports first, and the slow modules they import later (the model classes of the tiny world,
    FSDP and distributed checkpointing, torchrun's agent, the tensorboard writer, 04's and 05's figures): the same
    modules, imported once."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.launcher.api  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.run  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: F401
                              AutoModelForTokenClassification, AutoTokenizer, HfArgumentParser)
    from transformers.models.phi import modeling_phi  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm  # noqa: F401
    import matplotlib
    matplotlib.use("Agg")                                   # as 04_evaluate.py selects it, before pyplot
    import matplotlib.pyplot  # noqa: F401


def listen(path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def serve(listener, stop_runs_at_end=True):
    """Accept requests until the parent is gone; -> the request and its file descriptors, in a forked child only.
    stop_runs_at_end: SIGKILL the runs still going when the parent (pytest) is gone; a launcher of workers leaves
    them to their own death signal (common.stop_when_the_launcher_dies), as when their agent dies."""
    # What the imports made lives as long as the interpreter: kept out of the collector's reach (Python's advice for a
    # server that forks), a child's collections, and its exit, do not walk it again (the final collection of a process
    # that has imported torch and transformers takes ~1 s on this machine; 0.2 s frozen). A child's own objects are
    # collected as in any process.
    gc.collect()
    gc.freeze()
    parent = os.getppid()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    waiting = {}                                            # child pid -> the connection that asked for it
    while os.getppid() == parent:
        for _ in sel.select(timeout=0.02):
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            while not msg.endswith(b"\n"):
                msg += conn.recv(1 << 16)
            request = json.loads(msg)
            pid = os.fork()
            if pid == 0:                                    # the child: leave the loop and become the script
                sel.close()
                listener.close()
                for c in waiting.values():
                    c.close()
                conn.close()
                return request, fds
            for fd in fds:
                os.close(fd)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            waiting[pid] = conn
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass                                    # the client went away (its test ended)
                conn.close()
    for pid in waiting if stop_runs_at_end else ():         # pytest is gone: so are the runs it started
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)


def enter(request, fds):
    """In a forked child: the session, standard streams, folder and environment of `python ARGV` started by Popen."""
    os.setsid()                                             # its own session, as Popen(start_new_session=True)
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("file_size_limit"):
        limit_file_size(request["file_size_limit"])


def limit_file_size(n):
    """Writes past n bytes fail (EFBIG) instead of killing the process: a full disk, as a test stages it."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))


def run_script(script, *argv):
    """A torchrun worker's entrypoint: the script as `python -u SCRIPT ARGV` runs it, as __main__."""
    import runpy

    sys.stdout.reconfigure(write_through=True)              # torchrun starts its workers unbuffered (-u)
    sys.stderr.reconfigure(write_through=True)
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    runpy.run_path(script, run_name="__main__")


def torchrun_forking_workers(argv):
    """`python -m torch.distributed.run ARGV` through torch's public launcher API: the same arguments, parsed by
    torchrun's own parser, with the workers' entrypoint a function (run_script) that torch starts with the `fork`
    start method, so each worker is forked from this process (torch and transformers imported) instead of starting a
    fresh interpreter. Failures are reported as torchrun reports them (errors.record)."""
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    @record
    def main():
        # --standalone as torchrun's documentation spells it out: a c10d rendezvous on a free local port, a new id
        standalone = ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", f"--rdzv-id={uuid.uuid4()}"]
        args = parse_args(["--start-method", "fork", *(a for x in argv for a in (standalone if x == "--standalone"
                                                                                  else [x]))])
        config, _, _ = config_from_args(args)
        elastic_launch(config, run_script)(args.training_script, *args.training_script_args)

    main()


def launch(path, cmd, cwd, env, fds, fork_workers=False, file_size_limit=None, outputs=()):
    """Ask the launcher at path to start cmd ([sys.executable, ...]) with these stdin, stdout and stderr file
    descriptors. -> Forked."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    request = {"argv": cmd[1:], "cwd": str(cwd), "env": env, "fork_workers": fork_workers,
               "file_size_limit": file_size_limit}
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
    return Forked(conn, cmd, outputs)


class Forked:
    """A script the launcher forked, with the part of subprocess.Popen's surface that the tests and torchrun's agent
    use: pid, args, returncode, poll, wait, communicate (text, universal newlines, as Popen(text=True)), send_signal,
    kill. outputs: the files its output goes to, read by communicate when it has ended."""

    def __init__(self, conn, args, outputs=()):
        self.args, self.returncode, self._conn, self._outputs, self._buffer = args, None, conn, outputs, b""
        self.pid = self._message(None)["pid"]

    def _message(self, timeout):
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError(f"tests/forkserver.py went away while running {' '.join(map(str, self.args))}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self):
        if self.returncode is None:
            self._ended(0)
        return self.returncode

    def _ended(self, timeout):
        try:
            self.returncode = self._message(timeout)["returncode"]
            self._conn.close()
        except (BlockingIOError, TimeoutError):
            return False
        return True

    def wait(self, timeout=None):
        if self.returncode is None and not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        texts = []
        for f in self._outputs:
            f.seek(0)
            texts.append(f.read().decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n"))
            f.close()
        return tuple(texts)

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    preload()
    listener = listen(sys.argv[1])
    print("ready", flush=True)
    request, fds = serve(listener)
    # ---- a forked child: become `python ARGV` in CWD with ENV ----
    enter(request, fds)
    argv = request["argv"]
    if request.get("fork_workers") and argv[:2] == ["-m", "torch.distributed.run"]:
        torchrun_forking_workers(argv[2:])
        sys.exit(0)
    if argv[0] == "-u":                                     # torchrun starts its workers unbuffered
        argv = argv[1:]
        sys.stdout.reconfigure(write_through=True)
        sys.stderr.reconfigure(write_through=True)
    import runpy
    if argv[0] == "-m":
        sys.modules.pop(argv[1], None)                      # preloaded (torchrun): run afresh as __main__, as -m does
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        keep = runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
        keep = runpy.run_path(argv[0], run_name="__main__")  # its globals live on until the interpreter's exit
