"""Training samples/s of psdclip against open_clip's own trainer (``open_clip_train.main``): the same model, generated
JPEG shards, per-device batch, precision, workers and AdamW, in alternating rounds.

    python -m bench.train_throughput                                   # CPU: tiny ViT, batch 128, 2 workers, fp32
    python -m bench.train_throughput --model vit_b32 --precision bf16 --batch-size 256 --workers 8   # one GPU

Each round runs, each in a fresh process and in a rotating order: open_clip, psdclip ``loss=clip``, the default
``loss=psd`` (EMA teacher) and PSD with ``teacher=self``, both distilling from the first step
(``loss.schedule=constant``, so the teacher runs in every timed step). psdclip applies TF32 and cuDNN autotuning on a
GPU (``cuda:`` in conf/train.yaml), as open_clip's trainer does. A global optimiser-step hook, installed the same way
in both trainers, times the steps after ``--warmup`` steps: start-up, worker spawn and the first steps are left out.
Printed: the median samples/s of each, psdclip/open_clip and PSD/CLIP, peak GPU memory, and MFU: the towers' FLOPs
per sample (``torch.utils.flop_counter``, forward + backward = 3 × forward, the teacher's forward not counted)
against the device's dense peak (``--peak-tflops``; known for a few GPUs in bf16, otherwise n/a).
"""

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]
MODELS = {"vit_tiny": "psdclip-vit-tiny", "vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "rn50": "RN50"}
# precision → (psdclip's trainer.precision, open_clip's --precision)
PRECISIONS = {"fp32": ("32-true", "fp32"), "bf16": ("bf16-mixed", "amp_bf16"), "fp16": ("16-mixed", "amp")}
# dense bf16 tensor-core peaks (TFLOP/s) by device name
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# the PSD variants distil from the first step (alpha > 0 at every timed step: the EMA teacher's forward always runs)
PSD_FROM_STEP_0 = ["loss.schedule=constant"]
PSDCLIP_VARIANTS = {
    "psdclip clip": ["loss=clip"],
    "psdclip psd": PSD_FROM_STEP_0,
    "psdclip psd self": [*PSD_FROM_STEP_0, "teacher=self"],
}


class StepClock:
    """Times optimiser steps ``warmup`` .. ``warmup + measure`` from a global post-step hook, whichever trainer steps,
    and writes samples/s (and peak GPU memory) to ``result``."""

    def __init__(self, warmup: int, measure: int, batch_size: int, result: str):
        self.warmup, self.measure, self.batch_size, self.result = warmup, measure, batch_size, result
        self.steps, self.started = 0, None
        register_optimizer_step_post_hook(self.after_step)

    def now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # only at the window's two ends
        return time.perf_counter()

    def after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.started = self.now()
        elif self.steps == self.warmup + self.measure:
            elapsed = self.now() - self.started
            memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            Path(self.result).write_text(
                json.dumps({"samples_per_s": self.measure * self.batch_size / elapsed, "peak_memory_gib": memory})
            )


def child(args: argparse.Namespace, trainer_args: list[str]) -> None:
    """One timed training run of ``args.child`` (psdclip or open_clip) in this process."""
    StepClock(args.warmup, args.measure, args.batch_size, args.result)
    import open_clip

    from bench.data_throughput import make_shards  # noqa: F401  (importing it makes open_clip read webdataset 1.x)

    open_clip.add_model_config(REPO / "psdclip" / "model_configs")  # the tiny ViT, as psdclip registers it
    if args.child == "psdclip":
        sys.argv = [str(REPO / "train.py"), *trainer_args]
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    else:
        import open_clip_train.main

        open_clip_train.main.main(trainer_args)


def flops_per_sample(model_name: str) -> float:
    """Training FLOPs per image–text pair: 3 × the forward pass of both towers (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    import psdclip.models  # noqa: F401  (registers psdclip's model configs)
    from psdclip.models import create_clip

    clip = create_clip(model_name)
    size = clip.model.visual.image_size
    size = size if isinstance(size, tuple) else (size, size)
    images, texts = torch.zeros(2, 3, *size), clip.tokenizer(["a photo", "a photo"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        clip.model(images, texts)
    return 3 * counter.get_total_flops() / 2


def run_once(name: str, args: argparse.Namespace, pattern: str, samples: int, folder: Path) -> dict:
    result = folder / f"{name.replace(' ', '_')}.json"
    result.unlink(missing_ok=True)
    steps = args.warmup + args.measure
    if name == "open_clip":
        trainer_args = [
            "--dataset-type",
            "webdataset",
            "--train-data",
            pattern,
            "--train-num-samples",
            str(samples),
            "--model",
            MODELS[args.model],
            "--precision",
            PRECISIONS[args.precision][1],
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--wd",
            "0.1",
            "--beta1",
            "0.9",
            "--beta2",
            "0.98",
            "--eps",
            "1e-6",
            "--warmup",
            "100",
            "--logs",
            str(folder / "open_clip_logs"),
            "--name",
            f"run{time.time_ns()}",
            "--save-frequency",
            "0",
            "--log-every-n-steps",
            "50",
            "--report-to",
            "",
            "--seed",
            "0",
        ]
    else:
        trainer_args = [
            "data=shards",
            f"data.train_shards='{pattern}'",
            f"data.train_num_samples={samples}",
            f"data.batch_size={args.batch_size}",
            f"data.num_workers={args.workers}",
            "data.shuffle_buffer=5000",
            f"model={args.model}",
            f"trainer.precision={PRECISIONS[args.precision][0]}",
            f"trainer.accelerator={'gpu' if torch.cuda.is_available() else 'cpu'}",
            f"trainer.max_steps={steps}",
            "trainer.enable_progress_bar=false",
            f"paths.log_dir={folder / 'psdclip_logs'}",
            # the end-of-training evaluation and media need evaluation data and are not training speed
            "~callbacks.evaluation",
            "~callbacks.media",
            *PSDCLIP_VARIANTS[name],
        ]
    command = [
        sys.executable,
        "-m",
        "bench.train_throughput",
        "--child",
        "psdclip" if name != "open_clip" else name,
        "--result",
        str(result),
        "--warmup",
        str(args.warmup),
        "--measure",
        str(args.measure),
        "--batch-size",
        str(args.batch_size),
        "--",
        *trainer_args,
    ]
    finished = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True)  # failures reported below
    if finished.returncode != 0 or not result.exists():
        raise RuntimeError(
            f"{name} failed (exit {finished.returncode}):\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}"
        )
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny", choices=MODELS)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10, help="optimiser steps before the clock starts")
    parser.add_argument("--measure", type=int, default=30, help="optimiser steps timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256, help="the JPEGs' size (img2dataset's default)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for MFU")
    parser.add_argument("--only", nargs="+", default=["open_clip", *PSDCLIP_VARIANTS], help="which runs")
    parser.add_argument("--child", choices=["psdclip", "open_clip"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, trainer_args = parser.parse_known_args()
    if args.child:
        child(args, [arg for arg in trainer_args if arg != "--"])
        return

    from bench.data_throughput import make_shards

    steps = args.warmup + args.measure
    samples = steps * args.batch_size
    per_shard = 250
    names = args.only
    rates: dict[str, list[float]] = {name: [] for name in names}
    memory: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        # one shard more than one epoch needs, so open_clip's per-worker shard split never runs dry
        pattern = make_shards(folder / "shards", -(-samples // per_shard) + args.workers, per_shard, args.image_size)
        print(f"{samples} samples of generated shards in {time.perf_counter() - started:.0f} s", flush=True)
        for round_ in range(args.rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]  # rotate who goes first
            for name in order:
                started = time.perf_counter()
                outcome = run_once(name, args, pattern, samples, folder)
                rates[name].append(outcome["samples_per_s"])
                memory[name] = outcome["peak_memory_gib"]
                # as each run ends, so that a run cut off by a time limit still leaves its figures
                print(
                    f"round {round_ + 1}, {name}: {rates[name][-1]:.1f}/s "
                    f"({time.perf_counter() - started:.0f} s with start-up)",
                    flush=True,
                )

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops
    if peak is None and torch.cuda.is_available() and args.precision == "bf16":
        peak = next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in device), None)
    flops = flops_per_sample(MODELS[args.model])
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(
        f"\n{MODELS[args.model]}, {args.precision}, batch {args.batch_size}, {args.workers} workers, {device}; "
        f"median of {args.rounds} rounds of {args.measure} steps after {args.warmup}; "
        f"{flops / 1e9:.3f} GFLOP per training sample"
    )
    print(f"{'run':18} {'samples/s':>10} {'MFU':>8} {'peak GiB':>9}")
    for name, rate in median.items():
        mfu = f"{rate * flops / (peak * 1e12):.1%}" if peak else "n/a"
        gib = f"{memory[name]:.2f}" if memory.get(name) is not None else "n/a"
        print(f"{name:18} {rate:10.1f} {mfu:>8} {gib:>9}")
    ratios = {
        "psdclip clip / open_clip": ("psdclip clip", "open_clip"),
        "psd (ema) / clip": ("psdclip psd", "psdclip clip"),
        "psd (self) / clip": ("psdclip psd self", "psdclip clip"),
    }
    for label, (top, bottom) in ratios.items():
        if top in median and bottom in median:
            print(f"{label:26} {median[top] / median[bottom]:.3f}")


if __name__ == "__main__":
    main()
