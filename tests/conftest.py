import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import atexit  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from forkserver import Forked, launch, limit_file_size  # noqa: E402,F401


# Hang guard, not a speed test: a script that runs longer than this is stuck. Generous on purpose: the
# slowest subprocess of the suite (the default tiny world, ~45 s on the 2-core machine of the README)
# gets more than ten times its time, so a machine several times slower still passes. Override with
# MOLMA_TEST_HANG_GUARD=seconds.
HANG_GUARD = float(os.environ.get("MOLMA_TEST_HANG_GUARD", 1800))


# The environment every launch of the suite gets: the user's as it was when the suite started (an in-process test can
# leave a variable behind: torch sets TORCHINDUCTOR_CACHE_DIR, pytest PYTEST_CURRENT_TEST), one thread per process,
# unbuffered output.
SCRIPT_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Variables torch reads when a torchrun runs, never at import (its rendezvous): a launch that sets them may be forked.
READ_WHEN_RUN = ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE",)


_forkserver = {}


def forkserver(wait=True):
    """The path of tests/forkserver.py's socket, the server started on first use, and waited for unless not wait
    (None where MOLMA_TEST_FORKSERVER=0 turns it off, or not yet ready)."""
    if os.environ.get("MOLMA_TEST_FORKSERVER", "1") == "0" or not hasattr(os, "fork"):
        return None
    with _forkserver.setdefault("lock", threading.Lock()):
        if "proc" not in _forkserver:
            path = Path(tempfile.mkdtemp(prefix="molma_forkserver_")) / "socket"
            proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py"), str(path)], cwd=ROOT,
                                    env=SCRIPT_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            atexit.register(lambda: (proc.kill(), proc.wait(), shutil.rmtree(path.parent, ignore_errors=True)))
            _forkserver["proc"] = proc
        if wait and "path" not in _forkserver:
            proc = _forkserver["proc"]
            assert proc.stdout.readline() == "ready\n", "tests/forkserver.py did not start"
            _forkserver["path"] = Path(proc.args[-1])
    return _forkserver.get("path")


def spawn(cmd, cwd, env, stdout=None, fresh=False, fresh_workers=False, file_size_limit=None):
    """Start cmd ([sys.executable, ...]) in its own session: through the fork server where it can (the server's own
    environment asked for, give or take READ_WHEN_RUN), else (or if fresh) as a fresh interpreter; a torchrun's
    workers are forked too unless fresh_workers. stdout: a file taking both streams (None: each its own).
    file_size_limit: bytes past which a write fails (forkserver.limit_file_size). -> Popen or Forked."""
    path = None if fresh else forkserver()
    same_env = {k: v for k, v in env.items() if k not in READ_WHEN_RUN} == SCRIPT_ENV
    if path is None or not same_env or cmd[0] != sys.executable or cmd[1] == "-c":
        streams = dict(stdout=stdout, stderr=subprocess.STDOUT) if stdout else dict(stdout=subprocess.PIPE,
                                                                                    stderr=subprocess.PIPE, text=True)
        # its own process group, so that a hung torchrun is stopped with all its workers
        return subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, **streams,
                                preexec_fn=file_size_limit and (lambda: limit_file_size(file_size_limit)))
    outputs = [stdout] if stdout else [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    with open(os.devnull, "rb") as devnull:
        fds = [devnull.fileno(), outputs[0].fileno(), outputs[-1].fileno()]
        return launch(path, cmd, cwd, env, fds, fork_workers=not fresh_workers, file_size_limit=file_size_limit,
                      outputs=[] if stdout else outputs)


def start(*args, nproc=None, cwd=ROOT, fresh=False, file_size_limit=None):
    """Start a script as a user would: python, or torchrun with nproc processes (forked by tests/forkserver.py unless
    fresh; file_size_limit as spawn's). -> (Popen or Forked, its command)."""
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, *map(str, args)]
    return spawn(cmd, cwd, SCRIPT_ENV, fresh=fresh, file_size_limit=file_size_limit), cmd


