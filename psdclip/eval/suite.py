"""One evaluation run: for each dataset, compute its split features once and run every selected task it supports."""

import json
import logging
import time
from pathlib import Path

import torch

from psdclip.eval.datasets import EvalSet
from psdclip.eval.features import Runtime, SplitFeatures, split_features
from psdclip.eval.linear_probe import linear_probe
from psdclip.eval.retrieval import retrieval_metrics
from psdclip.eval.robustness import effective_robustness
from psdclip.eval.zeroshot import classification_metrics, classifier_weights
from psdclip.run.runlog import Progress
from psdclip.run.tables import text_table

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "linear_probe", "retrieval")


class EvalSuite:
    """Datasets × tasks, as configured (``conf/evaluation``).

    Args:
        datasets: name → evaluation set; metrics are named ``eval/<name>/<task>_<metric>``.
        tasks: any of zeroshot, linear_probe, retrieval; each runs on the datasets that support it.
        batch_size, num_workers: image batches per rank.
        linear_probe: keyword arguments of ``psdclip.eval.linear_probe.linear_probe`` (val_fraction, seed, sweep);
            None: its own defaults.
        retrieval_ks: the k of Recall@k.
        robustness: ``{reference, shifted, slope, intercept}``: effective robustness of zero-shot top-1 on the
            ``shifted`` datasets relative to ``reference`` (computed when all of them were evaluated).

    ``conf/evaluation/default.yaml`` holds the settings' defaults; the ones kept here, and the linear probe's, equal
    it (``tests/test_defaults.py``).
    """

    def __init__(
        self,
        datasets: dict[str, EvalSet],
        tasks: list[str],
        *,
        batch_size: int,
        num_workers: int = 0,
        linear_probe: dict | None = None,
        retrieval_ks: list[int] = (1, 5, 10),
        robustness: dict | None = None,
    ):
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown evaluation task(s) {sorted(unknown)}; choose from {list(TASKS)}")
        self.datasets, self.tasks = dict(datasets), list(tasks)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.linear_probe_args, self.retrieval_ks = dict(linear_probe or {}), tuple(retrieval_ks)
        self.robustness = dict(robustness) if robustness else None
        self.timings: dict[str, float] = {}

    def features(
        self, model, dataset: EvalSet, split: str, runtime: Runtime, with_captions: bool = False
    ) -> SplitFeatures:
        started = time.perf_counter()
        batches = dataset.batches(
            split, model.eval_transform, self.batch_size, self.num_workers, runtime.rank, runtime.world_size
        )
        if runtime.rank == 0:  # this rank's share; the others encode theirs alongside
            name = next((key for key, value in self.datasets.items() if value is dataset), dataset.root)
            batches = Progress(log, f"{name} {split} features").track(batches, lambda batch: len(batch[0]))
        features = split_features(model, batches, runtime, with_captions)
        self.timings["features"] = self.timings.get("features", 0.0) + time.perf_counter() - started
        if len(features.labels) == 0:
            raise ValueError(f"the {split} split of {dataset.root} is empty")
        return features

    @torch.no_grad()
    def run(self, model, runtime: Runtime | None = None) -> dict[str, float]:
        """Evaluate ``model`` (``encode_image``, ``encode_text``, ``tokenizer``, ``eval_transform``); returns flat metrics."""
        runtime = runtime or Runtime()
        self.timings = {}
        metrics: dict[str, float] = {}
        for name, dataset in self.datasets.items():
            tasks = [task for task in self.tasks if task in dataset.tasks]
            if not dataset.tasks:  # no task could ever run on it: an incomplete folder, not a choice of tasks
                raise ValueError(
                    f"evaluation set {name} ({dataset.root}) supports no task: zero-shot needs "
                    f"{dataset.templates_file}, the linear probe a train split, retrieval a dataset_type.txt "
                    "saying retrieval"
                )
            if not tasks:
                log.warning(
                    "%s (%s) supports none of %s (zero-shot needs a templates file, the linear probe a train split); skipped",
                    name,
                    dataset.root,
                    self.tasks,
                )
                continue
            test = self.features(model, dataset, "test", runtime, with_captions="retrieval" in tasks)
            for task in tasks:
                started, feature_time = time.perf_counter(), self.timings["features"]
                for metric, value in getattr(self, task)(model, dataset, test, runtime).items():
                    metrics[f"eval/{name}/{task}_{metric}"] = value
                # time spent on anything but image features (the linear probe's train features count as features)
                spent = time.perf_counter() - started - (self.timings["features"] - feature_time)
                self.timings["metrics"] = self.timings.get("metrics", 0.0) + spent
        if not metrics:
            raise ValueError(
                f"nothing was evaluated: none of the evaluation sets {sorted(self.datasets)} supports the "
                f"tasks {self.tasks}; choose others with evaluation.tasks or evaluation/datasets"
            )
        if self.robustness:
            metrics.update(self.effective_robustness(metrics))
        return metrics

    def classes(self, dataset: EvalSet, *label_sets) -> list[str]:
        classnames = dataset.classnames
        largest = max(int(labels.max()) for labels in label_sets)
        if largest >= len(classnames) or min(int(labels.min()) for labels in label_sets) < 0:
            raise ValueError(
                f"{dataset.classnames_file or dataset.root} lists {len(classnames)} classes but the labels "
                f"range over {min(int(labels.min()) for labels in label_sets)}..{largest}"
            )
        return classnames

    def zeroshot(self, model, dataset: EvalSet, test: SplitFeatures, runtime: Runtime) -> dict[str, float]:
        classnames = self.classes(dataset, test.labels)
        with runtime.autocast():
            weights = classifier_weights(
                model.encode_text, model.tokenizer, classnames, dataset.templates, runtime.device
            )
        return classification_metrics(test.images @ weights.float().cpu().T, test.labels)

    def linear_probe(self, model, dataset: EvalSet, test: SplitFeatures, runtime: Runtime) -> dict[str, float]:
        train = self.features(model, dataset, "train", runtime)
        num_classes = len(self.classes(dataset, test.labels, train.labels))
        return linear_probe(
            train.images,
            train.labels,
            test.images,
            test.labels,
            num_classes,
            device=runtime.device,
            **self.linear_probe_args,
        )

    def retrieval(self, model, dataset: EvalSet, test: SplitFeatures, runtime: Runtime) -> dict[str, float]:
        if test.text_to_image is None or len(test.text_to_image) == 0:
            raise ValueError(f"no captions in the test split of {dataset.root}: retrieval needs several per image")
        return retrieval_metrics(test.images, test.texts, test.text_to_image, self.retrieval_ks)

    def effective_robustness(self, metrics: dict[str, float]) -> dict[str, float]:
        reference, shifted = self.robustness["reference"], self.robustness["shifted"]
        top1 = {name: metrics.get(f"eval/{name}/zeroshot_top1") for name in [reference, *shifted]}
        if None in top1.values():
            log.info(
                "effective robustness needs zero-shot top-1 on %s; skipped", [n for n, v in top1.items() if v is None]
            )
            return {}
        result = effective_robustness(
            top1.pop(reference), top1, self.robustness.get("slope"), self.robustness.get("intercept")
        )
        return {f"eval/robustness/{metric}": value for metric, value in result.items()}


def write_results(path: str | Path, metrics: dict[str, float], **info) -> Path:
    """The results JSON: run information plus the flat ``eval/<dataset>/<metric>`` metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**info, "metrics": metrics}, indent=1))
    return path


def format_results(metrics: dict[str, float]) -> str:
    """A table: one row per dataset and metric (tasks' metrics as ``task_metric``)."""
    return text_table(
        ["dataset", "metric", "value"], (key.split("/", 2)[1:] + [value] for key, value in metrics.items())
    )
