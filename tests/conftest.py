import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402


def run_script(*args, nproc=None, timeout=600, cwd=ROOT):
    """Run a numbered script as a user would: python, or torchrun with nproc processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, *map(str, args)]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The default tiny world, built once per test session (its build time is checked in test_world)."""
    out = tmp_path_factory.mktemp("tiny") / "world"
    t0 = time.time()
    run_script(ROOT / "00_make_tiny_world.py", "--out", out)
    out.joinpath("build_seconds").write_text(f"{time.time() - t0:.1f}")
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
    """A few cheap iterations of the tiny preset, for the RL smoke tests."""
    args = ["--preset", "tiny", "--policy", world / "base", "--data-root", world / "data",
            "--reward-models", f"{reward_models['help']},{reward_models['safe']}", "--out", out,
            "--iterations", str(iterations), "--rollouts", "16", "--minibatch", "8", "--max-new-tokens", "24"]
    for k, v in extra.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args
