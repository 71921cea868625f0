"""``bench/device_check.sh --cpu``: every check of the GPU machine's script passes on CPU with the tiny model, so the
script itself (its runs, their overrides, the verifications) is known to work before a GPU runs it."""

import re

import pytest

from tests.helpers.processes import checkout_env, run_in_session


@pytest.mark.slow
def test_device_check_passes_every_check_on_cpu(tmp_path):
    done = run_in_session(
        ["bash", "bench/device_check.sh", "--cpu"],
        timeout=600,
        env=checkout_env(DEVICE_CHECK_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
    )
    verdicts = re.findall(r"^(PASS|FAIL) (.+?)(?::|\s\(log)", done.stdout, flags=re.MULTILINE)
    failed = [name for verdict, name in verdicts if verdict == "FAIL"]
    assert done.returncode == 0 and not failed, done.stdout[-6000:]
    assert len(verdicts) == 14, done.stdout  # 13 checks and the throughput bench
    assert "0 check(s) failed" in done.stdout
