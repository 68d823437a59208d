"""Long runs survive faults and bad numbers (real processes on the tiny world): preemption, a killed worker,
NaN, damaged files, bad data and bad flags, each with the message a user sees."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HANG_GUARD, ROOT, fail_together, rl_args, run, run_fails, run_script, SCRIPT_ENV, spawn

MOLMA = ROOT / "02_train_molma.py"


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]


def without_times(lines):
    return [{k: v for k, v in l.items() if not k.startswith("time/")} for l in lines]


def torchrun(*args, max_restarts=0, fresh_workers=True):
    """Start a 2-process torchrun in its own process group; -> Popen or Forked (stdout and stderr to a temporary
    file). Its workers are fresh interpreters that torchrun starts itself, as for a user: these tests send signals to
    the group, kill agents and read what an uncaught error prints, and workers forked through torch's launcher API
    (tests/forkserver.py) differ there (they share their agent's process group, and torch's multiprocessing wrapper
    catches their errors). fresh_workers=False forks them, for a test that only needs the run's files."""
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"molma_fault_{os.getpid()}_{time.monotonic_ns()}.log", "w+")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", *map(str, args)]
    proc = spawn(cmd, ROOT, SCRIPT_ENV, stdout=log, fresh_workers=fresh_workers)
    proc.log = log
    return proc


def wait_for(cond, proc, what):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{output(proc)[-4000:]}")
        if time.monotonic() - t0 > HANG_GUARD:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"hung: no {what} after {HANG_GUARD:.0f} s:\n{output(proc)[-4000:]}")
        time.sleep(0.05)


def finish(proc):
    try:
        proc.wait(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hung after {HANG_GUARD:.0f} s:\n{output(proc)[-4000:]}")
    return output(proc)


def output(proc):
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def lines_written(run_dir, n):
    f = run_dir / "metrics.jsonl"
    return lambda: f.exists() and len([l for l in f.read_text().splitlines() if l.endswith("}")]) >= n


def children(pid):
    """Process ids whose parent is pid (torchrun's workers)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "Ctrl-C", "SIGHUP to torchrun"])
def test_sigterm_or_ctrl_c_mid_run_checkpoints_and_the_rerun_continues_exactly(world, reward_models, uninterrupted,
                                                                               tmp_path, how):
    out = tmp_path / "run"
    args = rl_args(world, reward_models, out, iterations=6, save_every=100)    # no periodic checkpoint before the end
    proc = torchrun(MOLMA, *args)
    wait_for(lines_written(out, 1), proc, "first iteration")
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)                                     # a terminal signals the whole group
    elif how == "SIGHUP to torchrun":
        proc.send_signal(signal.SIGHUP)                                        # the terminal that started it closed
    else:
        proc.send_signal(signal.SIGTERM)                                       # what a scheduler sends to the launcher
    text = finish(proc)
    assert proc.returncode != 0
    done = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["iteration"]
    assert 1 <= done < 6, "the signal arrived after the run had finished; nothing was tested"
    assert f"after iteration {done} of 6: checkpoint written to {out / 'checkpoint'}" in text
    assert "[molma] stopped by signal " in text and "KeyboardInterrupt" not in text
    if how == "Ctrl-C":
        assert "[stop] Ctrl-C: finishing this iteration and writing a checkpoint" in text
    assert len(metrics(out)) == done                                           # nothing lost: the checkpoint holds them all
    assert "[molma] resumed from" in run_script(MOLMA, *args, nproc=2)        # the same command continues (--resume auto)
    assert without_times(metrics(out)) == without_times(uninterrupted)


def test_a_killed_worker_under_max_restarts_costs_only_the_iterations_since_the_checkpoint(world, reward_models,
                                                                                         uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(MOLMA, *rl_args(world, reward_models, out, iterations=6, save_every=2), max_restarts=1)
    wait_for(lines_written(out, 3), proc, "third iteration")                   # a checkpoint at iteration 2 exists
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    text = finish(proc)
    assert proc.returncode == 0, text[-4000:]
    assert "[molma] resumed from" in text and "[molma] done" in text
    assert without_times(metrics(out)) == without_times(uninterrupted)       # one line per iteration, the same numbers


def test_a_stopped_rank_is_named_within_the_peer_timeout(world, reward_models, tmp_path):
    """One rank stopped (SIGSTOP: what a stuck collective or a frozen host looks like to the others): within
    --peer-timeout the run names that rank and its host and ends, instead of waiting for torch's 30 minutes."""
    out = tmp_path / "run"
    proc = torchrun(MOLMA, *rl_args(world, reward_models, out, iterations=100, save_every=100, peer_timeout=10))
    wait_for(lines_written(out, 1), proc, "first iteration")
    rank1 = [p for p in children(proc.pid) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGSTOP)
    wait_for(lambda: "[watch] " in output(proc), proc, "the watch's message")   # not torch's 30 minutes: HANG_GUARD
    os.kill(rank1[0], signal.SIGCONT)                  # torchrun's SIGTERM reaches it now, not after its 30 s grace
    text = finish(proc)
    assert proc.returncode != 0 and "[watch] rank 1 (host " in text and "stopped answering 10 s ago" in text


def sha(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def poison_score_head(folder):
    """A reward model's score head set to NaN in its safetensors file (the header intact: it loads anywhere)."""
    from safetensors.torch import load_file, save_file
    w = load_file(folder / "model.safetensors")
    w["score.weight"][:] = float("nan")
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})