def finish(proc, cmd, timeout=None, check=True):
    """Wait for a started script under the hang guard. -> CompletedProcess.

    check: the run must succeed (else the test fails with its output). A run past the hang guard fails
    with the script's name, how long it ran and the tail of what it printed.
    """
    timeout = timeout or HANG_GUARD
    t0 = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"hung: {' '.join(cmd)} was still running after {time.monotonic() - t0:.0f} s (hang guard "
                    f"{timeout:.0f} s; MOLMA_TEST_HANG_GUARD raises it). Its last output:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and out.returncode != 0 and aborted_at_exit(stdout + stderr, out.returncode):
        pytest.fail(f"teardown abort: {' '.join(cmd)} finished its work, then exited with signal 6 (SIGABRT) at "
                    f"teardown, rc {out.returncode}. This is the C++ abort at interpreter exit (docs/design.md, 'A clean exit'), which "
                    f"common.teardown() prevents; has a path stopped ending through it? Its last output:\n"
                    f"{stdout[-3000:]}\n{stderr[-3000:]}")
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out


def run(*args, nproc=None, timeout=None, cwd=ROOT, check=True, fresh=False, file_size_limit=None):
    """Run a script as a user would (start, then finish). -> CompletedProcess."""
    return finish(*start(*args, nproc=nproc, cwd=cwd, fresh=fresh, file_size_limit=file_size_limit), timeout=timeout,
                  check=check)


# How many one-process runs run_together keeps going at once: one per core (a one-process run keeps one core busy,
# OMP_NUM_THREADS=1), at most 4. Independent runs only: each has its own --out.
JOBS = max(1, min(4, os.cpu_count() or 1))


