"""The Python side of ``bench/device_check.sh``: make its data, and verify what each check's run left behind.

    python -m bench.device_check device [--require-gpu]  # CUDA visible, driver and torch versions
    python -m bench.device_check data FOLDER             # Fashion-MNIST-format files for the runs and evaluations
    python -m bench.device_check losses RUN [--step N]   # finite training losses; last.ckpt at step N
    python -m bench.device_check teacher RUN             # alpha > 0 at every step and an EMA teacher in last.ckpt
    python -m bench.device_check evaluation RUN          # zero-shot, linear-probe and retrieval figures in [0, 1]
    python -m bench.device_check compiled LOG            # recompiles and graph breaks TORCH_LOGS reported
    python -m bench.device_check open-clip FOLDER        # an exported folder loads in open_clip and encodes

Each prints one line of figures and exits non-zero when its check fails (``bench/sync_window.py`` counts host syncs).
"""

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def device(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print(f"no GPU: torch {torch.__version__} on CPU")
        assert not args.require_gpu, "torch sees no CUDA device"
        return
    driver = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(
        f"{torch.cuda.get_device_name()}, driver {driver or 'unknown'}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), {torch.cuda.device_count()} device(s), bf16 {torch.cuda.is_bf16_supported()}"
    )


def data(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_fashion_mnist

    # 320 training pairs (the embedded train split), 100 test images for every evaluation task
    print(make_fashion_mnist(Path(args.folder), train=349, test=100))


def run_folder(run: str) -> Path:
    """RUN itself, or the newest run folder under a ``paths.log_dir``."""
    path = Path(run)
    runs = sorted(path.glob("train/runs/*"), key=lambda folder: folder.stat().st_mtime)
    return runs[-1] if runs else path


def logged(run: Path, name: str) -> list[float]:
    import pandas as pd

    table = pd.read_csv(run / "csv" / "metrics.csv")
    return table[name].dropna().tolist() if name in table else []


def losses(args: argparse.Namespace) -> None:
    from psdclip.run.checkpoint_files import load_checkpoint_file

    run = run_folder(args.run)
    values = logged(run, "train/loss")
    step = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"]
    print(f"{len(values)} finite losses, the last {values[-1] if values else None:.4g}; last.ckpt at step {step}")
    assert values and all(math.isfinite(value) for value in values), f"non-finite or no losses: {values}"
    assert args.step is None or step == args.step, f"last.ckpt is at step {step}, expected {args.step}"


def teacher(args: argparse.Namespace) -> None:
    from psdclip.run.checkpoint_files import load_checkpoint_file

    run = run_folder(args.run)
    alphas = logged(run, "train/alpha")
    state = load_checkpoint_file(run / "checkpoints" / "last.ckpt")["state_dict"]
    averaged = [key for key in state if key.startswith("teacher.")]
    print(f"alpha {alphas}, {len(averaged)} teacher tensors in last.ckpt")
    assert alphas and min(alphas) > 0, "alpha must be > 0 from the first step: the teacher's forward runs"
    assert averaged, "no EMA teacher in the checkpoint"


def evaluation(args: argparse.Namespace) -> None:
    run = run_folder(args.run)
    metrics = json.loads((run / "eval_results.json").read_text())["metrics"]
    wanted = {
        task: [name for name in metrics if re.search(pattern, name)]
        for task, pattern in (
            ("zeroshot", "/zeroshot_top1$"),
            ("linear probe", "/linear_probe_top1$"),
            ("retrieval", "/retrieval_r\\d+$"),
        )
    }
    print("; ".join(f"{task}: {', '.join(f'{n}={metrics[n]:.3f}' for n in names)}" for task, names in wanted.items()))
    for task, names in wanted.items():
        assert names, f"no {task} figure in eval_results.json"
        assert all(0 <= metrics[name] <= 1 for name in names), f"{task} figure out of [0, 1]"


def compiled(args: argparse.Namespace) -> None:
    text = Path(args.log).read_text(errors="replace")
    recompiles = len(re.findall(r"Recompiling function", text))
    breaks = len(re.findall(r"Graph break", text))
    print(f"torch.compile: {recompiles} recompile(s), {breaks} graph break(s) reported by TORCH_LOGS")


def open_clip_load(args: argparse.Namespace) -> None:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{args.folder}")
    size = preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    with torch.no_grad():
        features = model.encode_image(torch.zeros(2, 3, size, size))
    print(f"open_clip loaded {args.folder}: image features {tuple(features.shape)}")
    assert torch.isfinite(features).all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("device").set_defaults(func=device)
    commands.choices["device"].add_argument("--require-gpu", action="store_true", help="fail without a GPU")
    commands.add_parser("data").set_defaults(func=data)
    commands.choices["data"].add_argument("folder")
    for name, function in (("losses", losses), ("teacher", teacher), ("evaluation", evaluation)):
        command = commands.add_parser(name)
        command.add_argument("run", help="a run folder, or the paths.log_dir of one run")
        command.set_defaults(func=function)
    commands.choices["losses"].add_argument("--step", type=int, help="the step last.ckpt must be at")
    commands.add_parser("compiled").set_defaults(func=compiled)
    commands.choices["compiled"].add_argument("log")
    commands.add_parser("open-clip").set_defaults(func=open_clip_load)
    commands.choices["open-clip"].add_argument("folder")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
