"""A batch computed in micro-batches (``optim.micro_batches``) takes the same step as the whole batch at once: the
loss, the distillation subset D, the gradients, the weights and the EMA teacher after the step."""

import pytest
import torch

from psdclip.run.cli import check_settings
from tests.conftest import compose_config
from tests.helpers.losses import EMA_OUTSCORED
from tests.helpers.one_step import global_batch, make_module, one_step

CLIP = {"alpha_max": 0.0, "schedule": "constant"}
BATCH = 16
# (dtype, Lightning precision, tolerance); float64 checks the algebra, float32 what training runs
PRECISIONS = {"float64": ("64-true", 1e-5), "float32": ("32-true", 1e-4)}


def assert_same_step(result: dict, reference: dict, tolerance: float) -> None:
    torch.testing.assert_close(result["loss"], reference["loss"], rtol=tolerance, atol=tolerance)
    assert torch.equal(result["distill"], reference["distill"]), "D differs from the whole batch's"
    for name, grad in reference["grads"].items():
        assert grad.abs().max() > 0, f"{name}: zero gradient, the test cannot tell"
        torch.testing.assert_close(
            result["grads"][name], grad, rtol=tolerance, atol=tolerance * 1e-2, msg=lambda m, name=name: f"{name}: {m}"
        )
    for group in ("weights", "teacher"):
        for name, value in reference[group].items():
            torch.testing.assert_close(
                result[group][name],
                value,
                rtol=tolerance,
                atol=tolerance,
                msg=lambda m, name=name, group=group: f"{group} {name}: {m}",
            )


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("micro_batches", [2, 3])  # 3 does not divide 16: pieces of 6, 5 and 5 pairs
@pytest.mark.parametrize("loss_kwargs", [CLIP, EMA_OUTSCORED], ids=["clip", "psd-default"])
def test_micro_batches_take_the_whole_batch_step(loss_kwargs, micro_batches, precision):
    torch.set_num_threads(1)
    lightning_precision, tolerance = PRECISIONS[precision]
    batch = global_batch(BATCH)
    reference = one_step(make_module(loss_kwargs), batch, precision=lightning_precision)
    result = one_step(make_module(loss_kwargs, micro_batches=micro_batches), batch, precision=lightning_precision)
    assert reference["grads"]["logit_scale"].dtype == getattr(torch, precision)
    if loss_kwargs is EMA_OUTSCORED:
        assert 0 < reference["distill"].sum() <= BATCH // 2 and reference["teacher"]
    assert_same_step(result, reference, tolerance)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.micro_batches=4", "trainer.accumulate_grad_batches=2"], "cannot be combined"),
        (["optim.micro_batches=4", "trainer.gradient_clip_val=1.0"], "gradient clipping"),
        (["optim.micro_batches=64", "data.batch_size=32"], "cannot split data.batch_size=32"),
        (["optim.micro_batches=0"], "optim.micro_batches=0 cannot work"),
    ],
)
def test_settings_that_cannot_go_with_micro_batches_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_settings(compose_config(["data.batch_size=32", *overrides]))


def test_micro_batches_alone_are_accepted():
    check_settings(compose_config(["data.batch_size=32", "optim.micro_batches=4"]))
