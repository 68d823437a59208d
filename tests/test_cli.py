"""What a user types: every script's --help, and yes/no flags in the forms transformers' HfArgumentParser takes."""
import dataclasses
import re
import subprocess
import sys

import pytest

import common as C

import bookkeeping as bk
from conftest import ROOT, run_together

SCRIPTS = ["00_make_tiny_world.py", "01_train_reward.py", "02_train_molma.py", "03_train_baselines.py", "04_evaluate.py",
           "05_study.py", "bench/benchmark.py", "bench/stress_teardown.py", "bench/rm_pipeline_agreement.py", "bench/trl_compare.py",
           "tools/convert_gguf.py"]


@pytest.fixture(scope="module")
def helps():
    """Every script's --help, run_together: {script: CompletedProcess}."""
    return dict(zip(SCRIPTS, run_together(*([ROOT / script, "--help"] for script in SCRIPTS), check=False)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_of_every_script(helps, script):
    out = helps[script]
    assert out.returncode == 0, out.stderr[-3000:]
    text = " ".join(out.stdout.split())                    # argparse wraps lines
    assert text.startswith("usage:") and "Traceback" not in out.stderr
    assert "(default: )" not in text and not re.search(r"\(default: [^)]*\) \(default:", text)   # each default once
    if script.startswith("02"):
        assert "auto|true|false" in text and "a total over all ranks" in text
        assert "--dry-run [true|false]" in text and "(default: 100)" in text


@dataclasses.dataclass
class Flags(bk.CheckedArgs):
    dry_run: bool = bk.arg(False, "a yes/no flag")
    n: int = bk.arg(1, "a number")


@pytest.mark.parametrize("argv,want", [([], False), (["--dry-run"], True), (["--dry-run", "true"], True),
                                       (["--dry-run", "TRUE"], True), (["--dry-run", "yes"], True),
                                       (["--dry-run", "1"], True), (["--dry-run", "No"], False),
                                       (["--dry-run", "0"], False), (["--dry-run", "false"], False),
                                       (["--dry-run", "--n", "2"], True)])
def test_yes_no_flags_in_every_form(argv, want):
    assert bk.parse_args(Flags, argv).dry_run is want


@pytest.mark.parametrize("typo", ["ture", "on", "maybe", ""])
def test_a_yes_no_typo_is_an_error_naming_the_flag(typo, capsys):
    with pytest.raises(SystemExit) as e:
        bk.parse_args(Flags, ["--dry-run", typo])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dry-run: expected true or false (also yes/no, 1/0), got" in err and repr(typo) in err


WANDB_SCRIPTS = ["01_train_reward.py", "02_train_molma.py", "03_train_baselines.py", "04_evaluate.py"]


@pytest.fixture(scope="module")
def wandb_runs(tmp_path_factory):
    """Each stage given --wandb-project where wandb is not installed, run_together: {script: (CompletedProcess, --out)}."""
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    root = tmp_path_factory.mktemp("wandb")
    outs = [root / script / "run" for script in WANDB_SCRIPTS]
    for out in outs:
        out.parent.mkdir()
    done = run_together(*([ROOT / script, "--wandb-project", "p", "--out", out] for script, out in zip(WANDB_SCRIPTS, outs)),
                        check=False, cwd=root)
    return {script: (res, out) for script, res, out in zip(WANDB_SCRIPTS, done, outs)}


@pytest.mark.parametrize("script", WANDB_SCRIPTS)
def test_wandb_without_the_package_stops_before_anything_loads_or_is_written(wandb_runs, script):
    res, out = wandb_runs[script]
    assert res.returncode != 0 and "--wandb-project needs the wandb package" in res.stderr
    assert not out.exists() and "Traceback" not in res.stderr



def test_wandb_mirrors_tensorboard_so_there_is_one_logging_path(tmp_path, monkeypatch):
    """W&B is started before the TensorBoard writer, with sync_tensorboard, and is never written to directly."""
    import types

    import torch.utils.tensorboard as tb

    calls, real = [], tb.SummaryWriter
    run = types.SimpleNamespace(finish=lambda: calls.append("finish"), log=lambda *a, **k: calls.append("log"))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run))
    monkeypatch.setattr(tb, "SummaryWriter", lambda *a, **k: calls.append("writer") or real(*a, **k))
    log = bk.MetricsLog(tmp_path / "metrics.jsonl", True, wandb_project="p")
    log.write({"step": 1, "x/y": 0.5})
    log.samples(1, [{"prompt": "p", "answer": "a"}])
    log.close()
    assert calls[0]["sync_tensorboard"] is True and calls[0]["project"] == "p" and calls[1:] == ["writer", "finish"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))      # what W&B mirrors

def test_run_sh_repeats_a_failed_stages_cause_as_the_last_line(tmp_path):
    """torchrun ends a failure with its ChildFailedError block; run.sh repeats the stage's own message after it."""
    script = tmp_path / "stage.sh"
    script.write_text("set -euo pipefail\n"
                      f"source <(sed -n '/^say_cause()/,/^}}/p' {ROOT / 'run.sh'})\n"
                      f"say_cause {sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 "
                      f"{ROOT / '02_train_molma.py'} --policy {tmp_path} --omega 1,-1\n")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    lines = [l for l in (res.stdout + res.stderr).splitlines() if l.strip()]
    assert res.returncode != 0 and "ChildFailedError" in res.stdout + res.stderr
    assert lines[-1] == ("[run.sh] " + str(ROOT / "02_train_molma.py") + " failed: --omega must be non-negative task "
                         "importances with a positive sum, got 1,-1")


def test_04_takes_precision_and_refuses_a_typo_before_anything_is_written(tmp_path):
    out = tmp_path / "report"
    res = subprocess.run([sys.executable, str(ROOT / "04_evaluate.py"), "--precision", "fp16", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode != 0 and "--precision must be auto, bf16 or fp32, got 'fp16'" in res.stderr
    assert not out.exists() and "Traceback" not in res.stderr


def test_hfargumentparsers_spellings_are_accepted_and_a_rule_holds_in_code_too():
    """HfArgumentParser's own spellings (underscored, --no-flag) parse as the dashed ones; the rules ride on the
    field types and are checked in __post_init__, so arguments made in code are refused like those typed."""
    assert bk.parse_args(Flags, ["--dry_run", "--n", "3"]) == Flags(dry_run=True, n=3)
    args = bk.parse_args(bk.RLArgs, ["--no-keep-previous", "--keep_previous", "true", "--no-keep-previous"])
    assert args.keep_previous is False and bk.parse_args(bk.RLArgs, []).keep_previous is True
    with pytest.raises(SystemExit, match="--lr must be positive, got -1"):
        bk.RLArgs(lr=-1.0)
    with pytest.raises(SystemExit, match="--gamma must lie in \\[0, 1\\], got 2"):
        bk.parse_args(bk.RLArgs, ["--gamma", "2"])
    with pytest.raises(SystemExit, match="--kl-beta must be a finite number, got inf"):
        bk.RLArgs(kl_beta=float("inf"))