def drop_checksum(folder):
    """Remove the weights' sha256 this project records in config.json (a change made on purpose)."""
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["molma_weights_sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))


def test_nan_steps_are_skipped_counted_and_stop_the_run_without_touching_the_checkpoint(world, reward_models, tmp_path):
    out = tmp_path / "run"
    rm_help = tmp_path / "rm_help"                 # a copy, poisoned in place below (the resumed run's arguments
    shutil.copytree(reward_models["help"], rm_help)  # must equal the checkpoint's)
    rms = {**reward_models, "help": rm_help}
    run_script(MOLMA, *rl_args(world, rms, out, iterations=2, save_every=2), nproc=2)
    before = sha(out / "checkpoint"), sha(out / "policy")
    # RMhelp now returns NaN (as a reward model with an inf or a bf16 overflow would)
    poison_score_head(rm_help)
    # the header is intact, so it loads anywhere; the checksum this project records refuses it before loading
    text = run_fails(MOLMA, *rl_args(world, rms, out, iterations=6, save_every=2, max_nonfinite_steps=3))
    assert f"{rm_help / 'model.safetensors'} does not match the sha256 recorded in {rm_help / 'config.json'}" in text
    drop_checksum(rm_help)                                # "changed on purpose": the message's way past that check
    # the run's own record of what it read refuses to continue against another reward model
    text = run_fails(MOLMA, *rl_args(world, rms, out, iterations=6, save_every=2, max_nonfinite_steps=3))
    assert f"--reward-models: {os.path.realpath(rm_help / 'model.safetensors')} has changed" in text
    # a new run in the folder (--resume false) meets the NaN from its first step: every step skipped, never taken
    text = run_fails(MOLMA, *rl_args(world, rms, out, iterations=6, save_every=2, max_nonfinite_steps=3, resume="false"),
                     nproc=2)
    assert ("[molma] stopped: 3 policy optimizer steps in a row had non-finite numbers (each was skipped, so no weight took "
            "them in). The first: help/apa_loss (iteration 1, minibatch 1).") in text
    assert f"the last checkpoint, {out / 'checkpoint'} (iteration 2), is untouched" in text
    assert (sha(out / "checkpoint"), sha(out / "policy")) == before         # neither checkpoint nor policy rewritten
    lines = metrics(out)
    assert [l["step"] for l in lines] == [1] and lines[0]["nonfinite/skipped_policy_steps"] == 2


def test_the_representation_aligner_skips_a_non_finite_step_before_its_eigen_decomposition(world, reward_models,
                                                                                          tmp_path):
    """--aligner representation: a NaN loss is caught before B is formed (an eigen-decomposition of a NaN Gram
    matrix would raise from inside torch), the step skipped and counted, and the run stopped with the message."""
    rm_help = tmp_path / "rm_help"
    shutil.copytree(reward_models["help"], rm_help)
    poison_score_head(rm_help)
    drop_checksum(rm_help)
    out = tmp_path / "run"
    text = run_fails(MOLMA, *rl_args(world, {**reward_models, "help": rm_help}, out, iterations=2,
                                     max_nonfinite_steps=2, aligner="representation"))
    assert ("[molma] stopped: 2 policy optimizer steps in a row had non-finite numbers (each was skipped, so no weight "
            "took them in). The first: help/apa_loss (iteration 1, minibatch 1).") in text
    assert "linalg" not in text and not (out / "policy").exists()


def copy_of(run, tmp_path):
    """A finished run's folder copied to tmp_path/run (--out may change on resume): damaged here, not there."""
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_damaged_checkpoint_is_named_the_previous_one_offered_and_resume_false_starts_over(world, reward_models,
                                                                                            uninterrupted_run, tmp_path):
    out = copy_of(uninterrupted_run, tmp_path)              # 6 iterations, a checkpoint every 2: the last two kept
    assert json.loads((out / "checkpoint.prev" / "trainer_state.json").read_text())["iteration"] == 4
    optim = sorted((out / "checkpoint" / "shards").glob("shard-00002-*.safetensors"))[0]   # rank 1's first file
    optim.write_bytes(optim.read_bytes()[:1000])                               # truncated (a full disk, a killed copy)
    text = run_fails(MOLMA, *rl_args(world, reward_models, out, iterations=7, save_every=2, resume="true"), nproc=2)
    assert f"the checkpoint at {out / 'checkpoint'} is damaged and cannot be resumed: {optim} has 1000 bytes" in text
    assert f"the previous checkpoint is kept at {out / 'checkpoint.prev'} (iteration 4)" in text
    assert "--resume false" in text and "Traceback" not in text.split("damaged")[0][-2000:]
    # --resume false starts over (and says what it discards), whatever the state of the old checkpoint
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=1, resume="false"))
    assert f"--resume false: starting over; the checkpoint at {out / 'checkpoint'} (iteration 6) is discarded" in text
    assert [l["step"] for l in metrics(out)] == [1]


