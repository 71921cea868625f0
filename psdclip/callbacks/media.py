"""Pictures of a run: the batch similarity and soft-target matrices every N steps; after training the zero-shot
confusion matrix, retrieval tables with the top matches for a few queries, and the final metrics as the W&B summary.

Media go to W&B (images, interactive confusion matrix, tables) and TensorBoard when those loggers are chosen, and
always as PNG/Markdown files under ``save_dir`` so CSV-only runs have them too.
"""

import logging
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torchvision.transforms import Normalize
from torchvision.transforms.functional import to_pil_image

from psdclip.eval.datasets import EvalSet
from psdclip.eval.features import Runtime, encode_texts, split_features
from psdclip.eval.suite import EvalSuite
from psdclip.eval.zeroshot import classifier_weights
from psdclip.loss import PSDOutput
from psdclip.module import LOSS_OUTPUT
from psdclip.run.tables import markdown_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)


@dataclass
class Examples:
    """The first test images of an evaluation set: model inputs, labels (-1: none) and one caption each (None: none)."""

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str | None]


def first_examples(eval_set: EvalSet, transform, count: int, batch_size: int) -> Examples:
    images, labels, captions = [], [], []
    for batch_images, batch_labels, batch_captions in eval_set.batches("test", transform, batch_size):
        images.append(batch_images)
        labels.append(batch_labels)
        captions += [texts[0] if texts else None for texts in batch_captions]
        if len(captions) >= count:
            break
    return Examples(torch.cat(images)[:count], torch.cat(labels)[:count], captions[:count])


def picture(image: torch.Tensor, transform) -> Image.Image:
    """A model input shown as a picture: the transform's normalisation undone."""
    normalize = next((t for t in getattr(transform, "transforms", []) if isinstance(t, Normalize)), None)
    if normalize is not None:
        image = image * torch.tensor(normalize.std).view(-1, 1, 1) + torch.tensor(normalize.mean).view(-1, 1, 1)
    return to_pil_image(image.clamp(0, 1))


