"""The two-stage recipe in one command: ``python train.py recipe=audit_retrain [data=… trainer=… …]``.

Three stages, each the command a user would otherwise chain by hand, run in order in one run folder:

- ``first/``: a training with the pair memory (``loss=psd_memory``), which remembers each pair's evidence and
  estimates the share of wrong captions;
- ``audit/``: the audit of that memory (``psdclip.tools.audit run=first``): the list of pairs to distil, capped at the
  noise estimate's share of the data (``memory.csv``), and the suspects page;
- ``second/``: a training that distils the listed pairs from its first step (``loss=psd_listed``), with the first run's
  model as its frozen teacher (``teacher=frozen``).

Every stage is a child process of this driver (a training spawns its own DDP ranks as a plain run does), so a stage
behaves exactly as its standalone command. ``recipe.json`` records the stages that finished: the same command,
restarted (after a kill, a pre-emption or a requeue), finds the unfinished folder it started with the same overrides,
skips the finished stages and resumes an interrupted training from its ``last.ckpt``. ``summary.json`` gives both
runs' metrics and the noise estimate. Under ``srun`` every task runs this driver: each training stage makes its task
one rank, the audit runs in task 0 and the other tasks wait for it (no process group is open meanwhile, so no
collective can time out).
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig

from psdclip.run.checkpoint_files import LAST, is_complete
from psdclip.run.runlog import announce
from psdclip.run.summary import SUMMARY_FILE, format_table

log = logging.getLogger(__name__)

STATE_FILE = "recipe.json"
TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"
# what a scheduler or a terminal sends to stop a job: the stage running gets it too
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def task_rank() -> int:
    """This process's place among the tasks a launcher started (srun, torchrun); 0 for a plain command."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


