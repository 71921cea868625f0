"""``bench/device_check.sh --cpu``: every check of the GPU machine's script passes on CPU with the tiny model, so the
script itself (its runs, their overrides, the verifications) is known to work before a GPU runs it."""

import re
import sys

import pytest

from tests.helpers.processes import checkout_env, run_in_session

# model.compile=true on CPU spends ~2 min in inductor's C++ builds; tests/test_gpu_paths.py trains with it and with
# micro-batches under static-graph DDP, so CI skips those two checks here (the ddp check runs their DDP launcher),
# and the check's TORCH_LOGS count is tested below
SKIPPED = "compile micro_batches"


@pytest.mark.slow
def test_device_check_passes_every_check_on_cpu(tmp_path):
    done = run_in_session(
        ["bash", "bench/device_check.sh", "--cpu"],
        timeout=600,
        env=checkout_env(DEVICE_CHECK_DIR=str(tmp_path), DEVICE_CHECK_SKIP=SKIPPED, OMP_NUM_THREADS="1"),
    )
    verdicts = re.findall(r"^(PASS|FAIL|SKIP) ", done.stdout, flags=re.MULTILINE)
    assert done.returncode == 0 and "FAIL" not in verdicts, done.stdout[-6000:]
    # install, device, 9 training and verification checks, the bench; two skipped
    assert verdicts.count("PASS") == 11 and verdicts.count("SKIP") == 2, done.stdout
    assert re.search(
        r"^PASS export, load in open_clip: open_clip loaded .* image features \(2, 128\) \[\d+ s\]$",
        done.stdout,
        re.MULTILINE,
    )
    assert re.search(
        r"^PASS throughput against open_clip's trainer: psd \(ema\) / clip +\d\.\d{3} \[\d+ s\]$",
        done.stdout,
        re.MULTILINE,
    )
    assert "0 check(s) failed" in done.stdout


def test_only_the_named_checks_run_besides_install_and_device(tmp_path):
    done = run_in_session(
        ["bash", "bench/device_check.sh", "--cpu"],
        timeout=300,
        env=checkout_env(DEVICE_CHECK_DIR=str(tmp_path), DEVICE_CHECK_ONLY="device"),
    )
    assert done.returncode == 0, done.stdout[-3000:]
    passed = re.findall(r"^PASS .* \[\d+ s\]$", done.stdout, flags=re.MULTILINE)
    assert [line.split(":")[0] for line in passed] == ["PASS install", "PASS CUDA visible, driver version"], done.stdout
    # 10 training and verification checks and the bench, none of them started
    assert len(re.findall(r"^SKIP .* \(not in DEVICE_CHECK_ONLY\)$", done.stdout, flags=re.MULTILINE)) == 11
    assert not (tmp_path / "runs").exists()


def test_compile_check_counts_recompiles_and_graph_breaks(tmp_path):
    log = tmp_path / "compiled.torch_log"
    log.write_text(
        "V1203 torch/_dynamo/guards.py] [0/1] [__recompiles] Recompiling function forward in model.py:10\n"
        "V1203 torch/_dynamo/symbolic_convert.py] [0/0] [__graph_breaks] Graph break in user code at loss.py:40\n"
        "V1203 torch/_dynamo/symbolic_convert.py] [1/0] [__graph_breaks] Graph break in user code at loss.py:52\n"
    )
    done = run_in_session([sys.executable, "-m", "bench.device_check", "compiled", str(log)], timeout=120)
    assert done.returncode == 0, done.stdout
    assert "1 recompile(s), 2 graph break(s)" in done.stdout
