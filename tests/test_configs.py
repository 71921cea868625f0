"""Every option of every config group composes (and what is cheap to build, builds); every experiment recipe takes
one training step (``debug=step``) in one Hydra sweep."""

import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from psdclip.loss import PSDLoss
from tests.conftest import CONFIG_DIR, compose_config, make_fashion_mnist
from tests.helpers.processes import run_in_session
from tests.helpers.shard_sets import write_set

CONF = Path(CONFIG_DIR)
# the groups train.yaml selects from (evaluation/curve and evaluation/datasets are parts of evaluation options)
GROUPS = ["model", "evaluation", "data", "loss", "loss/subset", "teacher", "optim", "trainer", "callbacks", "logger"]
GROUPS += ["paths", "hydra"]
GROUPS += ["experiment", "hparams_search", "debug"]
PAPER_DATASETS = ("cc3m", "cc12m", "yfcc15m")
USER_GIVEN = {
    "data.train_shards": "shards/",
    "model.name": "ViT-B-32",
    "loss.subset.keys": "memory.csv",
    "teacher.checkpoint": "last.ckpt",
}


def options(group: str) -> list[str]:
    """Every option of ``group``; experiments include the recipe parts under ``experiment/paper/``."""
    pattern = "**/*.yaml" if group == "experiment" else "*.yaml"
    return sorted(str(path.relative_to(CONF / group).with_suffix("")) for path in (CONF / group).glob(pattern))


def experiments() -> list[str]:
    return sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))


def targets(node) -> list[str]:
    """Every ``_target_`` in a config tree."""
    if isinstance(node, dict):
        own = [node["_target_"]] if "_target_" in node else []
        return own + [target for value in node.values() for target in targets(value)]
    return [target for value in node for target in targets(value)] if isinstance(node, list) else []


def missing(node, prefix: str = "") -> list[str]:
    """The keys of a config tree whose value is mandatory (``???``)."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in missing(value, f"{prefix}{name}.")]
    return [prefix[:-1]] if node == "???" else []


@pytest.mark.parametrize("group,option", [(group, option) for group in GROUPS for option in options(group)])
def test_every_option_of_every_group_composes(group, option, tmp_path, monkeypatch):
    cfg = compose_config([f"{group}={option}"])
    tree = OmegaConf.to_container(cfg, resolve=False)
    # the only values a user must give: the shards of data=shards, the name of model=open_clip, the list of
    # loss/subset=listed, the checkpoint of teacher=frozen (hydra's own are set at run time)
    given = {key: USER_GIVEN[key] for key in missing(tree) if not key.startswith("hydra.")}
    assert set(given) <= set(USER_GIVEN)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "memory.csv").write_text("pair_id,flagged\n3,True\n")
    cfg = compose_config([f"{group}={option}", *(f"{key}={value}" for key, value in given.items())])
    assert tree["trainer"]["_target_"] == "lightning.pytorch.trainer.Trainer"
    # every class or function a config names exists (callbacks, loggers, evaluation sets, strategies, plugins, …)
    assert all(callable(get_object(target)) for target in targets(tree))
    assert isinstance(instantiate(cfg.loss), PSDLoss)
    assert instantiate(cfg.data).batch_size == cfg.data.batch_size
    assert cfg.teacher is None or callable(instantiate(cfg.teacher))


def test_the_options_are_the_files():
    # a group with no options here would make the test above pass without composing anything
    assert all(options(group) for group in GROUPS)
    assert {"tiny", "step"} <= set(options("debug")) and "paper/cc12m" in options("experiment")


@pytest.mark.parametrize("data", ["embedded", "cc12m"])
def test_the_data_plants_the_threshold_pairs_the_memory_rule_asks_for(data):
    memory = compose_config(["loss=psd_memory", f"data={data}"]).data
    assert (memory.threshold_pairs, memory.threshold_pairs_cap) == (0.03, 5000)
    uncapped = compose_config(["loss=psd_memory", f"data={data}", "loss.subset.threshold_pairs_cap=null"]).data
    assert uncapped.threshold_pairs_cap is None
    single_batch = compose_config(["loss=psd", f"data={data}"]).data
    assert (single_batch.threshold_pairs, single_batch.threshold_pairs_cap) == (0.0, None)


@pytest.mark.parametrize("name", [name for name in experiments() if name.split("_")[0] in PAPER_DATASETS])
def test_paper_recipes_name_their_trainer_data_and_evaluation(name):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 8
    assert cfg.data.train_shards.endswith(name.split("_")[0]) and "imagenet1k" in cfg.evaluation.datasets


# (entry point, [(config group, how the entry point's defaults place it, the key it lands on)])
ENTRY_POINT_GROUPS = [
    ("eval", [("evaluation", "evaluation", "evaluation")]),
    ("audit", [("loss/subset", "loss/subset@subset", "subset"), ("data", "data", "data")]),
]


@pytest.mark.parametrize("config,groups", ENTRY_POINT_GROUPS)
def test_the_other_entry_points_compose_with_each_option(config, groups):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for group, placed, key in groups:
            for option in options(group):
                cfg = compose(config_name=config, overrides=[f"{placed}={option}", "ckpt=x.ckpt"])
                assert "_target_" in cfg[key], (config, group, option)
    GlobalHydra.instance().clear()


def test_the_tools_without_groups_compose_with_their_documented_defaults():
    export = compose_config(["ckpt=run/last.ckpt", "out=exported"], name="export")
    assert (export.ckpt, export.out, export.weights) == ("run/last.ckpt", "exported", "student")
    study = compose_config([], name="study")
    assert (
        study.dataset == "embedded"
        and list(study.noise) == [0, 0.2, 0.4, 0.6]
        and list(study.methods) == ["clip", "psd"]
    )
    assert study.out.startswith("logs/noisy_captions/study_") and study.train == {}


@pytest.mark.slow
def test_every_experiment_takes_a_debug_step_in_one_sweep(tmp_path):
    # the paper recipes' datasets as tiny shard sets under data_root; the embedded recipes' Fashion-MNIST files big
    # enough for their 1,500-pair training set
    for dataset in PAPER_DATASETS:
        write_set(tmp_path / "data" / dataset, [6])
    fashion_mnist = make_fashion_mnist(tmp_path / "fashion_mnist", train=1700)
    sweep = tmp_path / "sweep"
    done = run_in_session(
        [
            sys.executable,
            "train.py",
            "-m",
            "experiment=glob(*)",
            "debug=step",
            "trainer=cpu",  # the paper recipes name 8 GPUs
            f"paths.data_root={tmp_path / 'data'}",
            f"paths.fashion_mnist_dir={fashion_mnist}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    ran = {}
    for job in sweep.glob("[0-9]*"):
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        ran[next(o for o in overrides if o.startswith("experiment="))] = json.loads((job / "summary.json").read_text())
    assert sorted(ran) == [f"experiment={name}" for name in experiments()]
    assert all(summary["steps"] == 1 for summary in ran.values()), ran
