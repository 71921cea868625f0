"""Every option of every config group composes (and what is cheap to build, builds); every web-scale data option
brings its recipe; sweeps choose on held-out data; every recipe (experiment or web-scale data option) takes one
training step (``debug=step``)."""

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
USER_GIVEN = {
    "data.train_shards": "shards/",
    "model.name": "ViT-B-32",
    "loss.subset.keys": "memory.csv",
    "teacher.checkpoint": "last.ckpt",
}


def options(group: str) -> list[str]:
    """Every option of ``group`` (the parts that options share, in sub-folders such as ``data/web/``, are not)."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


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
    assert {"tiny", "step"} <= set(options("debug")) and set(WEB_SCALE) <= set(options("data"))


@pytest.mark.parametrize("data", ["embedded", "cc12m"])
def test_the_data_plants_the_threshold_pairs_the_memory_rule_asks_for(data):
    memory = compose_config(["loss=psd_memory", f"data={data}"]).data
    assert (memory.threshold_pairs, memory.threshold_pairs_cap) == (0.03, 5000)
    uncapped = compose_config(["loss=psd_memory", f"data={data}", "loss.subset.threshold_pairs_cap=null"]).data
    assert uncapped.threshold_pairs_cap is None
    single_batch = compose_config(["loss=psd", f"data={data}"]).data
    assert (single_batch.threshold_pairs, single_batch.threshold_pairs_cap) == (0.0, None)


# each web-scale data option's recipe: model, epochs, lr, weight decay, warm-up steps, per-device batch, evaluation
CC12M_RECIPE = ("ViT-B-32", 32, 5e-4, 0.2, 2000, 256, "paper")  # open_clip's documented CC12M recipe
WEB_SCALE = {
    "cc3m": ("RN50", 30, 1e-3, 0.1, 10000, 128, "paper"),  # open_clip's documented CC3M recipe
    "cc12m": CC12M_RECIPE,
    "yfcc15m": CC12M_RECIPE,
    "laion400m": CC12M_RECIPE,
    "mix": CC12M_RECIPE,
    "shards": (*CC12M_RECIPE[:-1], "imagenet"),
}


def web_scale(data: str, *overrides: str):
    given = ["data.train_shards=/data/mine"] if data == "shards" else []
    return compose_config([f"data={data}", *given, *overrides])


@pytest.mark.parametrize("data", sorted(WEB_SCALE))
def test_a_web_scale_data_option_brings_its_recipe(data):
    cfg = web_scale(data, "trainer=ddp_8gpu")
    model, epochs, lr, weight_decay, warmup, batch_size, evaluation = WEB_SCALE[data]
    assert (cfg.model.name, cfg.trainer.max_epochs, cfg.trainer.devices) == (model, epochs, 8)
    optimizer = cfg.optim.optimizer
    assert (optimizer.lr, optimizer.weight_decay, cfg.optim.scheduler.warmup_steps) == (lr, weight_decay, warmup)
    assert cfg.data.batch_size == batch_size and cfg.data.train_shards
    suite = compose_config([f"evaluation={evaluation}"]).evaluation
    assert cfg.evaluation == suite and cfg.optimized_metric == "eval/imagenet1k/zeroshot_top1"
    # ResNets and ViTs get open_clip's AdamW betas for them, whichever data brought the model
    assert list(optimizer.betas) == ([0.9, 0.999] if model == "RN50" else [0.9, 0.98])


@pytest.mark.parametrize("data", ["cc3m", "cc12m"])
def test_a_command_line_choice_beats_the_recipe(data):
    cfg = web_scale(data, "model=vit_b16", "trainer.max_epochs=5", "optim.optimizer.lr=1e-4", "data.batch_size=64")
    assert (cfg.model.name, cfg.trainer.max_epochs, cfg.optim.optimizer.lr, cfg.data.batch_size) == (
        "ViT-B-16",
        5,
        1e-4,
        64,
    )
    assert list(cfg.optim.optimizer.betas) == [0.9, 0.98]
    resnet = web_scale(data, "model=rn50")
    assert resnet.model.name == "RN50" and list(resnet.optim.optimizer.betas) == [0.9, 0.999]


def test_the_embedded_demo_keeps_its_tiny_defaults():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.trainer.max_epochs, cfg.optim.optimizer.lr, cfg.optim.scheduler.warmup_steps) == (
        "psdclip-vit-tiny",
        3,
        1e-3,
        100,
    )
    assert list(cfg.evaluation.datasets) == ["fashion_mnist", "fashion_mnist_val"]


@pytest.mark.parametrize("search", [None, *options("hparams_search")])
@pytest.mark.parametrize("data", ["embedded", "embedded_mosaic", *sorted(WEB_SCALE)])
def test_sweeps_choose_on_a_held_out_metric_the_run_measures(search, data):
    cfg = web_scale(data, *([f"hparams_search={search}"] if search else []))
    _, name, metric = cfg.optimized_metric.split("/")
    assert name in cfg.evaluation.datasets and metric.split("_")[0] in {
        task.split("_")[0] for task in cfg.evaluation.tasks
    }
    # the embedded sets have a test and a val split: sweeps choose on val; web-scale ones on ImageNet-1k's val images
    assert cfg.evaluation.datasets[name].get("split", "val") == "val"
    assert any(dataset.get("split") == "test" for dataset in cfg.evaluation.datasets.values()) == data.startswith(
        "embedded"
    )


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
@pytest.mark.parametrize(
    "recipes,expected",
    [
        (["experiment=glob(*)"], [("psdclip-vit-tiny", 1e-3), ("psdclip-vit-tiny-mosaic", 1e-3)]),
        # (model, lr) of cc12m, cc3m, laion400m, mix and yfcc15m, in the sweep's order
        (["data=cc12m,cc3m,laion400m,mix,yfcc15m"], [("ViT-B-32", 5e-4), ("RN50", 1e-3), *[("ViT-B-32", 5e-4)] * 3]),
        (["data=shards", "data.train_shards=${paths.data_root}/cc12m"], [("ViT-B-32", 5e-4)]),
    ],
    ids=["experiments", "web-scale data", "own shards"],
)
def test_every_recipe_takes_a_debug_step(recipes, expected, tmp_path):
    # the web-scale recipes' datasets as tiny shard sets under data_root; the embedded recipes' Fashion-MNIST files big
    # enough for their 1,500-pair training set
    for dataset in ("cc3m", "cc12m", "yfcc15m", "laion400m"):
        write_set(tmp_path / "data" / dataset, [6])
    fashion_mnist = make_fashion_mnist(tmp_path / "fashion_mnist", train=1700)
    sweep = tmp_path / "sweep"
    done = run_in_session(
        [
            sys.executable,
            "train.py",
            "-m",
            *recipes,
            "debug=step",
            "trainer=cpu",  # the web-scale recipes are meant for GPUs; the step is the same
            f"paths.data_root={tmp_path / 'data'}",
            f"paths.fashion_mnist_dir={fashion_mnist}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    jobs = sorted(sweep.glob("[0-9]*"), key=lambda job: int(job.name))
    configs = [OmegaConf.load(job / ".hydra" / "config.yaml") for job in jobs]
    assert [(config.model.name, config.optim.optimizer.lr) for config in configs] == expected
    assert all(json.loads((job / "summary.json").read_text())["steps"] == 1 for job in jobs)
