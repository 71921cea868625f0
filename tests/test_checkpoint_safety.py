"""A checkpoint is data, never code (issue 39): every entry point that takes a checkpoint loads it with torch's
``weights_only`` unpickler, refuses a crafted pickle in one line before it can run, and still loads what psdclip
itself writes.

Command-line runs are real subprocesses, each in its own session, killed with their children when a test ends.
"""

import sys
from pathlib import Path

import pytest
import torch

from psdclip.models import read_checkpoint
from psdclip.run.checkpoint_files import AtomicCheckpointIO, UnsafeCheckpointError, load_checkpoint_file
from tests.conftest import tiny_paths
from tests.helpers.checkpoints import save_tiny_checkpoint
from tests.helpers.processes import checkout_env, run_in_session


class CreatesFile:
    """Unpickled, it opens (so creates) ``path``: what a malicious checkpoint's ``__reduce__`` would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def crafted_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A file shaped like a psdclip checkpoint whose pickle creates ``marker`` when loaded unsafely."""
    marker = folder / "marker"
    path = folder / "crafted" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(
        {"hyper_parameters": {"model_name": "psdclip-vit-tiny"}, "state_dict": {}, "payload": CreatesFile(marker)},
        path,
    )
    return path, marker


def entry_point(name: str, checkpoint: Path, tmp_path: Path, fashion_mnist_dir: Path) -> list[str]:
    paths = [*tiny_paths(fashion_mnist_dir, tmp_path), f"hydra.run.dir={tmp_path / 'run'}"]
    return {
        "evaluate": ["evaluate.py", f"ckpt={checkpoint}", *paths],
        "export": ["-m", "psdclip.tools.export", f"ckpt={checkpoint}", f"out={tmp_path / 'exported'}"],
        "frozen teacher": ["train.py", "teacher=frozen", f"teacher.checkpoint={checkpoint}", "debug=tiny", *paths],
        "resume": ["train.py", f"ckpt_path={checkpoint}", "debug=tiny", *paths],
        "audit": ["-m", "psdclip.tools.audit", f"ckpt={checkpoint}", *paths],
    }[name]


@pytest.mark.parametrize("name", ["evaluate", "export", "frozen teacher", "resume", "audit"])
def test_a_crafted_checkpoint_is_refused_in_one_line_without_running(name, tmp_path, fashion_mnist_dir):
    checkpoint, marker = crafted_checkpoint(tmp_path)
    env = checkout_env()
    env.pop("HYDRA_FULL_ERROR", None)
    done = run_in_session(
        [sys.executable, *entry_point(name, checkpoint, tmp_path, fashion_mnist_dir)],
        timeout=300,
        env=env,
        merge_output=False,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1, done.stderr[-3000:]
    expected = (
        f"error: {checkpoint} is not a checkpoint psdclip can load safely (its pickle calls io.open, which torch's "
        "weights_only loader refuses); a psdclip checkpoint holds only tensors and plain types: load checkpoints "
        "that psdclip wrote"
    )
    assert errors == [expected], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not marker.exists()


def test_the_loaders_refuse_the_pickle_before_it_runs(tmp_path):
    checkpoint, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="its pickle calls io.open"):
        load_checkpoint_file(checkpoint)
    with pytest.raises(UnsafeCheckpointError, match="is not a checkpoint psdclip can load safely"):
        read_checkpoint(checkpoint, "ema")
    with pytest.raises(UnsafeCheckpointError, match="is not a checkpoint psdclip can load safely"):
        AtomicCheckpointIO().load_checkpoint(checkpoint, weights_only=False)  # Lightning's request is overruled
    assert not marker.exists()
    torch.load(checkpoint, weights_only=False)  # the test's own check: loaded unsafely, the payload does run
    assert marker.exists()


def test_what_psdclip_writes_loads_as_data(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.ckpt")
    content = AtomicCheckpointIO().load_checkpoint(checkpoint)
    assert content["hyper_parameters"]["model_name"] == "psdclip-vit-tiny"
    name, state = read_checkpoint(checkpoint)
    assert name == "psdclip-vit-tiny"
    assert state.keys() and all(
        torch.equal(value, content["state_dict"][f"model.{key}"]) for key, value in state.items()
    )


def test_no_unsafe_load_in_the_package_bench_or_entry_points():
    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("psdclip/**/*.py"), *root.glob("bench/*.py"), root / "train.py", root / "evaluate.py"]
    unsafe = [str(path) for path in sources if "weights_only=False" in path.read_text()]
    assert len(sources) > 50 and unsafe == []