def run_together(*commands, check=True, cwd=ROOT, fresh=()):
    """Run independent one-process scripts JOBS at a time, each as run() would. commands: argument lists; fresh: the
    indices of those to run in a fresh interpreter. -> their CompletedProcess, in the order given. The first failure
    fails the test (after every run ended)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(JOBS) as pool:
        futures = [pool.submit(run, *c, check=check, cwd=cwd, fresh=i in fresh) for i, c in enumerate(commands)]
    return [f.result() for f in futures]


def aborted_at_exit(text: str, returncode: int) -> bool:
    """Did a process die of SIGABRT (a C++ std::terminate), alone or as a torchrun worker, with no Python error?"""
    sigabrt = returncode == -6 or "Signal 6 (SIGABRT)" in text or "exitcode  : -6" in text or "terminate called" in text
    python_error = re.search(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|KeyboardInterrupt)\b(?<!ChildFailedError)(:|$)",
                             text, re.MULTILINE)
    return sigabrt and not python_error


def run_script(*args, nproc=None, timeout=None, cwd=ROOT):
    """Run a script that must succeed; -> everything it printed."""
    out = run(*args, nproc=nproc, timeout=timeout, cwd=cwd)
    return out.stdout + out.stderr


def failed(out):
    """A finished run that must have failed (a clear error, not a hang); -> everything it printed."""
    assert out.returncode != 0, f"{' '.join(out.args)} was expected to fail and exited 0:\n{out.stdout[-3000:]}"
    return out.stdout + out.stderr


def run_fails(*args, nproc=None):
    """Run a script that must fail; -> everything it printed."""
    return failed(run(*args, nproc=nproc, check=False))


def fail_together(*commands):
    """run_together scripts that must each fail; -> what each printed, in the order given."""
    return [failed(out) for out in run_together(*commands, check=False)]


# The suite's one tiny world, built once per session and small: the world of three objectives (its answers sometimes
# end with a claim or a hedge), whose help and safe files every two-objective test reads and whose honesty test_hhh
# reads too. 2000 UltraFeedback rows: with the binarized rule (a random lower-rated answer, a harder pair than the
# worst one) 800 rows left about 35 held-out pairs, too few to measure RMhonest's accuracy (0.65, then 0.82 with 2000)
SMALL_WORLD = ["--objectives", "help,safe,honest", "--pretrain-steps", "300", "--pretrain-texts", "3000",
               "--pku-train", "600", "--alpaca", "1500", "--samples", "40", "--hh-harmless-train", "800",
               "--hh-helpful-train", "200", "--shp-train", "200", "--ultrafeedback", "2000"]


def pytest_configure(config):
    config.addinivalue_line("markers", "both_cores: its runs are torchruns of 2 processes, which keep both cores busy")
    config.addinivalue_line("markers", "slow: runs a stage or another process (the tiny world, a script, torchrun); "
                                       "the fast tier is -m 'not slow'")


# a test that starts a process: a stage, torchrun, or another interpreter (marked slow, out of the fast tier)
STARTS_A_PROCESS = ("run(", "run_script(", "run_fails(", "start(", "torchrun(", "run_together(", "fail_together(",
                    "subprocess.", "launch(")


def pytest_collection_modifyitems(session, config, items):
    """The tests that need no tiny world first, those of one core before those of both (each group in its order):
    the world builds on the other core meanwhile (world_build). Two processes on one core each, where the cores are
    shared with a third, slow down as much as the third gains (measured: the world and two reward models, 83 s in
    turn, 79 s together), so the world builds beside the tests of one core. A module's tests of no world stay
    together (all of one core, or all after them where one is of both), so that its module fixtures are made once."""
    for item in items:
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if "world" in item.fixturenames or any(call in source for call in STARTS_A_PROCESS):
            item.add_marker(pytest.mark.slow)
    both = {item.module for item in items if item.get_closest_marker("both_cores")}
    items.sort(key=lambda item: ("world" in item.fixturenames, item.module in both))


@pytest.fixture(scope="session", autouse=True)
def world_build(request, tmp_path_factory):
    """Starts building the suite's world (SMALL_WORLD) with the session, if a test needs it: the build keeps one
    core busy while the tests that need no world run on the other. -> (Popen, command, folder) or None."""
    if not any("world" in item.fixturenames for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("tiny") / "world"
    forkserver(wait=False)                  # the launcher starts beside the world's build, which need not wait for it
    proc, cmd = start(ROOT / "00_make_tiny_world.py", "--out", out, *SMALL_WORLD, fresh=True)
    yield proc, cmd, out
    if proc.poll() is None:                   # the session stopped before a test needed it
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@pytest.fixture(scope="session")
def world(world_build):
    """The suite's tiny world (SMALL_WORLD), built once per test session."""
    proc, cmd, out = world_build
    finish(proc, cmd)
    return out


@pytest.fixture(scope="session")
def reward_models(world, tmp_path_factory):
    """RMhelp and RMsafe trained briefly on the session's tiny world: {objective: model folder}."""
    root = tmp_path_factory.mktemp("rm")
    paths = {}
    for objective in ("help", "safe"):
        run_script(ROOT / "01_train_reward.py", "--preset", "tiny", "--objective", objective, "--base-model", world / "base",
                   "--data-root", world / "data", "--out", root / objective, "--max-pairs", "560", "--eval-every", "1000",
                   "--max-valid-pairs", "56", nproc=2)
        paths[objective] = root / objective / "model"
    return paths


def rl_args(world, reward_models, out, iterations=4, **extra):
    """A few cheap iterations of the tiny preset, for the RL smoke tests. The checkpoint is kept at the end
    (--keep-checkpoint true): the fault tests extend, damage and resume finished runs."""
    extra.setdefault("keep_checkpoint", "true")
    args = ["--preset", "tiny", "--policy", world / "base", "--data-root", world / "data",
            "--reward-models", f"{reward_models['help']},{reward_models['safe']}", "--out", out,
            "--iterations", str(iterations), "--rollouts", "16", "--minibatch", "8", "--max-new-tokens", "24"]
    for k, v in extra.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


