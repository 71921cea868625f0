"""The Lightning callback that runs the evaluation suite during and after training."""

import logging

import lightning as L
import torch

from psdclip.eval.features import Runtime
from psdclip.eval.suite import EvalSuite, format_results, write_results
from psdclip.run.stopping import signalled_stop

log = logging.getLogger(__name__)


class EvaluationCallback(L.Callback):
    """Runs ``suite`` at the end of training (``at_end``) and every ``every_n_epochs`` on every rank, each encoding its
    share. A second instance with a cheap suite and ``at_end=False`` draws the learning curve.

    Metrics go to every logger as ``eval/<dataset>/<metric>``, into ``trainer.callback_metrics`` (where ``train.py``
    reads the metric it returns to sweepers) and, from rank 0, to ``results_file`` as JSON.
    """

    def __init__(
        self, suite: EvalSuite, every_n_epochs: int | None = None, results_file: str | None = None, at_end: bool = True
    ):
        self.suite, self.every_n_epochs, self.results_file, self.at_end = suite, every_n_epochs, results_file, at_end
        self.results: dict[str, float] = {}

    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        runtime = Runtime(
            pl_module.device,
            trainer.precision_plugin.forward_context,
            trainer.global_rank,
            trainer.world_size,
            pl_module.all_gather,
            check_stop=lambda: stop_on_sigterm(trainer),
        )
        if trainer.is_global_zero:
            log.info("evaluating at step %d on %s", trainer.global_step, ", ".join(self.suite.datasets))
        results = self.suite.run(pl_module, runtime)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
            if self.results_file:
                write_results(self.results_file, results, step=trainer.global_step, epoch=trainer.current_epoch)
            log.info("evaluation at step %d:\n%s", trainer.global_step, format_results(results))
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in results.items()})
        self.results = results
        return results

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module)


def stop_on_sigterm(trainer: L.Trainer) -> None:
    """Lightning checks for SIGTERM only between training steps; evaluation at the end of training runs after them."""
    if (stop := signalled_stop(trainer)) is not None:
        raise stop
