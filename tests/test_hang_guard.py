"""The suite's guards and the way every stage ends: a stuck script or a C++ abort at exit fails its test with a
message naming it, not a bare timeout or exit code; common.teardown ends a process with its output flushed."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run


def test_a_hung_script_fails_with_its_name_duration_and_output():
    code = "import time; print('started', flush=True); time.sleep(120)"
    with pytest.raises(pytest.fail.Exception) as e:
        run("-c", code, timeout=3)
    msg = str(e.value)
    assert msg.startswith("hung: ") and "sleep(120)" in msg and "still running after 3 s" in msg and "started" in msg


@pytest.mark.both_cores
@pytest.mark.parametrize("nproc", [None, 2])
def test_an_abort_after_the_work_is_named_a_teardown_abort(tmp_path, nproc):
    """What the teardown abort looked like: the last line printed, then SIGABRT (here os.abort(), on rank 1 under torchrun)."""
    script = tmp_path / "aborts.py"
    script.write_text("import os\nprint('all work done', flush=True)\n"
                      "if os.environ.get('RANK', '1') == '1':\n    os.abort()\n")
    with pytest.raises(pytest.fail.Exception) as e:            # fresh: a worker's abort as torchrun reports its own
        run(script, nproc=nproc, fresh=True)
    msg = str(e.value)
    assert msg.startswith("teardown abort: ") and "finished its work, then exited with signal 6 (SIGABRT)" in msg
    assert "all work done" in msg
    # a Python error that ends in an abort is not a teardown abort: the error is the message
    script.write_text("import os, sys\nprint('Traceback (most recent call last):\\nValueError: bad', file=sys.stderr)\n"
                      "os.abort()\n")
    with pytest.raises(AssertionError, match="ValueError: bad"):
        run(script, nproc=nproc, fresh=True)


def test_teardown_ends_the_process_with_its_code_and_everything_flushed(tmp_path):
    """os._exit skips the interpreter's own flushing: teardown must flush first (stdout is a pipe here, so buffered)."""
    code = ("import sys; sys.path.insert(0, %r); import common as C\n"
            "print('stdout line'); print('stderr line', file=sys.stderr)\n"
            "open(%r, 'w').write('closed file')\n"
            "C.teardown(3)\nprint('never')" % (str(ROOT), str(tmp_path / "f.txt")))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout == "stdout line\n" and out.stderr.endswith("stderr line\n")
    assert (tmp_path / "f.txt").read_text() == "closed file"