class MediaCallback(L.Callback):
    """Logs the media described in the module docstring (rank 0 only).

    Args:
        every_n_steps: heatmaps after optimiser steps 1, 1 + n, 1 + 2n, …
        max_pairs: the heatmaps show this rank's first ``max_pairs`` pairs: the logits and targets the loss of that
            step used (over the whole batch, with its distillation subset D).
        suite: the run's evaluation: the confusion matrix and retrieval tables show the first ``examples`` test
            images of its first dataset (the confusion matrix where it has class names and templates, the tables
            among the images that have captions). None or ``examples=0``: neither.
        queries, top_k: retrieval tables show ``top_k`` matches for each of ``queries`` queries per direction.
        save_dir: folder for the PNG/Markdown copies.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        max_pairs: int = 32,
        suite: EvalSuite | None = None,
        examples: int = 1000,
        queries: int = 4,
        top_k: int = 5,
        eval_batch_size: int = 500,
        save_dir: str | None = None,
    ):
        self.every_n_steps, self.max_pairs = every_n_steps, max_pairs
        self.suite, self.examples, self.queries, self.top_k = suite, examples, queries, top_k
        self.eval_batch_size = eval_batch_size
        self.save_dir = Path(save_dir) if save_dir else None

    # ---- publishing -------------------------------------------------------------------------------------------
    def _figure(self, loggers: list, key: str, figure, step: int) -> None:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key, [figure], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(key, figure, global_step=step, close=False)
        if self.save_dir:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            figure.savefig(self.save_dir / f"{key.replace('/', '_')}_step{step:07d}.png", dpi=100)
        plt.close(figure)

    def _table(self, trainer: L.Trainer, key: str, columns: list[str], rows: list[list], step: int) -> None:
        """``rows`` may hold PIL images: W&B shows them; the Markdown copies list the text columns only."""
        text_columns = [i for i, value in enumerate(rows[0]) if not isinstance(value, Image.Image)]
        markdown = markdown_table([columns[i] for i in text_columns], ([row[i] for i in text_columns] for row in rows))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                cells = [[wandb.Image(v) if isinstance(v, Image.Image) else v for v in row] for row in rows]
                logger.log_table(key, columns=columns, data=cells, step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(key, markdown, global_step=step)
        if self.save_dir:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            (self.save_dir / f"{key.replace('/', '_')}.md").write_text(markdown)

    # ---- every N steps: what the loss saw ------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (
            not trainer.is_global_zero
            or (trainer.global_step - 1) % self.every_n_steps
            or not isinstance(outputs, dict)
        ):
            return
        step: PSDOutput = outputs[LOSS_OUTPUT]  # the loss's output of this step: its logits, D and targets
        k = min(self.max_pairs, len(step.labels))
        rows = step.labels[:k]
        distill = step.subset.chosen[rows].cpu()
        alpha = float(step.stats["alpha"])
        title = f"step {trainer.global_step}, alpha {alpha:.3f}, first {k} pairs (D rows marked)"
        for key, matrix, label in (
            ("media/similarity", step.logits_per_image, "logit"),
            ("media/soft_targets", step.targets_per_image, "target mass"),
        ):
            picture = heatmap(matrix[:k][:, rows].float().cpu().numpy(), distill.numpy(), title, label)
            self._figure(trainer.loggers, key, picture, trainer.global_step)

    # ---- after training: zero-shot confusion matrix, retrieval examples, summary --------------------------------
    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        if self.suite is None or not self.examples or not self.suite.datasets or not trainer.is_global_zero:
            return
        name, eval_set = next(iter(self.suite.datasets.items()))
        was_training = pl_module.training
        pl_module.eval()
        data = first_examples(eval_set, pl_module.eval_transform, self.examples, self.eval_batch_size)
        device, step, runtime = pl_module.device, trainer.global_step, Runtime(pl_module.device)
        chunks = zip(data.images.split(self.eval_batch_size), data.labels.split(self.eval_batch_size), repeat([]))
        image_features = split_features(pl_module, chunks, runtime).images
        labelled = "zeroshot" in eval_set.tasks and bool((data.labels >= 0).all())
        classnames = eval_set.classnames if labelled else None
        if labelled:
            weights = classifier_weights(
                pl_module.encode_text, pl_module.tokenizer, classnames, eval_set.templates, device
            ).cpu()
            predictions = (image_features @ weights.T).argmax(dim=1)
            self._confusion(trainer, f"eval/{name}/confusion_matrix", data.labels, predictions, classnames, step)
        captioned = [index for index, caption in enumerate(data.captions) if caption is not None]
        if captioned:
            text_features = encode_texts(pl_module, [data.captions[index] for index in captioned], runtime)
            similarity = text_features @ image_features[captioned].T
            self._retrieval_tables(trainer, name, data, captioned, similarity, classnames, pl_module.eval_transform)
        pl_module.train(was_training)

    def _retrieval_tables(
        self, trainer, name: str, data: Examples, captioned: list[int], similarity, classnames, transform
    ):
        """The top matches of the first captions and images; ``hit``: the match is the query's own pair."""
        step, pictures = trainer.global_step, {}

        def shown(index: int) -> Image.Image:
            if index not in pictures:
                pictures[index] = picture(data.images[index], transform)
            return pictures[index]

        def label(index: int) -> str:
            return classnames[data.labels[index]] if classnames else ""

        text_rows, image_rows = [], []
        for query in range(min(self.queries, len(captioned))):
            own = captioned[query]
            for rank, match in enumerate(similarity[query].topk(min(self.top_k, len(captioned))).indices.tolist()):
                image = captioned[match]
                text_rows.append([data.captions[own], rank + 1, shown(image), label(image), image == own])
            for rank, match in enumerate(similarity[:, query].topk(min(self.top_k, len(captioned))).indices.tolist()):
                image_rows.append([shown(own), label(own), rank + 1, data.captions[captioned[match]], match == query])
        columns = {
            "retrieval_text_to_image": ["query", "rank", "image", "class", "hit"],
            "retrieval_image_to_text": ["image", "class", "rank", "caption", "hit"],
        }
        for (table, header), rows in zip(columns.items(), (text_rows, image_rows)):
            self._table(trainer, f"eval/{name}/{table}", header, rows, step)

    def _confusion(
        self, trainer, key: str, labels: torch.Tensor, predictions: torch.Tensor, classnames: list[str], step: int
    ) -> None:
        counts = np.zeros((len(classnames), len(classnames)), dtype=np.int64)
        np.add.at(counts, (labels.numpy(), predictions.numpy()), 1)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log(
                    {
                        key: wandb.plot.confusion_matrix(
                            y_true=labels.tolist(), preds=predictions.tolist(), class_names=classnames
                        ),
                        "trainer/global_step": step,
                    }
                )
        figure, axis = plt.subplots(figsize=(7, 6))
        image = axis.imshow(counts, cmap="Blues")
        axis.set(
            xticks=range(len(classnames)),
            yticks=range(len(classnames)),
            xlabel="predicted",
            ylabel="true",
            title=f"zero-shot confusion ({len(labels)} images, top-1 {np.trace(counts) / counts.sum():.3f})",
        )
        axis.set_xticklabels(classnames, rotation=60, ha="right")
        axis.set_yticklabels(classnames)
        figure.colorbar(image)
        figure.tight_layout()
        # W&B has the interactive chart; the picture goes to TensorBoard and the files
        self._figure([lg for lg in trainer.loggers if not isinstance(lg, WandbLogger)], key, figure, step)

    def on_fit_end(self, trainer, pl_module) -> None:
        # runs after every callback's on_train_end, so the evaluation metrics are in (summary.json has them for CSV runs)
        final = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("eval/")}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.summary.update({**final, "final/global_step": trainer.global_step})


def heatmap(matrix: np.ndarray, marked_rows: np.ndarray, title: str, label: str):
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(matrix, cmap="viridis")
    axis.set(xlabel="caption", ylabel="image", title=title)
    axis.title.set_fontsize(9)
    axis.set_yticks(range(len(matrix)), ["D" if marked else "" for marked in marked_rows], fontsize=6)
    figure.colorbar(image, label=label)
    figure.tight_layout()
    return figure
