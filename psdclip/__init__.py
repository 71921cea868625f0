"""psdclip: CLIP-style image–text training with progressive self-distillation."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"


def run_id() -> str:
    """Tells apart runs started in the same second (it ends their folders' names, ``${run_id:}``).

    This process's id; ranks started separately by a launcher share one (so they write one folder): torchrun's
    workers their agent's process id, an ``srun`` step's tasks SLURM's job and step ids.
    """
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return str(os.getppid())
    return str(os.getpid())


def cpus(most: int = 8) -> int:
    """``${cpus:8}``: the CPUs this process may use (its affinity, e.g. a SLURM or container limit), at most ``most``.

    A DataLoader with more workers than that only competes with itself (and torch warns about it).
    """
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(int(most), available))


# registered on import, before Hydra resolves the run folder (train.py, evaluate.py and the tools import psdclip);
# run_id's value is cached in the config, which Hydra hands to every job of a sweep: a job that submitit runs in a
# process of its own finds the sweep's folder, not one named after its own process id
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
if not OmegaConf.has_resolver("cpus"):
    OmegaConf.register_new_resolver("cpus", cpus)
