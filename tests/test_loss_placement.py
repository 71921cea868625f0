"""What the GPU path needs of the loss, checked on CPU: every tensor the loss creates follows its inputs' device, and
the loss runs in fp32 under bf16 autocast.

Placement: the loss runs with ``meta`` as the default device and CPU inputs. A tensor it made without following its
inputs (``torch.zeros(n)``, ``torch.tensor(x)``) lands on ``meta`` (on a GPU: on the host, copied every step), so
an operation mixing it with the inputs fails, or it shows up among the outputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from psdclip.memory import PairMemory
from psdclip.subsets import MemorySubset, OutscoredSubset
from tests.helpers.losses import from_settings, make_loss

N, DIM, STEPS = 12, 8, 100
DEFAULT = {}  # loss=psd: D = the pairs the EMA teacher doubts most, soft targets over the batch
CLIP = {"alpha_max": 0.0, "schedule": "constant", "teacher": "self"}
TRUNCATION = {"teacher": "self"}  # doubt-chosen D with the self teacher
CASES = {
    "psd-default": (DEFAULT, True),
    "clip": (CLIP, False),
    "truncation": (TRUNCATION, False),
    "psd-subset-scope": ({"scope": "subset", "tau_teacher": 0.5, "mix": 0.8}, True),
    "memory": ("memory", True),
}


def make(settings):
    """The case's loss: flat settings (``from_settings``), or the memory rule with threshold pairs."""
    if settings == "memory":
        memory = PairMemory(decay=0.5, slots=64)
        rule = MemorySubset(memory, OutscoredSubset(2.0, 0.0), 1, 0.2, 1.0, 0.5, 1, 0.03, None, 0.0, 8.0, 0.25, 1.0)
        with torch.device("cpu"):  # the module's buffers live where the module was built
            return make_loss(rule, alpha_max=0.5)
    return from_settings(**settings)[0]


def inputs(dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(0)

    def normalised():
        return F.normalize(torch.randn(N, DIM, generator=generator), dim=-1).to(dtype)

    image, text = normalised(), normalised()
    teacher = {"image_features": normalised(), "text_features": normalised(), "logit_scale": torch.tensor(12.0)}
    return {
        "image_features": image.requires_grad_(),
        "text_features": text.requires_grad_(),
        "logit_scale": torch.tensor(10.0, dtype=dtype, requires_grad=True),
        "teacher": teacher,
        "noise_marks": torch.tensor([1, 0, -1] * (N // 3)),
        "pair_ids": torch.arange(N) * 5,
        "planted": torch.arange(N) % 4 == 0,
    }


def run(loss, data: dict, step: int, with_teacher: bool):
    return loss(
        data["image_features"],
        data["text_features"],
        data["logit_scale"],
        step,
        STEPS,
        data["teacher"] if with_teacher else None,
        pair_ids=data["pair_ids"],
        planted=data["planted"],
        noise_marks=data["noise_marks"],
    )


def output_tensors(out) -> dict[str, torch.Tensor]:
    return {
        "loss": out.loss,
        "logits_per_image": out.logits_per_image,
        "labels": out.labels,
        "targets_per_image": out.targets_per_image,
        "chosen": out.subset.chosen,
        "weight": out.subset.weight,
        "quality": out.quality,
        **{f"stats/{k}": v for k, v in out.stats.items()},
    }


# step 0: alpha = 0, no subset; step 60: a subset D of the batch
@pytest.mark.parametrize("step", [0, 60])
@pytest.mark.parametrize("case", CASES)
def test_every_tensor_the_loss_makes_is_on_the_inputs_device(case, step):
    loss_kwargs, with_teacher = CASES[case]
    data = inputs()
    loss = make(loss_kwargs)
    with torch.device("meta"):
        out = run(loss, data, step, with_teacher)
        out.loss.backward()
    misplaced = {name: t.device for name, t in output_tensors(out).items() if t.device != torch.device("cpu")}
    assert not misplaced, f"made off the inputs' device: {misplaced}"
    if loss_kwargs != "memory":  # the memory's D is smaller: pairs need sightings or the fallback
        assert out.stats["distill_count"] == math.floor(loss.schedule(step, STEPS) * N)
    assert data["image_features"].grad.device == torch.device("cpu")


def test_a_random_subset_reaches_the_inputs_device():
    """The random rule draws D on the host from seed and step (the same on every rank and device), then copies it."""
    loss = from_settings(subset="random", teacher="self", scope="subset")[0]
    out = run(loss, inputs(), 60, False)
    chosen = out.subset.chosen
    assert chosen.device == out.loss.device and chosen.sum() == math.floor(loss.schedule(60, STEPS) * N) > 0


@pytest.mark.parametrize("case", CASES)
def test_the_loss_is_fp32_under_bf16_autocast(case):
    loss_kwargs, with_teacher = CASES[case]
    data = inputs(torch.bfloat16)  # bf16 features, as the towers give them under bf16-mixed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(make(loss_kwargs), data, 60, with_teacher)
    # the targets are fp32 however the logits are
    floating = {name: t.dtype for name, t in output_tensors(out).items() if t.is_floating_point()}
    assert floating and all(dtype == torch.float32 for dtype in floating.values()), floating
    out.loss.backward()
    assert data["image_features"].grad.dtype == torch.bfloat16 and torch.isfinite(data["image_features"].grad).all()
    # the same value as the fp32 loss of the same (bf16-rounded) features: nothing inside ran in bf16
    reference = run(make(loss_kwargs), {**inputs(torch.bfloat16), "logit_scale": torch.tensor(10.0)}, 60, with_teacher)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["psd-default", "memory"])
def test_the_loss_compiles_without_graph_breaks_while_alpha_ramps(case):
    """No host sync in the loss: a graph break (``.item()``, a data-dependent shape, ``if tensor``) would make
    ``fullgraph=True`` fail. Step and alpha change every call, as in training while alpha ramps."""
    loss_kwargs, _ = CASES[case]
    loss = make(loss_kwargs)
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    data = inputs()
    for step in (40, 55, 70):
        alpha = torch.tensor(loss.schedule(step, STEPS), dtype=torch.float64)
        out = compiled(
            data["image_features"],
            data["text_features"],
            data["logit_scale"],
            step,
            STEPS,
            data["teacher"],
            pair_ids=data["pair_ids"],
            planted=data["planted"],
            noise_marks=data["noise_marks"],
            alpha=alpha,
        )
        out.loss.backward()
        eager = run(make(loss_kwargs), data, step, True) if case != "memory" else None
        if eager is not None:
            torch.testing.assert_close(out.loss, eager.loss)
            assert torch.equal(out.subset.chosen, eager.subset.chosen)
