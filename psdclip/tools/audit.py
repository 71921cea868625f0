"""Noisy-pair audit: which training captions does a trained model doubt, and how many of them are wrong?

    python -m psdclip.tools.audit run=<training run folder> [score=true] [clean_copy=<folder>]
    python -m psdclip.tools.audit ckpt=<run>/checkpoints/last.ckpt [data=… data.noise=…] [fraction=0.5]

``run=`` audits a run on the shards it trained on, with its own data settings, seed, batch and teacher temperature
(``ckpt`` defaults to its ``checkpoints/last.ckpt``); ``ckpt=`` alone audits a checkpoint on the data the overrides
name. Two kinds of evidence, each where it exists:

- **What training remembered** (a run with ``loss=psd_memory``, whose checkpoint holds its pair memory): every pair's
  remembered gap, flagged past the run's calibrated cut-off, at most the run's noise estimate of them, and that
  estimate with its range. This reads the shards' keys and captions only (no image is decoded but the
  suspects'), so it is fast on web-scale data; ``memory.csv``.
- **A single-batch score** (``score=true``, any checkpoint): a subset rule's doubt of each pair in a batch of
  ``batch_size`` pairs (``subset``: ``outscored`` by default), and the pairs the rule would distil at alpha =
  ``fraction`` flagged; every image is encoded; ``scores.csv``, ``suspects.csv``.

Writes into the audit folder ``exclude.csv`` (shard and key of every flagged pair: ``data.exclude_keys`` reads it),
``suspects.html`` (a self-contained page: the ``grid`` most suspect pairs as image, caption and score, for a curator to
look at) and ``audit.json`` (the estimate, the flag counts, and against the data's corruption marks where it has
them, precision, recall, AUROC and AP); with ``clean_copy=<folder>`` a copy of the shards without the flagged pairs,
in img2dataset's layout with ``sizes.json`` (``python train.py data=shards data.train_shards=<folder>`` trains on it).
"""

import base64
import heapq
import html
import io
import itertools
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from psdclip.data.pipeline import PairIds
from psdclip.data.samples import BadSample, caption_of, image_keys, image_of, shard_samples
from psdclip.data.writer import write_shards
from psdclip.eval.model import CLIPEncoders
from psdclip.models import MAX_LOGIT_SCALE, CLIPBundle, load_clip_checkpoint
from psdclip.run.checkpoint_files import load_checkpoint_file
from psdclip.run.cli import reported_errors
from psdclip.subsets import MemorySubset, SubsetQuery, SubsetRule

log = logging.getLogger(__name__)

# the memory's prefix in a training checkpoint's state dict
MEMORY_STATE = "loss.subset."
THUMBNAIL = 112  # pixels of the longer side of an image in suspects.html


def batch_query(image: torch.Tensor, text: torch.Tensor, scale: float, tau: float, fraction: float) -> SubsetQuery:
    """A batch of normalised ``image``/``text`` rows as a subset rule sees it in training at alpha = ``fraction``."""
    logits = scale * image @ text.T / tau
    count = torch.tensor(math.floor(fraction * len(image)), device=image.device)
    return SubsetQuery(logits, logits.T, torch.arange(len(image), device=image.device), count, 0, 1)


@dataclass
class AuditSettings:
    """What is audited, from ``run=`` (the run's own settings) or from the audit's config."""

    ckpt: Path
    data: DictConfig  # the data config of the shards
    memory_rule: DictConfig  # how a remembered pair is judged: the run's memory rule, or loss/subset/memory's defaults
    tau: float
    batch_size: int


