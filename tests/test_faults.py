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

from conftest import HANG_GUARD, ROOT, rl_args, run_fails, run_script

MOLMA = ROOT / "02_train_molma.py"


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]


def without_times(lines):
    return [{k: v for k, v in l.items() if not k.startswith("time/")} for l in lines]


def torchrun(*args, max_restarts=0):
    """Start a 2-process torchrun in its own process group; -> Popen (stdout and stderr to a temporary file)."""
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"molma_fault_{os.getpid()}_{time.monotonic_ns()}.log", "w+")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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


@pytest.mark.parametrize("how", ["SIGTERM to torchrun", "Ctrl-C"])
def test_sigterm_or_ctrl_c_mid_run_checkpoints_and_the_rerun_continues_exactly(world, reward_models, uninterrupted,
                                                                               tmp_path, how):
    out = tmp_path / "run"
    args = rl_args(world, reward_models, out, iterations=6, save_every=100)    # no periodic checkpoint before the end
    proc = torchrun(MOLMA, *args)
    wait_for(lines_written(out, 1), proc, "first iteration")
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)                                     # a terminal signals the whole group
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


def sha(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nan_steps_are_skipped_counted_and_stop_the_run_without_touching_the_checkpoint(world, reward_models, tmp_path):
    out = tmp_path / "run"
    rm_help = tmp_path / "rm_help"                 # a copy, poisoned in place below (the resumed run's arguments
    shutil.copytree(reward_models["help"], rm_help)  # must equal the checkpoint's)
    rms = {**reward_models, "help": rm_help}
    run_script(MOLMA, *rl_args(world, rms, out, iterations=2, save_every=2), nproc=2)
    before = sha(out / "checkpoint"), sha(out / "policy")
    # from iteration 3 on, RMhelp returns NaN (as a reward model with an inf or a bf16 overflow would)
    from safetensors.torch import load_file, save_file
    w = load_file(rm_help / "model.safetensors")
    w["score.weight"][:] = float("nan")
    save_file(w, rm_help / "model.safetensors", metadata={"format": "pt"})
    text = run_fails(MOLMA, *rl_args(world, rms, out, iterations=6, save_every=2, max_nonfinite_steps=3), nproc=2)
    assert ("[molma] stopped: 3 policy optimizer steps in a row had non-finite numbers (each was skipped, so no weight took "
            "them in). The first: help/apa_loss (iteration 3, minibatch 1).") in text
    assert f"the last checkpoint, {out / 'checkpoint'} (iteration 2), is untouched" in text
    assert (sha(out / "checkpoint"), sha(out / "policy")) == before         # neither checkpoint nor policy rewritten
    lines = metrics(out)
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert lines[-1]["nonfinite/skipped_policy_steps"] == 2 and lines[1]["nonfinite/skipped_policy_steps"] == 0


def test_a_damaged_checkpoint_is_named_the_previous_one_offered_and_resume_false_starts_over(world, reward_models, tmp_path):
    out = tmp_path / "run"
    run_script(MOLMA, *rl_args(world, reward_models, out, iterations=2, save_every=1), nproc=2)
    assert json.loads((out / "checkpoint.prev" / "trainer_state.json").read_text())["iteration"] == 1
    optim = out / "checkpoint" / "optim_policy.safetensors"
    optim.write_bytes(optim.read_bytes()[:1000])                               # truncated (a full disk, a killed copy)
    text = run_fails(MOLMA, *rl_args(world, reward_models, out, iterations=3, resume="true"), nproc=2)
    assert f"the checkpoint at {out / 'checkpoint'} is damaged and cannot be resumed: {optim} has 1000 bytes" in text
    assert f"the previous checkpoint is kept at {out / 'checkpoint.prev'} (iteration 1)" in text
    assert "--resume false" in text and "Traceback" not in text.split("damaged")[0][-2000:]
    # --resume false starts over (and says what it discards), whatever the state of the old checkpoint
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=1, resume="false"))
    assert f"--resume false: starting over; the checkpoint at {out / 'checkpoint'} (iteration 2) is discarded" in text
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


@pytest.mark.parametrize("flags,message", [
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
])
def test_bad_inputs_are_refused_at_start_naming_the_flag(world, reward_models, tmp_path, flags, message):
    """Refused before any model loads (no 'critic:' line), with the flag named and no traceback."""
    (tmp_path / "a_file").write_text("")
    flags = [str(reward_models["help"]) if f == "RM" else str(tmp_path / "a_file") if f == "FILE" else f for f in flags]
    args = rl_args(world, reward_models, tmp_path / "x", iterations=1)
    if len(flags) == 1:                      # --flag=value (a negative number needs the = form in argparse)
        args.append(flags[0])
    elif flags[0] in args:
        args[args.index(flags[0]) + 1] = flags[1]
    else:
        args += flags
    text = run_fails(MOLMA, *args)
    assert message in text and "Traceback" not in text and "critic:" not in text


