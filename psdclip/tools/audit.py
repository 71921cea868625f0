"""Noisy-pair audit: which training captions does the trained model doubt?

    python -m psdclip.tools.audit ckpt=<run>/checkpoints/last.ckpt [data=…] [fraction=0.5] [batch_size=256]

The score is a subset rule's doubt (``subset``: a ``loss/subset`` config, ``outscored`` by default): in a batch of
``batch_size`` pairs (the training batch), the model's logits (logit_scale × cosine / ``tau``) against the other
pairs of the batch, e.g. how far the best candidate outscores the pair's own partner, averaged over the image→text
and text→image directions. In each batch the pairs the rule would distil at alpha = ``fraction`` are flagged (its D).
With ``loss/subset@subset=memory`` the batch score is its single-batch fallback's, and where the checkpoint holds the
run's pair memory, ``memory.csv`` lists what training remembered of each pair (shard, key, pair id, caption,
remembered gap, sightings, flagged by the run's own threshold, never more than its noise estimate), most suspect
first: a table to read, sort and filter, and to retrain from (``data.exclude_keys`` leaves its flagged pairs out,
``loss=psd_listed`` distils them).

Writes into the run folder: ``scores.csv`` (every pair, most suspect first: shard, key, caption, score, flagged, …),
``suspects.csv`` (the ``top_k`` first), ``suspects.png`` (an image grid) and ``audit.json``. When the data says
which captions were corrupted (the embedded data's ``json``), it adds precision and recall of the flagged pairs
(D's precision and recall), AUROC and average precision of the score.
"""

import heapq
import itertools
import json
import logging
import math
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import matplotlib
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from sklearn.metrics import average_precision_score, roc_auc_score

from psdclip.data.pipeline import PairIds
from psdclip.data.samples import BadSample, caption_of, image_keys, image_of, shard_samples
from psdclip.eval.model import CLIPEncoders
from psdclip.models import MAX_LOGIT_SCALE, CLIPBundle, load_clip_checkpoint
from psdclip.subsets import MemorySubset, SubsetQuery, SubsetRule

matplotlib.use("Agg")
import matplotlib.pyplot as plt

log = logging.getLogger(__name__)


def batch_query(image: torch.Tensor, text: torch.Tensor, scale: float, tau: float, fraction: float) -> SubsetQuery:
    """A batch of normalised ``image``/``text`` rows as a subset rule sees it in training at alpha = ``fraction``."""
    logits = scale * image @ text.T / tau
    count = torch.tensor(math.floor(fraction * len(image)), device=image.device)
    return SubsetQuery(logits, logits.T, torch.arange(len(image), device=image.device), count, 0, 1)


@dataclass
class PairStream:
    """Image–caption pairs of a shard pattern, in order, with shard, key and (when present) the sample's json. Read
    and parsed as training reads them (``shard_samples``, ``image_of``, ``caption_of``): a pair training would skip is
    skipped here too, and counted by kind in ``skipped``."""

    shards: list[str]
    image_key: str
    text_key: str
    skipped: Counter = field(default_factory=Counter)

    def count(self, kind: str, url: str, detail: str = "", count: int = 1) -> None:
        if not self.skipped[kind]:
            log.warning("skipping %s in %s: %s (further ones are counted in audit.json)", kind, url, detail)
        self.skipped[kind] += count

    def pairs(self) -> Iterator[dict]:
        for url in self.shards:
            for sample in shard_samples(url, 0, sys.maxsize, self.count):
                try:
                    pair = {
                        "image": image_of(sample, image_keys(self.image_key)),
                        "caption": caption_of(sample, self.text_key),
                    }
                except BadSample as bad:
                    self.count(bad.kind, url, bad.detail)
                    continue
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                except ValueError:  # unreadable metadata: the pair is still audited, without known corruption
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
                yield {**pair, "shard": url, "key": sample["__key__"], "index": sample["__index__"], "meta": meta}

    def batches(self, transform, batch_size: int, limit: int | None = None):
        batch = []
        for item in itertools.islice(self.pairs(), limit):
            item["input"] = transform(item["image"])
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