def test_skipped_pku_rows_are_printed_and_saved_in_the_summary(world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    pku = data / "PKU-Alignment" / "PKU-SafeRLHF" / "train.jsonl"
    rows = [json.loads(l) for l in pku.read_text().splitlines()]
    for r in rows[::100]:                                                      # 1% of the rows
        r["safer_response_id"] = "x"
    pku.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    text = run_script(ROOT / "01_train_reward.py", "--preset", "tiny", "--objective", "safe", "--base-model",
                      world / "base", "--data-root", data, "--out", out, "--max-pairs", "56", "--max-valid-pairs", "28")
    n = len(rows[::100])
    assert f"[data] pku_safe (train split): {len(rows)} rows, skipped" in text and f"safer_response_id not 0/1 ({n})" in text
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["skipped_rows"]["pku_safe/train"]["safer_response_id not 0/1"] == n


def test_a_truncated_policy_given_to_04_names_the_file(world, reward_models, tmp_path):
    policy = tmp_path / "runs" / "molma" / "policy"
    shutil.copytree(world / "base", policy)
    weights = policy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    text = run_fails(ROOT / "04_evaluate.py", "--preset", "tiny", "--runs-dir", tmp_path / "runs", "--policy", world / "base",
                     "--data-root", world / "data", "--reward-models", f"{reward_models['help']},{reward_models['safe']}")
    assert f"molma's policy: cannot read {weights}: " in text and "damaged or truncated" in text


BAD_INPUTS = [
    (["--kl-beta", "nan"], "--kl-beta must be a finite number, got nan"),
    (["--iterations", "0"], "--iterations must be positive, got 0"),
    (["--lr=-1e-4"], "--lr must be positive, got -0.0001"),
    (["--rollouts=-8"], "--rollouts must be positive, got -8"),
    (["--gae-lambda", "1.5"], "--gae-lambda must lie in [0, 1], got 1.5"),
    (["--resume", "maybe"], "--resume must be auto, true or false, got 'maybe'"),
    (["--policy", "/no/such/folder"], "--policy /no/such/folder: no such folder"),
    (["--policy", "RM"], "holds a PhiForSequenceClassification (sequence classifier); a causal lm (*ForCausalLM) is expected"),
    (["--omega", "1,-1"], "--omega must be non-negative task importances with a positive sum, got 1,-1"),
    (["--omega", "0,0"], "--omega must be non-negative task importances with a positive sum, got 0,0"),
    (["--objectives", "help,honesty"], "--reward-models: no reward model scores ['honesty']; the folders given score "
                                       "['help', 'safe'] (their config.json id2label)"),
    (["--out", "FILE"], "is a file; give a folder (it is created if missing)"),
    (["--dry-run", "ture"], "argument --dry-run: expected true or false (also yes/no, 1/0), got 'ture'"),
    (["--omega", "nan,1"], "--omega 'nan,1': every value must be a finite number (not nan or inf)"),
    (["--omega", "1,inf"], "--omega '1,inf': every value must be a finite number (not nan or inf)"),
    (["--omega", "1,O.5"], "--omega '1,O.5': 'O.5' is not a number (give 2 comma-separated numbers, e.g. 1,1)"),
    (["--objectives", ","], "--objectives ',' names no objective; give a comma list such as help,safe"),
    (["--rollouts", "4096"], "training prompts cannot fill one iteration of --rollouts 4096: lower --rollouts to"),
    (["--max-prompt-len", "3"], "--max-prompt-len 3 leaves 0 tokens for the user's text: the prompt template (phi2) "
                                "takes"),
    (["--peer-timeout", "0"], "--peer-timeout must be positive, got 0.0"),
]


@pytest.fixture(scope="module")
def bad_input_runs(world, reward_models, tmp_path_factory):
    """02 on each of BAD_INPUTS' flags (RM: a reward model given as the policy; FILE: a file given as --out),
    each must fail. -> what each printed, in BAD_INPUTS' order."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "a_file").write_text("")
    commands = []
    for i, (flags, _) in enumerate(BAD_INPUTS):
        flags = [str(reward_models["help"]) if f == "RM" else str(root / "a_file") if f == "FILE" else f for f in flags]
        args = rl_args(world, reward_models, root / f"x{i}", iterations=1)
        if len(flags) == 1:                      # --flag=value (a negative number needs the = form in argparse)
            args.append(flags[0])
        elif flags[0] in args:
            args[args.index(flags[0]) + 1] = flags[1]
        else:
            args += flags
        commands.append([MOLMA, *args])
    return fail_together(*commands)


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)), ids=[" ".join(f) for f, _ in BAD_INPUTS])
def test_bad_inputs_are_refused_at_start_naming_the_flag(bad_input_runs, case):
    """Refused before any model loads (no 'critic:' line), with the flag named and no traceback."""
    text, message = bad_input_runs[case], BAD_INPUTS[case][1]
    assert message in text and "Traceback" not in text and "critic:" not in text


def test_resuming_under_changed_arguments_is_refused_before_loading(world, reward_models, uninterrupted_run, tmp_path):
    out = copy_of(uninterrupted_run, tmp_path)                                 # a finished K = 2 run, help then safe
    changed = rl_args(world, reward_models, out, iterations=7, rollouts=8) + ["--objectives", "safe,help"]
    text = run_fails(MOLMA, *changed)
    assert "the checkpoint at" in text and "was trained with other arguments; resuming would mix two runs" in text
    assert "--objectives: 'help,safe' -> 'safe,help'" in text and "--rollouts: 16 -> 8" in text
    # the run is finished: never advise --resume false, which would overwrite it
    assert "--resume false" not in text and "another --out (this folder's run is finished: keep it)" in text
    assert "critic:" not in text and "Traceback" not in text
    (out / "run_summary.json").unlink()                                        # an unfinished run: both ways out
    assert "another --out, or --resume false (the checkpoint is replaced)" in run_fails(MOLMA, *changed)
    assert "--objectives: 'help,safe' -> 'help'" in run_fails(MOLMA, *rl_args(world, reward_models, out, iterations=7),
                                                               "--objectives", "help")     # K = 2 resumed as K = 1
    # what may change: the length of the run (and how it is logged, and where the folder lies)
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=7, sample_every=1))
    assert "[molma] resumed from" in text and len(metrics(out)) == 7


def test_one_writer_per_folder(world, reward_models, tmp_path):
    out = tmp_path / "run"
    args = rl_args(world, reward_models, out, iterations=4)
    first = torchrun(MOLMA, *args)
    wait_for(lambda: (out / ".lock").exists() and (out / ".lock").read_text().endswith("}"), first, "the run folder's lock")
    owner = json.loads((out / ".lock").read_text())
    text = run_fails(MOLMA, *args)                                               # a second run on the same --out
    assert f"is in use by another run (host {owner['host']}, pid {owner['pid']}, started {owner['started']})" in text
    assert "Wait for it, or use another --out" in text and "critic:" not in text
    assert "pid" in owner and finish(first) and first.returncode == 0
    assert [l["step"] for l in metrics(out)] == [1, 2, 3, 4] and not (out / ".lock").exists()   # released at the end


def test_ctrl_c_during_reward_model_training_checkpoints_and_the_rerun_continues_exactly(world, reward_models, tmp_path):
    def rm_args(out):      # the session's RMsafe (conftest.reward_models) is the uninterrupted run: its arguments
        return ["--preset", "tiny", "--objective", "safe", "--base-model", world / "base", "--data-root", world / "data",
                "--out", out, "--max-pairs", "560", "--eval-every", "1000", "--max-valid-pairs", "56",
                "--save-every", "1000"]           # (--save-every may differ: no checkpoint before the signal's)
    script = ROOT / "01_train_reward.py"
    full = reward_models["safe"].parent
    out = tmp_path / "run"
    proc = torchrun(script, *rm_args(out))
    wait_for(lines_written(out, 3), proc, "third step")
    os.killpg(proc.pid, signal.SIGINT)                                           # Ctrl-C in the terminal
    text = finish(proc)
    assert proc.returncode != 0 and "KeyboardInterrupt" not in text
    done = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["iteration"]
    total = len(metrics(full))
    assert 3 <= done < total, "the signal arrived after the run had finished; nothing was tested"
    assert "[01] stopped by signal" in text and f"after step {done} of {total}: checkpoint written to" in text
    assert f"[01] resumed from {out / 'checkpoint'} at step {done}" in run_script(script, *rm_args(out), nproc=2)
    assert metrics(out) == metrics(full)
    assert sha(out / "model") == sha(full / "model")


def test_a_full_disk_while_saving_names_the_folder_and_leaves_no_partial_checkpoint(world, reward_models, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: every write past 300 kB fails (EFBIG), as ENOSPC would."""
    out = tmp_path / "run"
    res = run(MOLMA, *rl_args(world, reward_models, out, iterations=1), check=False, file_size_limit=300_000)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "could not write" in text and "is the disk full? Nothing was replaced" in text
    assert f"{out / 'checkpoint'} was not written, and the partial checkpoint.tmp was removed" in text
    assert not (out / "checkpoint.tmp").exists() and "Traceback" not in text.split("could not write")[-1]


def test_a_failed_save_keeps_the_previous_folder(tmp_path):
    import errno

    import common as C

    import bookkeeping as bk

    folder = tmp_path / "checkpoint"
    bk.atomic_dir_write(folder, lambda tmp: (tmp / "a.txt").write_text("old"))

    def full_disk(tmp):
        (tmp / "a.txt").write_text("new, half written")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "b.safetensors"))
    with pytest.raises(SystemExit) as e:
        bk.atomic_dir_write(folder, full_disk)
    assert f"could not write {tmp_path / 'checkpoint.tmp' / 'b.safetensors'} (OSError" in str(e.value)
    assert f"the previous {folder} is intact" in str(e.value)
    assert (folder / "a.txt").read_text() == "old" and not (tmp_path / "checkpoint.tmp").exists()


