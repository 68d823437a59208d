"""The suite's launcher of scripts: a Python process that has imported torch and transformers once, then forks a child
for each script the tests run, so that a launch skips the ~5 s of imports that every fresh interpreter pays.

A child is the script run as `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would run it: its own process and
session, the requested working folder, environment and standard streams, sys.argv and sys.path[0] as the interpreter
sets them, the script executed as __main__, and the interpreter's normal exit (atexit, finalisation) at its end. What
differs: the modules below are imported before the script starts instead of when it first imports them, and what
those imports made is frozen out of the garbage collector's reach (serve). So the launcher is used only where that
cannot matter: the environment asked for must be the launcher's own (a module that reads a variable at import reads
the same one), and the script's own modules (common, tiny_world) are never preloaded. tests/test_forkserver.py checks that a forked run and a fresh interpreter write byte-identical files.

Protocol (one Unix-socket connection per child): the client sends a JSON line {"argv", "cwd", "env"} with three file
descriptors (stdin, stdout, stderr); the launcher answers {"pid": N}, then {"returncode": R} when the child has ended
(R as subprocess gives it: -signal for a signal). Started by tests/conftest.py; MOLMA_TEST_FORKSERVER=0 turns it off.
"""
import gc
import json
import os
import selectors
import signal
import socket
import sys

# What every script imports first, and the slow modules they import later (the model classes of the tiny world,
# FSDP and distributed checkpointing, the tensorboard writer): the same modules, imported once.
import torch  # noqa: F401
import torch.distributed  # noqa: F401
import torch.distributed.checkpoint.state_dict  # noqa: F401
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


def serve(path):
    """Accept requests until the parent (pytest) is gone; -> the request, in a forked child only."""
    # What the imports made lives as long as the interpreter: kept out of the collector's reach (Python's advice for a
    # server that forks), a child's collections, and its exit, do not walk it again (the final collection of a process
    # that has imported torch and transformers takes ~1 s on this machine; 0.2 s frozen). A child's own objects are
    # collected as in any process.
    gc.collect()
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
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
    for pid in waiting:                                     # pytest is gone: so are the runs it started
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    sys.exit(0)


if __name__ == "__main__":
    (request, fds) = serve(sys.argv[1])
    # ---- a forked child: become `python ARGV` in CWD with ENV ----
    os.setsid()                                             # its own session, as Popen(start_new_session=True)
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = request["argv"]
    import runpy
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        keep = runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
        keep = runpy.run_path(argv[0], run_name="__main__")  # its globals live on until the interpreter's exit