def test_resuming_under_changed_arguments_is_refused_before_loading(world, reward_models, tmp_path):
    out = tmp_path / "run"
    run_script(MOLMA, *rl_args(world, reward_models, out, iterations=1))          # a K = 2 run, help then safe
    changed = rl_args(world, reward_models, out, iterations=2, rollouts=8) + ["--objectives", "safe,help"]
    text = run_fails(MOLMA, *changed)
    assert "the checkpoint at" in text and "was trained with other arguments; resuming would mix two runs" in text
    assert "--objectives: 'help,safe' -> 'safe,help'" in text and "--rollouts: 16 -> 8" in text
    assert "--resume false" in text and "another --out" in text and "critic:" not in text and "Traceback" not in text
    assert "--objectives: 'help,safe' -> 'help'" in run_fails(MOLMA, *rl_args(world, reward_models, out, iterations=2),
                                                               "--objectives", "help")     # K = 2 resumed as K = 1
    # what may change: the length of the run (and how it is logged)
    text = run_script(MOLMA, *rl_args(world, reward_models, out, iterations=2, sample_every=1))
    assert "[molma] resumed from" in text and len(metrics(out)) == 2


def test_one_writer_per_folder(world, reward_models, tmp_path):
    out = tmp_path / "run"
    args = rl_args(world, reward_models, out, iterations=4)
    first = torchrun(MOLMA, *args)
    wait_for(lambda: (out / ".lock").exists(), first, "the run folder's lock")
    owner = json.loads((out / ".lock").read_text())
    text = run_fails(MOLMA, *args)                                               # a second run on the same --out
    assert f"is in use by another run (host {owner['host']}, pid {owner['pid']}, started {owner['started']})" in text
    assert "Wait for it, or use another --out" in text and "critic:" not in text
    assert "pid" in owner and finish(first) and first.returncode == 0
    assert [l["step"] for l in metrics(out)] == [1, 2, 3, 4] and not (out / ".lock").exists()   # released at the end


def test_ctrl_c_during_reward_model_training_checkpoints_and_the_rerun_continues_exactly(world, tmp_path):
    def rm_args(out):
        return ["--preset", "tiny", "--objective", "safe", "--base-model", world / "base", "--data-root", world / "data",
                "--out", out, "--max-pairs", "2800", "--eval-every", "1000", "--max-valid-pairs", "28",
                "--save-every", "1000"]
    script = ROOT / "01_train_reward.py"
    run_script(script, *rm_args(tmp_path / "full"), nproc=2)
    out = tmp_path / "run"
    proc = torchrun(script, *rm_args(out))
    wait_for(lines_written(out, 3), proc, "third step")
    os.killpg(proc.pid, signal.SIGINT)                                           # Ctrl-C in the terminal
    text = finish(proc)
    assert proc.returncode != 0 and "KeyboardInterrupt" not in text
    done = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["iteration"]
    total = len(metrics(tmp_path / "full"))
    assert 3 <= done < total, "the signal arrived after the run had finished; nothing was tested"
    assert "[01] stopped by signal" in text and f"after step {done} of {total}: checkpoint written to" in text
    assert f"[01] resumed from {out / 'checkpoint'} at step {done}" in run_script(script, *rm_args(out), nproc=2)
    assert metrics(out) == metrics(tmp_path / "full")
    assert sha(out / "model") == sha(tmp_path / "full" / "model")


def test_a_full_disk_while_saving_names_the_folder_and_leaves_no_partial_checkpoint(world, reward_models, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: every write past 300 kB fails (EFBIG), as ENOSPC would."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    out = tmp_path / "run"
    cmd = [sys.executable, str(MOLMA), *map(str, rl_args(world, reward_models, out, iterations=1))]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=small_files, timeout=HANG_GUARD,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "could not write" in text and "is the disk full? Nothing was replaced" in text
    assert f"{out / 'checkpoint'} was not written, and the partial checkpoint.tmp was removed" in text
    assert not (out / "checkpoint.tmp").exists() and "Traceback" not in text.split("could not write")[-1]


def test_a_failed_save_keeps_the_previous_folder(tmp_path):
    import errno

    import common as C

    folder = tmp_path / "checkpoint"
    C.atomic_dir_write(folder, lambda tmp: (tmp / "a.txt").write_text("old"))

    def full_disk(tmp):
        (tmp / "a.txt").write_text("new, half written")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "b.safetensors"))
    with pytest.raises(SystemExit) as e:
        C.atomic_dir_write(folder, full_disk)
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