def test_prompts_longer_than_the_limit_are_cut_in_the_users_text_and_counted(world, reward_models, tmp_path):
    """A real run with --max-prompt-len 12 (the tiny world's prompts take up to 25 tokens in the template): the cut
    prompts are counted once and saved with the skipped rows; the template's tokens stay (tests/test_models.py)."""
    out = tmp_path / "run"
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=1), "--max-prompt-len", "12")
    line = [l for l in text.splitlines() if l.startswith("[data] training prompts: ")]
    assert line and "prompts are longer than 12 tokens (--max-prompt-len) and cut to fit: the start of the user's " \
                     "text is dropped, the template is kept" in line[0]
    n = int(line[0].split(": ")[1].split(" of ")[0])
    summary = json.loads((out / "run_summary.json").read_text())
    assert n > 0 and summary["skipped_rows"]["training prompts (cut to fit)"] == {"longer than 12 tokens": n}


# ---------------------------------------------------------------- the corners: what a moved folder, a
# changed world size, an interrupted save, a dead launcher or a bad file leaves, and the message a user meets
def test_a_run_folder_moved_while_training_stops_the_run_and_a_resume_with_a_partial_record_is_refused(
        world, reward_models, tmp_path):
    out, moved = tmp_path / "run", tmp_path / "moved"
    args = rl_args(world, reward_models, out, iterations=6, save_every=1)
    proc = torchrun(MOLMA, *args)
    wait_for(lambda: (out / "checkpoint" / "manifest.json").exists(), proc, "first checkpoint")
    out.rename(moved)                                                          # mv run moved, mid-run
    text = finish(proc)
    assert proc.returncode != 0 and "has disappeared while the run trained" in text
    assert not out.exists()                                 # nothing recreated there: no checkpoint, no metrics line
    # the moved folder, back in place but its metrics.jsonl missing its first line (stranded elsewhere): a resume
    # would continue a record that misses part of the run, so it is refused
    moved.rename(out)
    (out / "metrics.jsonl").write_text("".join(l + "\n" for l in (out / "metrics.jsonl").read_text().splitlines()[1:]))
    text = run_fails(MOLMA, *args, nproc=2)
    assert f"cannot resume in {out}: {out / 'metrics.jsonl'} holds " in text and "of the checkpoint's 1-" in text
    assert "put the missing files back" in text and "Traceback" not in text.split("cannot resume")[0][-1500:]