def resumable_folder(log_dir: str, task_name: str, overrides: list[str], fresh: Path) -> Path:
    """The newest unfinished recipe folder under ``<log_dir>/<task_name>/`` started with the same ``overrides`` (a
    restart of the same command), else ``fresh``."""
    states = sorted(Path(log_dir, task_name).glob(f"**/{STATE_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in states:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path.parent.resolve() != fresh.resolve() and state.get("overrides") == overrides and not state["finished"]:
            return path.parent
    return fresh


class Recipe:
    """The driver of one run of the audit-then-retrain recipe (``conf/recipe/audit_retrain.yaml``)."""

    def __init__(self, cfg: DictConfig, overrides: list[str], fresh: Path):
        self.cfg, self.settings = cfg, cfg.recipe
        # the command's overrides go to every stage, but those of the recipe itself and of a resume
        self.overrides = [
            o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in ("recipe", "ckpt_path")
        ]
        self.folder = resumable_folder(cfg.paths.log_dir, cfg.task_name, self.overrides, fresh)
        self.state_file = self.folder / STATE_FILE
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else None
        self.child: subprocess.Popen | None = None

    def run(self) -> dict[str, float]:
        """Every stage not finished yet, then the summary; the second training's final metrics."""
        started = time.perf_counter()
        if self.state is None:
            self.state = {"recipe": self.settings.name, "overrides": self.overrides, "finished": False, "stages": {}}
        else:
            announce(
                f"resuming the recipe in {self.folder}: finished stages: {', '.join(self.state['stages']) or 'none'}"
            )
        self.save()
        first, audit, second = (self.folder / name for name in ("first", "audit", "second"))
        self.stage("first", self.training(first, [*self.settings.first]))
        checkpoint = first / "checkpoints" / LAST
        if not is_complete(checkpoint):
            raise ValueError(
                f"the first training left no usable checkpoint ({checkpoint} is missing or cut off): "
                f"delete {first} and rerun the same command to train it again"
            )
        if task_rank() == 0:
            self.stage("audit", self.audit(first, audit))
        else:
            self.wait_for(audit / "audit.json")
        listed = audit / "memory.csv"
        if not listed.is_file():
            raise ValueError(f"the audit wrote no {listed}: the first run kept no pair memory (loss=psd_memory)")
        retraining = [*self.settings.second, f"loss.subset.keys={listed}", f"teacher.checkpoint={checkpoint}"]
        self.stage("second", self.training(second, retraining))
        if task_rank() != 0:
            return self.read_summary(second)["metrics"]
        summary = self.summarise(first, audit, second, time.perf_counter() - started)
        self.state["finished"] = True
        self.save()
        return summary["second"]["metrics"]

    def save(self) -> None:
        if task_rank() == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps({**self.state, "host": socket.gethostname(), "pid": os.getpid()}))

    def training(self, folder: Path, stage_overrides: list[str]) -> list[str]:
        """``train.py`` with the command's overrides, then the stage's; resumed from its own last checkpoint."""
        command = [sys.executable, str(TRAIN_SCRIPT), *self.overrides, *stage_overrides, f"hydra.run.dir={folder}"]
        if "wandb" in (self.cfg.get("logger") or {}):  # both runs in one W&B group, named after their stage
            command += [f"logger.wandb.group={self.folder.name}", f"logger.wandb.name={folder.name}"]
        last = folder / "checkpoints" / LAST
        return command + ([f"ckpt_path={last}"] if is_complete(last) else [])

    def audit(self, first: Path, folder: Path) -> list[str]:
        device = "cuda" if self.cfg.trainer.get("accelerator") in ("gpu", "cuda") else "cpu"
        return [
            sys.executable,
            "-m",
            "psdclip.tools.audit",
            f"run={first}",
            f"device={device}",
            f"hydra.run.dir={folder}",
            *self.settings.audit,
        ]

    def stage(self, name: str, command: list[str]) -> None:
        """Run ``command`` unless the stage finished before; a failure raises a ValueError with the stage's error
        line, a stop by a signal exits as the stage did."""
        if name in self.state["stages"]:
            log.info("%s: finished before, not run again", name)
            return
        resumed = any(part.startswith("ckpt_path=") for part in command)
        announce(f"recipe stage {name}{' (resumed from its last checkpoint)' if resumed else ''}: {' '.join(command)}")
        status, error = self.run_child(command)
        if status > 128 or status < 0:  # stopped by a signal, its checkpoint written: not a failure of the recipe
            announce(f"the {name} stage was stopped (exit status {status}); the same command resumes it", error=True)
            raise SystemExit(status if status > 0 else 128 - status)
        if status != 0:
            raise ValueError(
                f"the {name} stage failed (exit status {status}): {error or 'see its log'}; fix that and rerun the same "
                "command: the finished stages are not run again"
            )
        self.state["stages"][name] = {"command": command}
        self.save()

    def run_child(self, command: list[str]) -> tuple[int, str | None]:
        """The exit status of ``command`` and its ``error:`` line, if it printed one; its other output passes through,
        and the stop signals this driver receives are passed on to it."""
        error: list[str] = []
        self.child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
        previous = {signum: signal.signal(signum, self.forward) for signum in FORWARDED}
        reader = threading.Thread(target=self.pass_on, args=(self.child.stderr, error), daemon=True)
        reader.start()
        try:
            status = self.child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        reader.join(timeout=10)
        return status, error[0] if error else None

    @staticmethod
    def pass_on(stream, errors: list[str]) -> None:
        """Copy a stage's stderr to this process's, keeping back its one-line error (the driver says it, once)."""
        for line in stream:
            if line.startswith("error: "):
                errors.append(line.removeprefix("error: ").strip())
            elif not (errors and line.startswith("(set HYDRA_FULL_ERROR=1")):
                sys.stderr.write(line)

    def forward(self, signum: int, frame) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def wait_for(self, path: Path) -> None:
        """Task 0 runs the audit; the others wait for its result, at most ``recipe.audit_timeout_s``."""
        deadline = time.monotonic() + self.settings.audit_timeout_s
        while not path.is_file():
            if time.monotonic() > deadline:
                raise ValueError(
                    f"task {task_rank()} waited {self.settings.audit_timeout_s} s for task 0's audit ({path}); "
                    "see task 0's log, or raise recipe.audit_timeout_s"
                )
            time.sleep(5)

    @staticmethod
    def read_summary(run: Path) -> dict:
        path = run / SUMMARY_FILE
        if not path.is_file():
            raise ValueError(f"{run} finished without a {SUMMARY_FILE}; rerun the same command")
        return json.loads(path.read_text())

    def summarise(self, first: Path, audit: Path, second: Path, wall_time: float) -> dict:
        """``summary.json`` of the recipe: both runs' summaries, the audit's estimate and list, the gain."""
        runs = {"first": self.read_summary(first), "second": self.read_summary(second)}
        memory = json.loads((audit / "audit.json").read_text()).get("memory", {})
        summary = {
            "recipe": self.settings.name,
            # the second run's figures, as a single run's summary gives them (a sweep's table and report read them)
            "method": self.settings.name,
            "alpha_max": runs["second"]["alpha_max"],
            "noise": runs["second"]["noise"],
            "zeroshot_top1": runs["second"]["zeroshot_top1"],
            "optimized_metric": runs["second"].get("optimized_metric"),
            "optimized": runs["second"].get("optimized"),
            "noise_estimate": memory.get("noise_estimate"),
            "noise_estimate_range": [memory.get("noise_estimate_low"), memory.get("noise_estimate_high")],
            "listed_pairs": memory.get("flagged"),
            "audited_pairs": memory.get("pairs"),
            "wall_time_s": round(wall_time, 1),  # this start's; a resumed recipe's earlier starts are not counted
            "metrics": runs["second"]["metrics"],
            **runs,
            "output_dir": str(self.folder),
        }
        path = self.folder / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=1))
        rows = [{**runs[name], "method": f"{name}: {runs[name]['method']}"} for name in runs]
        estimate, (low, high) = summary["noise_estimate"], summary["noise_estimate_range"]
        noise = f"{estimate:.3f} (range {low:.3f}–{high:.3f})" if None not in (estimate, low, high) else "n/a"
        announce(
            f"\n{format_table(rows)}\nnoise estimate {noise}; {summary['listed_pairs']} of {summary['audited_pairs']} "
            f"pairs distilled from the first step of the second training\nsummary: {path}"
        )
        return summary


def run_recipe(cfg: DictConfig, overrides: list[str], fresh: Path) -> dict[str, float]:
    """Run (or resume) the recipe ``cfg.recipe`` with the command's ``overrides``; its second training's metrics."""
    return Recipe(cfg, overrides, fresh).run()
