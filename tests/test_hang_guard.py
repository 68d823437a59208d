"""The suite's hang guard: a stuck script fails its test with a message naming it, not a bare timeout."""
import pytest

from conftest import run


def test_a_hung_script_fails_with_its_name_duration_and_output():
    code = "import time; print('started', flush=True); time.sleep(120)"
    with pytest.raises(pytest.fail.Exception) as e:
        run("-c", code, timeout=3)
    msg = str(e.value)
    assert msg.startswith("hung: ") and "sleep(120)" in msg and "still running after 3 s" in msg and "started" in msg