def test_a_fresh_run_keeps_an_earlier_record_it_would_have_replaced(tmp_path, capsys):
    import common as C
    import bookkeeping as bk

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("x")
    log = bk.MetricsLog(tmp_path / "metrics.jsonl", True, resume_step=None, tensorboard=False)
    log.write({"step": 1, "x": 1.0})
    kept = sorted(p.name for p in tmp_path.iterdir() if "replaced-" in p.name)
    assert len(kept) == 2 and kept[0].startswith("metrics.replaced-") and kept[0].endswith(".jsonl")
    assert (tmp_path / kept[0]).read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "the old record is kept as" in capsys.readouterr().out and len(metrics(tmp_path)) == 1


def test_a_read_only_disk_while_logging_is_named_like_a_full_one(tmp_path, monkeypatch):
    import errno

    import common as C

    import bookkeeping as bk

    log = bk.MetricsLog(tmp_path / "metrics.jsonl", True, tensorboard=False)

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "open", read_only)
    with pytest.raises(SystemExit, match=r"could not write .*metrics.jsonl \(OSError: \[Errno 30\] Read-only file "
                                         r"system.*is the disk full or read-only\? The last checkpoint is intact"):
        log.write({"step": 1})


def test_a_save_interrupted_between_its_renames_is_taken_up_when_complete(world, reward_models, uninterrupted_run,
                                                                          uninterrupted, tmp_path):
    out = copy_of(uninterrupted_run, tmp_path)
    (out / "run_summary.json").unlink()
    (out / "checkpoint").rename(out / "checkpoint.tmp")     # rank 0 killed after the first rename, before the second
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=7, save_every=2), nproc=2)
    assert (f"{out / 'checkpoint.tmp'} holds a complete checkpoint (iteration 6, every file matches its manifest): "
            f"taking it up") in text and f"resumed from {out / 'checkpoint'} at iteration 6" in text
    lines = without_times(metrics(out))
    assert len(lines) == 7 and lines[:6] == without_times(uninterrupted)
    # a checkpoint already past --iterations: nothing to do, and no file changes
    before = sha(out)
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=2, save_every=1))
    assert "nothing to do: the checkpoint at" in text and "is at iteration 7, past --iterations 2" in text
    assert sha(out) == before