def settings(cfg: DictConfig) -> AuditSettings:
    """The audit's inputs; a run folder's saved config wins over the audit's own data, tau and batch settings."""
    if not cfg.run:
        if cfg.ckpt is None:
            raise ValueError("give run=<training run folder> or ckpt=<checkpoint> (with the data it trained on)")
        memory = cfg.subset if cfg.subset._target_ == cfg.memory._target_ else cfg.memory
        return AuditSettings(Path(cfg.ckpt), cfg.data, memory, cfg.tau, cfg.batch_size)
    run = Path(cfg.run)
    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"run={run} is not a training run folder: no {saved.relative_to(run)} in it")
    trained = OmegaConf.load(saved)
    trained.paths.output_dir = str(run)  # the run's ${hydra:…} folder, resolvable outside its Hydra job
    subset = trained.loss.subset
    # the run's own memory rule, with today's settings where the run predates them
    memory = OmegaConf.merge(cfg.memory, subset) if subset._target_ == cfg.memory._target_ else cfg.memory
    ckpt = Path(cfg.ckpt) if cfg.ckpt else run / "checkpoints" / "last.ckpt"
    return AuditSettings(ckpt, trained.data, memory, float(trained.loss.tau_teacher), int(trained.data.batch_size))


@dataclass
class PairStream:
    """Image–caption pairs of the shards, in order, with shard, key, place and (when present) the sample's json; read
    and parsed as training reads them (``shard_samples``, ``caption_of``). A pair training would skip is skipped and
    counted by kind in ``skipped``; images are decoded only where ``decode`` asks (an undecodable one is skipped)."""

    shards: list[str]
    image_key: str
    text_key: str
    skipped: Counter = field(default_factory=Counter)

    def count(self, kind: str, url: str, detail: str = "", count: int = 1) -> None:
        if not self.skipped[kind]:
            log.warning("skipping %s in %s: %s (further ones are counted in audit.json)", kind, url, detail)
        self.skipped[kind] += count

    def pairs(self, decode: bool) -> Iterator[dict]:
        keys = image_keys(self.image_key)
        for url in self.shards:
            for sample in shard_samples(url, 0, sys.maxsize, self.count):
                try:
                    caption = caption_of(sample, self.text_key)
                    if not any(key in sample for key in keys):
                        raise BadSample("image_missing", f"no {'/'.join(keys)} for {sample['__key__']}")
                    image = image_of(sample, keys) if decode else None
                except BadSample as bad:
                    self.count(bad.kind, url, bad.detail)
                    continue
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                except ValueError:  # unreadable metadata: the pair is still audited, without known corruption
                    meta = {}
                yield {
                    "image": image,
                    "caption": caption,
                    "shard": url,
                    "key": sample["__key__"],
                    "index": sample["__index__"],
                    "meta": meta if isinstance(meta, dict) else {},
                    "sample": sample,
                }

    def batches(self, transform, batch_size: int, limit: int | None = None):
        batch = []
        for item in itertools.islice(self.pairs(decode=True), limit):
            item["input"] = transform(item["image"])
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def none_read(self) -> ValueError:
        skipped = ", ".join(f"{count} {kind}" for kind, count in self.skipped.items()) or "nothing readable"
        return ValueError(
            f"no readable image–caption pairs in {self.shards[0]} … ({len(self.shards)} shards; skipped: {skipped}): "
            "audit the shards the run trained on, with their image_key and text_key"
        )


def corruption(meta: dict) -> dict:
    """The data's own mark of a wrong caption, where its json has one (the embedded data's, docs/digits_shards.py's)."""
    return {"corrupted": bool(meta["corrupted"])} if "corrupted" in meta else {}


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
        """Score every pair; returns the table (most suspect first) and the ``grid`` most suspect pairs' images by
        (shard, key)."""
        rows, worst = [], []  # worst: a min-heap of the grid's (score, index, image)
        for batch in stream.batches(self.clip.eval_transform, batch_size, limit):
            query = batch_query(*self.encode(batch), self.scale, self.tau, fraction)
            scores, flagged = self.rule.score(query), self.rule(query).chosen
            for item, score, flag in zip(batch, scores.tolist(), flagged.tolist()):
                row = {"shard": item["shard"], "key": item["key"], "caption": item["caption"], "score": score}
                (heapq.heappush if len(worst) < grid else heapq.heappushpop)(worst, (score, len(rows), item["image"]))
                rows.append({**row, "flagged": flag, **corruption(item["meta"])})
            log.info("scored %d pairs", len(rows))
        if not rows:
            raise stream.none_read()
        frame = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        images = {(rows[index]["shard"], rows[index]["key"]): image for _, index, image in worst}
        return frame, images


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


