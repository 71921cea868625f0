"""Lightning callbacks that evaluate the model's encoders during and after training."""

import logging

import lightning as L
import torch

from psdclip.eval.datasets import ClassificationSet, image_features
from psdclip.eval.zeroshot import classification_metrics, classifier_weights

log = logging.getLogger(__name__)


class ZeroShotCallback(L.Callback):
    """Zero-shot classification on each dataset at the end of training (and every ``every_n_epochs``).

    Metrics go to every logger as ``eval/<dataset>/<metric>`` and into ``trainer.callback_metrics``,
    where ``train.py`` reads the metric it returns to sweepers.
    """

    def __init__(self, datasets: dict[str, ClassificationSet], batch_size: int = 500, num_workers: int = 0, every_n_epochs: int | None = None):
        self.datasets, self.batch_size, self.num_workers = datasets, batch_size, num_workers
        self.every_n_epochs = every_n_epochs
        self.results: dict[str, float] = {}

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        results = {}
        for dataset in self.datasets.values():
            loader = dataset.loader(pl_module.eval_transform, self.batch_size, self.num_workers)
            with trainer.precision_plugin.forward_context():
                features, labels = image_features(pl_module.encode_image, loader, pl_module.device)
                weights = classifier_weights(pl_module.encode_text, pl_module.tokenizer, dataset.classnames, dataset.templates, pl_module.device)
            for metric, value in classification_metrics(features @ weights.cpu().T, labels).items():
                results[f"eval/{dataset.name}/zeroshot_{metric}"] = value
        pl_module.train(was_training)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(results, step=trainer.global_step)
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in results.items()})
        self.results = results
        return results

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)