def test_an_incomplete_tmp_checkpoint_is_never_taken(tmp_path):
    import common as C
    import bookkeeping as bk

    ckpt = tmp_path / "checkpoint"
    bk.atomic_dir_write(ckpt, lambda t: ((t / "trainer_state.json").write_text('{"iteration": 1}'), bk.write_manifest(t)),
                       keep_previous=True)
    bk.atomic_dir_write(ckpt, lambda t: ((t / "trainer_state.json").write_text('{"iteration": 2}'), bk.write_manifest(t)),
                       keep_previous=True)
    ckpt.rename(tmp_path / "checkpoint.tmp")
    (tmp_path / "checkpoint.tmp" / "manifest.json").unlink()                  # killed while writing: no manifest
    bk.recover_interrupted_save(ckpt, "test")
    assert json.loads((ckpt / "trainer_state.json").read_text())["iteration"] == 1    # the complete previous one
    assert (tmp_path / "checkpoint.tmp").exists()


def test_files_and_folders_reach_the_disk_before_the_renames_that_publish_them(tmp_path, monkeypatch):
    import common as C
    import bookkeeping as bk

    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(Path, "rename", lambda self, to: (events.append(("rename", str(self))), real_rename(self, to))[1])
    ckpt = tmp_path / "checkpoint"
    bk.atomic_dir_write(ckpt, lambda t: ((t / "sub").mkdir(), (t / "sub" / "w.bin").write_bytes(b"1"),
                                        (t / "manifest.json").write_text("{}")))
    first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    synced = {p for kind, p in events[:first_rename] if kind == "fsync"}
    tmp = str(tmp_path / "checkpoint.tmp")
    assert {tmp, f"{tmp}/sub", f"{tmp}/sub/w.bin", f"{tmp}/manifest.json"} <= synced
    assert ("fsync", str(tmp_path)) in events[first_rename:]                  # and the renames themselves


def test_answers_that_never_end_are_warned_of_and_a_resume_on_another_number_of_ranks_says_what_differs(
        world, reward_models, tmp_path):
    out = tmp_path / "run"
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=1, save_every=1), "--max-new-tokens", "1",
                      nproc=2)
    assert "iteration 1: no answer ended with EOS within --max-new-tokens 1" in text
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=2, save_every=1), "--max-new-tokens", "1")
    assert "the checkpoint was written by 2 ranks, this run has 1" in text
    assert "each rank's random stream restarts" in text and "which rollouts share a gradient step changes" in text
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["segments"] == [{"from_iteration": 0, "world_size": 2}, {"from_iteration": 1, "world_size": 1}]


def test_molma_on_a_finished_baseline_folder_names_the_other_method_first(world, reward_models, baseline_runs, tmp_path):
    out = copy_of(baseline_runs["so_help"][0], tmp_path)                      # a finished so_help run, 1 iteration
    text = run_fails(MOLMA, *rl_args(world, reward_models, out, iterations=1))
    assert f"{out} holds a finished so_help run (03_train_baselines.py), not a molma one" in text
    assert "--resume false" not in text and "another --out" in text and "--delta" not in text