def memory_state(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """The subset rule's buffers (pair memory, threshold) in a training checkpoint, or None where it kept no memory."""
    state = load_checkpoint_file(ckpt)["state_dict"]
    if f"{MEMORY_STATE}memory.scores" not in state:
        return None
    return {name.removeprefix(MEMORY_STATE): value for name, value in state.items() if name.startswith(MEMORY_STATE)}


def remembered_pairs(state: dict, datamodule, stream: PairStream, rule: MemorySubset) -> pd.DataFrame:
    """The checkpoint's pair memory as a table of the data's pairs: shard, key, identity (what ``loss=psd_listed``
    reads), caption, remembered gap, sightings, threshold pair, flagged (seen ``min_sightings`` times and past the
    run's threshold, at most the share of wrong pairs the run estimates: ``at_most_the_estimate``), most suspect first. A
    threshold pair is never flagged: its remembered gap is that of the caption it was given on purpose, and training
    never saw its own caption, which is what a retraining reads. Loads the memory and threshold into ``rule``, so that
    it can say what it learnt."""
    slots = len(state["memory.scores"])
    pairs = datamodule.pair_space()
    if pairs is not None and rule.memory.configured_slots is None and pairs != slots:  # sized by its data
        raise ValueError(
            f"the checkpoint's pair memory holds {slots} pairs but the shards hold {pairs}: it was trained on other "
            "data; audit the shards the run trained on (run=<its folder> uses its own data settings)"
        )
    rule.memory.allocate(slots)
    rule.load_state_dict(state)
    shards = datamodule.resolved_shards
    ids = PairIds([s.url for s in shards], [s.size if s.listed else None for s in shards], 0, 0.0)
    scores, sightings = rule.memory.scores.float(), rule.memory.sightings.long()
    planted, threshold = rule.memory.planted, float(rule.threshold)
    rows = []
    for pair in stream.pairs(decode=False):
        pair_id = ids.of(pair["shard"], pair["key"], pair["index"])
        slot = pair_id % slots
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
                "flagged": bool(not planted[slot] and seen >= rule.min_sightings and scores[slot] > threshold),
                **corruption(pair["meta"]),
            }
        )
    if not rows:
        raise stream.none_read()
    table = pd.DataFrame(rows).sort_values("remembered_gap", ascending=False, kind="stable", na_position="last")
    return at_most_the_estimate(table.reset_index(drop=True), rule.epoch_statistics(), rule.min_sightings)


def at_most_the_estimate(table: pd.DataFrame, statistics: dict, min_sightings: int) -> pd.DataFrame:
    """``table`` (most suspect first) with no more of the data's own pairs flagged than the run's noise estimate says
    are wrong (``noise_estimate``, the middle of its range, of the pairs seen ``min_sightings`` times), the most suspect
    kept. D's cut-off is set to catch most wrong captions and passes some clean pairs with them, the least suspect of
    the list; where wrong captions are few, those clean pairs are most of it (on the study's clean data 4–23% of the
    pairs were past it at an estimate of 1–3%), and a retraining that leaves them out or distils them loses accuracy.
    The middle, not the top of the range: chosen on val with three training seeds per list, where the top's longer
    lists did no better (docs/noisy_caption_study.md, "The audit's cap: the range's middle or its top"). Its risk: at a
    few dozen threshold pairs the middle can read 15 points low and leave wrong captions off the list."""
    share = float(statistics["noise_estimate"])
    if math.isnan(share):
        return table
    own = ~table["threshold_pair"]
    most = round(share * int((own & (table["sightings"] >= min_sightings)).sum()))
    beyond = table.index[own & table["flagged"]][most:]
    table.loc[beyond, "flagged"] = False
    return table


def memory_summary(table: pd.DataFrame, rule: MemorySubset) -> dict:
    """What the run's memory says of the data: the rule's own noise estimate and cut-off (as training logged them),
    how many of the data's pairs the table holds and flags, the threshold pairs' count, and against known corruption
    the remembered gap judged as a doubt score (``quality``: the flagged pairs' precision and recall, AUROC, AP)."""
    own = table[~table["threshold_pair"] & (table["sightings"] > 0)]
    return {
        **{name: float(value) for name, value in rule.epoch_statistics().items()},
        **quality(own.rename(columns={"remembered_gap": "score"})),
        "unseen_pairs": int((table["sightings"] == 0).sum()),
        "threshold_pairs": int(table["threshold_pair"].sum()),
    }