@dataclass
class Auditor:
    clip: CLIPBundle
    rule: SubsetRule
    tau: float
    device: torch.device
    scale: float = field(init=False)
    encoders: CLIPEncoders = field(init=False)

    def __post_init__(self):
        self.clip.model.to(self.device)
        self.encoders = CLIPEncoders(self.clip)
        self.scale = float(self.clip.model.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE).exp())

    @torch.no_grad()
    def encode(self, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([item["input"] for item in batch]).to(self.device)
        tokens = self.clip.tokenizer([item["caption"] for item in batch]).to(self.device)
        return self.encoders.encode_image(images).float(), self.encoders.encode_text(tokens).float()

    def run(self, stream: PairStream, batch_size: int, fraction: float, limit: int | None, grid: int):
        """Score every pair; returns the rows (sorted, most suspect first) and the ``grid`` most suspect images."""
        rows, worst = [], []  # worst: a min-heap of the grid's (score, index, image)
        for batch in stream.batches(self.clip.eval_transform, batch_size, limit):
            query = batch_query(*self.encode(batch), self.scale, self.tau, fraction)
            scores, flagged = self.rule.score(query), self.rule(query).chosen
            for item, score, flag in zip(batch, scores.tolist(), flagged.tolist()):
                row = {
                    "shard": item["shard"],
                    "key": item["key"],
                    "caption": item["caption"],
                    "score": score,
                    "flagged": flag,
                }
                if "corrupted" in item["meta"]:
                    row["corrupted"] = bool(item["meta"]["corrupted"])
                entry = (score, len(rows), item["image"])
                rows.append(row)
                (heapq.heappush if len(worst) < grid else heapq.heappushpop)(worst, entry)
            log.info("scored %d pairs", len(rows))
        if not rows:
            raise ValueError(f"no readable image–caption pairs in {stream.shards[0]} … ({len(stream.shards)} shards)")
        frame = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        return frame, [(index, image) for _, index, image in sorted(worst, reverse=True)], rows


def quality(frame: pd.DataFrame) -> dict[str, float]:
    """Flag counts, and against the known corrupted pairs (when the data says): precision, recall, AUROC, AP."""
    flagged = frame["flagged"].astype(bool)
    result = {"pairs": len(frame), "flagged": int(flagged.sum()), "flagged_fraction": float(flagged.mean())}
    if "corrupted" in frame and frame["corrupted"].nunique() == 2:
        truth = frame["corrupted"].astype(bool)
        hits = int((flagged & truth).sum())
        top = frame["score"].rank(ascending=False, method="first") <= truth.sum()
        result.update(
            corrupted=int(truth.sum()),
            precision=hits / max(int(flagged.sum()), 1),
            recall=hits / int(truth.sum()),
            precision_at_corrupted_count=float((top & truth).sum() / truth.sum()),
            auroc=float(roc_auc_score(truth, frame["score"])),
            average_precision=float(average_precision_score(truth, frame["score"])),
        )
    return result


def image_grid(suspects: list[tuple[int, object]], rows: list[dict], path: Path) -> None:
    columns = 8
    lines = -(-len(suspects) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(2.2 * columns, 2.6 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (index, image) in zip(axes.flat, suspects):
        row = rows[index]
        axis.imshow(image)
        mark = {True: " ✗ corrupted", False: " ✓ clean"}.get(row.get("corrupted"), "")
        axis.set_title(f"{row['score']:.3f}{mark}\n" + "\n".join(textwrap.wrap(row["caption"], 26)[:3]), fontsize=7)
    figure.suptitle("most suspect pairs (doubt score, caption)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def audit(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the audit that ``cfg`` (conf/audit.yaml) describes, writing into ``out_dir``; returns audit.json's content."""
    if isinstance(cfg.subset, str):  # `subset=memory` replaces the rule's config instead of choosing one
        raise TypeError(f"choose the audit's rule with loss/subset@subset={cfg.subset}, not subset={cfg.subset}")
    rule = instantiate(cfg.subset)
    batch_rule = rule.fallback if isinstance(rule, MemorySubset) else rule
    if type(batch_rule).score is SubsetRule.score:  # random draws D, listed reads it: neither scores a pair
        raise ValueError(
            f"subset {rule.name} has no doubt score to audit with; use loss/subset@subset=outscored, doubt or memory"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip = load_clip_checkpoint(cfg.ckpt)
    datamodule = instantiate(cfg.data, transform=clip.eval_transform, tokenizer=clip.tokenizer)
    datamodule.prepare_data()
    stream = PairStream([shard.url for shard in datamodule.resolved_shards], datamodule.image_key, datamodule.text_key)
    memory = remembered_pairs(cfg.ckpt, datamodule, stream, rule) if isinstance(rule, MemorySubset) else None
    auditor = Auditor(clip, batch_rule, cfg.tau, torch.device(cfg.device))
    frame, suspects, rows = auditor.run(stream, cfg.batch_size, cfg.fraction, cfg.limit, cfg.grid)
    frame.to_csv(out_dir / "scores.csv", index=False)
    frame.head(cfg.top_k).to_csv(out_dir / "suspects.csv", index=False)
    image_grid(suspects, rows, out_dir / "suspects.png")
    if memory is not None:
        memory.to_csv(out_dir / "memory.csv", index=False)
    result = {
        "ckpt": str(cfg.ckpt),
        "shards": datamodule.train_shards,
        "subset": rule.name,
        "tau": cfg.tau,
        "logit_scale": auditor.scale,
        "batch_size": cfg.batch_size,
        "fraction": cfg.fraction,
        **quality(frame),
        **({"memory": memory_summary(memory, rule)} if memory is not None else {}),
        "skipped": dict(stream.skipped),
    }
    (out_dir / "audit.json").write_text(json.dumps(result, indent=1))
    figures = "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in result.items()
        if k not in ("ckpt", "shards", "skipped", "memory")
    )
    written = "scores.csv, suspects.csv, suspects.png, audit.json" + (", memory.csv" if memory is not None else "")
    print(f"audit: {figures}\nwritten to {out_dir} ({written})")
    return result


def remembered_pairs(ckpt: str, datamodule, stream: PairStream, rule: MemorySubset) -> pd.DataFrame | None:
    """The checkpoint's pair memory as a table of the data's pairs: shard, key, identity (what ``loss=psd_listed``
    reads), caption, remembered gap, sightings, threshold pair, flagged (seen ``min_sightings`` times and past the
    run's threshold, at most the estimated share of wrong pairs: ``at_most_the_estimate``), most suspect first. A
    threshold pair is never flagged: its remembered gap is that of the caption it was given on purpose, and training
    never saw its own caption, which is what a retraining reads. None when the run kept no memory. Loads the memory
    and threshold into ``rule``, so that it can say what it learnt."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "loss.subset."
    if f"{prefix}memory.scores" not in state:
        log.warning("%s holds no pair memory (trained with another subset rule): no memory.csv", ckpt)
        return None
    rule.memory.allocate(len(state[f"{prefix}memory.scores"]))
    rule.load_state_dict({name.removeprefix(prefix): value for name, value in state.items() if name.startswith(prefix)})
    min_sightings = rule.min_sightings
    shards = datamodule.resolved_shards
    ids = PairIds([s.url for s in shards], [s.size if s.listed else None for s in shards], 0, 0.0)
    scores, sightings = rule.memory.scores.float(), rule.memory.sightings.long()
    planted, threshold = rule.memory.planted, float(rule.threshold)
    rows = []
    for pair in stream.pairs():
        pair_id = ids.of(pair["shard"], pair["key"], pair["index"])
        slot = pair_id % len(scores)
        seen = int(sightings[slot])
        rows.append(
            {
                "shard": pair["shard"],
                "key": pair["key"],
                "pair_id": pair_id,
                "caption": pair["caption"],
                "remembered_gap": float(scores[slot]) if seen else float("nan"),
                "sightings": seen,
                "threshold_pair": bool(planted[slot]),
                "flagged": bool(not planted[slot] and seen >= min_sightings and scores[slot] > threshold),
                **({"corrupted": bool(pair["meta"]["corrupted"])} if "corrupted" in pair["meta"] else {}),
            }
        )
    table = pd.DataFrame(rows).sort_values("remembered_gap", ascending=False, kind="stable", na_position="last")
    estimate = float(rule.epoch_statistics()["noise_estimate"])
    return at_most_the_estimate(table.reset_index(drop=True), estimate, min_sightings)


def at_most_the_estimate(table: pd.DataFrame, noise_estimate: float, min_sightings: int) -> pd.DataFrame:
    """``table`` (most suspect first) with no more of the data's own pairs flagged than the run estimates are wrong
    (``noise_estimate`` of those seen ``min_sightings`` times), the most suspect kept. D's cut-off is set to catch
    most wrong captions and passes some clean pairs with them; where wrong captions are few, those clean pairs are
    most of the list (on the study's clean data 4–23% of the pairs were past it at an estimate of 1–3%), and a
    retraining that leaves them out or distils them loses accuracy."""
    if math.isnan(noise_estimate):
        return table
    own = ~table["threshold_pair"]
    most = round(noise_estimate * int((own & (table["sightings"] >= min_sightings)).sum()))
    beyond = table.index[own & table["flagged"]][most:]
    table.loc[beyond, "flagged"] = False
    return table


def memory_summary(table: pd.DataFrame, rule: MemorySubset) -> dict:
    """What the run's memory says of the data: the rule's own noise estimate and cut-off (as training logged them),
    how many of the data's pairs the table holds, and against known corruption, the flagged pairs' precision and
    recall."""
    own = table[~table["threshold_pair"] & (table["sightings"] > 0)]
    summary = {
        **{name: float(value) for name, value in rule.epoch_statistics().items()},
        "pairs": len(own),
        "unseen_pairs": int((table["sightings"] == 0).sum()),
    }
    if "corrupted" in own and own["corrupted"].any():
        caught = (own["flagged"] & own["corrupted"]).sum()
        summary.update(
            precision=float(caught / max(own["flagged"].sum(), 1)), recall=float(caught / own["corrupted"].sum())
        )
    return summary


@hydra.main(version_base="1.3", config_path="../../conf", config_name="audit")
def main(cfg: DictConfig) -> None:
    audit(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
