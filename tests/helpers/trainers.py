"""A Lightning trainer for in-process test runs: CPU, and nothing written or printed besides what a test asks for."""

import lightning as L


def quiet_trainer(**kwargs) -> L.Trainer:
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**settings, **kwargs})