def test_bad_files_are_named_before_the_models_load(world, reward_models, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(world / "base", truncated)
    (truncated / "config.json").write_text((truncated / "config.json").read_text()[:40])
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(world / "base", no_tokenizer)
    for f in ("tokenizer.json", "vocab.json"):
        (no_tokenizer / f).unlink(missing_ok=True)
    data = tmp_path / "data"
    shutil.copytree(world / "data", data)
    alpaca = data / "yahma" / "alpaca-cleaned" / "train.jsonl"
    lines = alpaca.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"a", b"\xe9", 1)                                          # a latin-1 byte
    alpaca.write_bytes(b"\n".join(lines))
    objects = tmp_path / "objects"                                                        # valid JSON, not an object
    shutil.copytree(world / "data", objects)
    with open(objects / "yahma" / "alpaca-cleaned" / "train.jsonl", "a") as f:
        f.write('"just a string"\n')
    a, b, c, d = fail_together(*([MOLMA, *rl_args(world, reward_models, tmp_path / name, iterations=1), *flags]
                                 for name, flags in [("a", ["--policy", truncated]), ("b", ["--policy", no_tokenizer]),
                                                     ("c", ["--data-root", data]), ("d", ["--data-root", objects])]))
    assert f"{truncated / 'config.json'} is not valid JSON" in a and "Traceback" not in a
    assert f"{no_tokenizer} has no tokenizer: none of tokenizer.json" in b and "sentencepiece" not in b
    assert f"{alpaca}, line 3: not UTF-8 text (byte 0xe9" in c and "critic:" not in c
    assert ": a JSON str, not an object" in d and "critic:" not in d and "Traceback" not in d


def test_a_worker_whose_launcher_dies_stops(world, reward_models, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(MOLMA, *rl_args(world, reward_models, out, iterations=60, save_every=100))
    wait_for(lines_written(out, 1), proc, "first iteration")
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)                                          # the launcher only: timeout, kill -9
    proc.wait()
    t0 = time.monotonic()
    while any(Path(f"/proc/{w}").exists() and "(Z)" not in Path(f"/proc/{w}/stat").read_text() for w in workers):
        assert time.monotonic() - t0 < HANG_GUARD, "the workers trained on after their launcher died"
        time.sleep(0.2)
    text = output(proc)
    assert "[molma] stopped by signal 15" in text                              # SIGTERM's path: finish, checkpoint, exit
    assert (out / "checkpoint" / "trainer_state.json").exists()


def test_a_lock_left_in_another_pid_namespace_is_taken_over_and_a_live_one_refused(tmp_path):
    """A container requeued after a preemption runs its job in a fresh pid namespace, where it gets the same pid as
    the killed run (1 here): the kernel lock tells a dead holder from a live one whatever the pids say."""
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("unshare --pid needs root (CAP_SYS_ADMIN) on this machine")
    out = tmp_path / "run"
    holder = ("import sys, time; from pathlib import Path; import common as C; import bookkeeping as bk; bk.lock_run_folder(Path(sys.argv[1]), 'run');"
              "print('locked', flush=True); time.sleep(float(sys.argv[2]))")

    def in_new_namespace(seconds):
        return subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c", holder, str(out),
                                 str(seconds)], cwd=ROOT, env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    first = in_new_namespace(600)
    assert first.stdout.readline().strip() == "locked"
    assert json.loads((out / ".lock").read_text())["pid"] == 1                # pid 1 of its namespace
    second = in_new_namespace(0)                                                # alive: the same pid 1, refused
    text = second.communicate(timeout=HANG_GUARD)[0]
    assert second.returncode != 0 and f"{out} is in use by another run (host " in text and "pid 1," in text
    first.kill()                       # SIGKILL to unshare, and so to its pid 1 (--kill-child): no teardown, the lock left
    first.wait()
    assert (out / ".lock").exists()
    third = in_new_namespace(0)                                                 # pid 1 again, and the holder is dead
    text = third.communicate(timeout=HANG_GUARD)[0]
    assert third.returncode == 0 and "taking over" in text and "locked" in text, text