@pytest.fixture(scope="session")
def uninterrupted_run(world, reward_models, tmp_path_factory):
    """The reference for the fault tests: 6 iterations of 02 without a fault on one node of 2 processes, a checkpoint
    every 2 (checkpoint at 6, checkpoint.prev at 4); -> its folder. Tests that damage a finished run copy it."""
    out = tmp_path_factory.mktemp("faults") / "full"
    run_script(ROOT / "02_train_molma.py", *rl_args(world, reward_models, out, iterations=6, save_every=2), nproc=2)
    return out


@pytest.fixture(scope="session")
def baseline_runs(world, reward_models, tmp_path_factory):
    """One iteration of each baseline of 03, and so_weighted at weights 0.8,0.2, run_together; tests that change a
    run copy it. -> {name: (its folder, what it printed)}."""
    import importlib

    root = tmp_path_factory.mktemp("baselines")
    runs = {m: ["--method", m] for m in importlib.import_module("03_train_baselines").METHODS}
    runs["so_weighted_w0.8"] = ["--method", "so_weighted", "--weights", "0.8,0.2"]
    outs = run_together(*([ROOT / "03_train_baselines.py", *rl_args(world, reward_models, root / name, iterations=1,
                                                                     save_every=1, rollouts=8), *extra]
                          for name, extra in runs.items()))
    return {name: (root / name, o.stdout + o.stderr) for name, o in zip(runs, outs)}


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run):
    """uninterrupted_run's metrics lines (the time/ keys too)."""
    import json

    return [json.loads(l) for l in (uninterrupted_run / "metrics.jsonl").read_text().splitlines() if l]


def word_tokenizer(words, specials: dict, pair_template: bool | None = None):
    """A word-level fast tokenizer of its own (not the tiny world's): specials like {"cls_token": "[CLS]", ...}, then
    words, one id each. pair_template: True BERT's, False T5's, None adds nothing (a decoder's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials.values(), *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if pair_template:      # BERT-style: [CLS] question [SEP] answer [SEP]
        c, s = specials["cls_token"], specials["sep_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{c} $A {s}", pair=f"{c} $A {s} $B:1 {s}:1",
                                                           special_tokens=[(c, vocab[c]), (s, vocab[s])])
    elif pair_template is False:                  # T5-style: text </s>
        e = specials["eos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"$A {e}", pair=f"$A {e} $B {e}",
                                                           special_tokens=[(e, vocab[e])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="session")
def reference_rms(world, tmp_path_factory):
    """Table 2's two kinds of open-source reward model, tiny and random, each with its own tokenizer:
    a DeBERTa-v2 sequence classifier (OpenAssistant's kind) and a T5 (SteamSHP's kind)."""
    import json as _json

    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, T5Config, T5ForConditionalGeneration

    words = list(_json.loads((world / "base" / "tokenizer.json").read_text())["model"]["vocab"])
    words += ["POST", ":", "RESPONSE", "A", "B", "Which", "response", "is", "better", "?"]
    root = tmp_path_factory.mktemp("reference_rms")
    deberta = word_tokenizer(words, {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                                     "sep_token": "[SEP]"}, pair_template=True)
    import torch as _torch
    _torch.manual_seed(0)
    m = DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=len(deberta), hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                           pad_token_id=deberta.pad_token_id, max_position_embeddings=256))
    m.save_pretrained(root / "deberta")
    deberta.save_pretrained(root / "deberta")
    t5tok = word_tokenizer(words, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}, pair_template=False)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(t5tok), d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                             num_heads=2, pad_token_id=t5tok.pad_token_id, eos_token_id=t5tok.eos_token_id,
                                             decoder_start_token_id=t5tok.pad_token_id))
    t5.save_pretrained(root / "t5")
    t5tok.save_pretrained(root / "t5")
    return {"deberta": root / "deberta", "t5": root / "t5"}