def images_of(stream: PairStream, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], Image.Image]:
    """The decoded images of the ``wanted`` (shard, key) pairs, read in one pass over their shards."""
    shards = {shard for shard, _ in wanted}
    found = {}
    for pair in PairStream([s for s in stream.shards if s in shards], stream.image_key, stream.text_key).pairs(False):
        if (pair["shard"], pair["key"]) in wanted:
            try:
                found[pair["shard"], pair["key"]] = image_of(pair["sample"], image_keys(stream.image_key))
            except BadSample:
                continue
    return found


def thumbnail(image: Image.Image) -> str:
    """``image`` as a PNG data URL, its longer side ``THUMBNAIL`` pixels (small images are enlarged, pixels kept)."""
    scale = THUMBNAIL / max(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def suspects_page(rows: pd.DataFrame, score: str, images: dict, title: str, path: Path) -> None:
    """A self-contained HTML page (images inlined): one card per pair, most suspect first, with its caption, score,
    flag and, where the data marks it, whether the caption is known to be wrong."""
    cards = []
    for rank, row in enumerate(rows.itertuples(index=False), 1):
        image = images.get((row.shard, row.key))
        picture = f'<img src="{thumbnail(image)}" alt="">' if image is not None else "<p>(image unreadable)</p>"
        known = {True: "known wrong", False: "known right"}.get(getattr(row, "corrupted", None), "")
        flag = "flagged" if row.flagged else "not flagged"
        cards.append(
            f'<figure class="{"flagged" if row.flagged else ""}">{picture}<figcaption>'
            f"<b>#{rank}</b> {score} {getattr(row, score):.3f} · {flag}{' · ' + known if known else ''}<br>"
            f"<q>{html.escape(row.caption)}</q><br><small>{html.escape(Path(row.shard).name)} · "
            f"{html.escape(str(row.key))}</small></figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;margin:1em}main{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{width:220px;margin:0;padding:6px;border:1px solid #ccc;border-radius:6px}"
        "figure.flagged{border-color:#c33}img{image-rendering:pixelated;display:block;margin:auto}"
        "figcaption{font-size:12px;margin-top:4px}"
    )
    path.write_text(
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p>{len(cards)} most suspect pairs, most "
        f"suspect first; red: flagged (in exclude.csv).</p><main>\n" + "\n".join(cards) + "\n</main></body></html>\n"
    )


def clean_copy(stream: PairStream, flagged: set[tuple[str, str]], out: Path) -> dict[str, int]:
    """The shards without the ``flagged`` (shard, key) pairs, written with the project's shard writer into ``out``
    (img2dataset's layout, ``sizes.json``); every file of a kept sample is copied unchanged."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"clean_copy={out} is not empty: give a new folder")
    left_out = Counter()

    def kept() -> Iterator[dict]:
        for url in stream.shards:
            for sample in shard_samples(url, 0, sys.maxsize, stream.count):
                if (url, sample["__key__"]) in flagged:
                    left_out["pairs"] += 1
                    continue
                yield {name: value for name, value in sample.items() if name not in ("__url__", "__index__")}

    sizes = write_shards(kept(), out, shard_size=10_000)
    return {"shards": len(sizes), "pairs": sum(sizes.values()), "left_out": left_out["pairs"]}


def audit(cfg: DictConfig, out_dir: str | Path) -> dict:
    """Run the audit that ``cfg`` (conf/audit.yaml) describes, writing into ``out_dir``; returns audit.json's content."""
    if isinstance(cfg.subset, str):  # `subset=memory` replaces the rule's config instead of choosing one
        raise TypeError(f"choose the audit's rule with loss/subset@subset={cfg.subset}, not subset={cfg.subset}")
    inputs = settings(cfg)
    rule = instantiate(cfg.subset)
    batch_rule = rule.fallback if isinstance(rule, MemorySubset) else rule
    if (
        cfg.score is not False and type(batch_rule).score is SubsetRule.score
    ):  # random draws D, listed reads it: no score
        raise ValueError(
            f"subset {rule.name} has no doubt score to audit with; use loss/subset@subset=outscored, doubt or memory"
        )
    clip = load_clip_checkpoint(inputs.ckpt)
    memory = memory_state(inputs.ckpt)
    score = cfg.score if cfg.score is not None else memory is None  # by default, the memory where the run kept one
    if memory is None and not score:
        raise ValueError(
            f"{inputs.ckpt} holds no pair memory (its run did not train with loss=psd_memory): audit it with score=true"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(inputs.data, transform=clip.eval_transform, tokenizer=clip.tokenizer)
    datamodule.prepare_data()
    stream = PairStream([shard.url for shard in datamodule.resolved_shards], datamodule.image_key, datamodule.text_key)
    written, result = ["exclude.csv", "suspects.html", "audit.json"], {"ckpt": str(inputs.ckpt)}
    result.update(shards=datamodule.train_shards, tau=inputs.tau, batch_size=inputs.batch_size)
    images, ranking = {}, None
    if score:
        auditor = Auditor(clip, batch_rule, inputs.tau, torch.device(cfg.device))
        scores, images = auditor.run(stream, inputs.batch_size, cfg.fraction, cfg.limit, cfg.grid)
        scores.to_csv(out_dir / "scores.csv", index=False)
        scores.head(cfg.top_k).to_csv(out_dir / "suspects.csv", index=False)
        written += ["scores.csv", "suspects.csv"]
        result.update(subset=batch_rule.name, logit_scale=auditor.scale, fraction=cfg.fraction, **quality(scores))
        ranking = (scores, "score")
    if memory is not None:
        memory_rule = instantiate(inputs.memory_rule)
        table = remembered_pairs(memory, datamodule, stream, memory_rule)
        table.to_csv(out_dir / "memory.csv", index=False)
        written.append("memory.csv")
        result["memory"] = memory_summary(table, memory_rule)
        ranking = (table[~table["threshold_pair"]].dropna(subset=["remembered_gap"]), "remembered_gap")
    frame, score = ranking
    frame[frame["flagged"]][["shard", "key"]].to_csv(out_dir / "exclude.csv", index=False)
    top = frame.head(cfg.grid)
    wanted = {(row.shard, row.key) for row in top.itertuples()}
    images = {key: image for key, image in images.items() if key in wanted}
    images.update(images_of(stream, wanted - images.keys()) if wanted - images.keys() else {})
    suspects_page(top, score, images, f"psdclip audit of {inputs.ckpt}", out_dir / "suspects.html")
    if cfg.clean_copy:
        flagged = {(row.shard, row.key) for row in frame[frame["flagged"]].itertuples()}
        result["clean_copy"] = {"folder": str(cfg.clean_copy), **clean_copy(stream, flagged, Path(cfg.clean_copy))}
    result["skipped"] = dict(stream.skipped)
    (out_dir / "audit.json").write_text(json.dumps(result, indent=1))
    print(f"audit: {headline(result)}\nwritten to {out_dir} ({', '.join(sorted(written))})")
    return result


def headline(result: dict) -> str:
    """One line of the audit's figures: the noise estimate first, where the run kept a memory."""
    parts = []
    if "memory" in result:
        memory = result["memory"]
        estimate = f"noise estimate {memory['noise_estimate']:.3f}"
        if "noise_estimate_low" in memory:
            estimate += f" (range {memory['noise_estimate_low']:.3f}–{memory['noise_estimate_high']:.3f})"
        parts.append(f"{estimate}; flagged {memory['flagged']} of {memory['pairs']} pairs (memory)")
    if "flagged" in result:
        parts.append(f"flagged {result['flagged']} of {result['pairs']} pairs (single-batch {result['subset']})")
    known = result.get("memory", result)
    if "precision" in known:
        parts.append(f"precision {known['precision']:.3f} recall {known['recall']:.3f} against the data's marks")
    if "auroc" in result:
        parts.append(f"AUROC {result['auroc']:.3f}")
    return "; ".join(parts)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="audit")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        audit(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