def test_a_failed_write_leaves_the_previous_file_and_an_empty_record_is_refused(tmp_path):
    """Every file is written whole or not at all: a write that fails (here a file-size limit, as a full disk does)
    leaves the previous file as it was and names it, the metrics' cut on resume included; a record left empty or cut
    short (by an older version, a copy) is refused by name, never read as a finished run or a report."""
    import resource

    import common as C

    import bookkeeping as bk

    summary, metrics_file = tmp_path / "run_summary.json", tmp_path / "metrics.jsonl"
    summary.write_text(json.dumps({"method": "molma", "iterations": 2}))
    metrics_file.write_text("".join(json.dumps({"step": s, "pad": "x" * 3000}) + "\n" for s in (1, 2, 3)))
    before = summary.read_bytes(), metrics_file.read_bytes()

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)              # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    code = ("import sys, json; from pathlib import Path; import common as C; import bookkeeping as bk;"
            "bk.write_whole(Path(sys.argv[1]), json.dumps({'method': 'molma', 'pad': 'y' * 5000})) if sys.argv[3] == 'a' "
            "else bk._keep_upto(Path(sys.argv[2]), 2, 'step')")
    for which in ("a", "b"):
        out = subprocess.run([sys.executable, "-c", code, str(summary), str(metrics_file), which], cwd=ROOT,
                             env=SCRIPT_ENV, capture_output=True, text=True, preexec_fn=limited)
        name = summary if which == "a" else metrics_file
        assert out.returncode != 0 and f"could not write {name} (" in out.stderr and f"The previous {name.name} is intact" in out.stderr
    assert (summary.read_bytes(), metrics_file.read_bytes()) == before and not list(tmp_path.glob(".*.tmp"))
    bk._keep_upto(metrics_file, 2, "step")                           # without the limit: the cut is made
    assert [json.loads(l)["step"] for l in metrics_file.read_text().splitlines()] == [1, 2]
    for text in ("", '{"method": "mol'):
        summary.write_text(text)
        with pytest.raises(SystemExit, match=rf"{summary} is not valid JSON .*not written whole"):
            C.read_json(summary)


def test_resume_checks_what_the_run_reads_not_how_its_flags_are_spelled(world, reward_models, tmp_path):
    """A checkpoint records each model folder's and data file's fingerprint: the same folders spelled another way
    (through a symlink, absolute, a trailing slash) resume, and so does a flag the checkpoint does not know (added by a
    code update) at its default; a reward model whose weights changed between a preemption and the resume is refused,
    naming it, before the run trains a step against it."""
    from safetensors.torch import load_file, save_file

    rm = tmp_path / "rm_safe"
    shutil.copytree(reward_models["safe"], rm)
    (tmp_path / "link").symlink_to(world)
    out = tmp_path / "run"

    def args(iterations, policy, rm_path):
        a = rl_args(world, reward_models, out, iterations=iterations, rollouts=8, save_every=1)
        a[a.index("--policy") + 1], a[a.index("--reward-models") + 1] = policy, f"{reward_models['help']},{rm_path}"
        return a

    run_script(MOLMA, *args(1, tmp_path / "link" / "base", rm))
    state_file = out / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert {v["flag"] for v in state["inputs"].values()} == {"--policy", "--reward-models", "--data-root"}
    del state["config"]["kl_beta"]                                  # as a checkpoint of a version before the flag
    state_file.write_text(json.dumps(state))
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())   # keep it verifiable
    manifest["trainer_state.json"] = {"bytes": state_file.stat().st_size,
                                      "sha256": hashlib.sha256(state_file.read_bytes()).hexdigest()}
    (out / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))
    text = run_script(MOLMA, *args(2, f"{Path(os.path.realpath(world))}/base/", f"{rm}/"))
    assert "[molma] resumed from" in text and len(metrics(out)) == 2
    weights = load_file(rm / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] + 0.5       # another reward model in the same folder
    save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((rm / "config.json").read_text())
    del config["molma_weights_sha256"]                             # a folder from elsewhere records no checksum
    (rm / "config.json").write_text(json.dumps(config))
    text = run_fails(MOLMA, *args(3, tmp_path / "link" / "base", rm))
    assert "what the run reads has changed since its checkpoint" in text
    assert f"--reward-models: {os.path.realpath(rm / 'model.safetensors')} has changed (sha256 " in text
    assert "critic:" not in text and len(metrics(out)) == 2


def test_a_full_disk_under_tensorboard_is_named_like_a_full_record(tmp_path):
    """TensorBoard writes from a thread of its own; its write error (here a file-size limit, as a full disk) stops the
    run with the folder and what to do, as a failed metrics.jsonl write does, not a bare traceback from the thread."""
    import resource

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    code = ("import sys; from pathlib import Path; import common as C; import bookkeeping as bk;"
            "log = bk.MetricsLog(Path(sys.argv[1]) / 'metrics.jsonl', True);"
            "[log.write({'step': s, **{f'k{i}': 0.5 for i in range(60)}}) for s in range(1, 400)]")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=SCRIPT_ENV, capture_output=True,
                         text=True, preexec_fn=limited)
    assert out.returncode != 0, out.stderr[-2000:]
    assert f"could not write {tmp_path / 'tensorboard'} (" in out.stderr and "is the disk full or read-only?" in out.stderr
    assert "Exception in thread" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
