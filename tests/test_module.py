import math

import pytest
import torch
from torch.utils.data import DataLoader

from psdclip.models import MAX_LOGIT_SCALE, create_clip
from psdclip.module import PSDCLIPModule
from psdclip.schedule import warmup_cosine
from tests.helpers.losses import from_settings, make_loss
from tests.helpers.one_step import optim
from tests.helpers.trainers import quiet_trainer


def tiny_batches(clip, count=4, size=8):
    g = torch.Generator().manual_seed(0)
    tokens = clip.tokenizer([f"a photo of item {i}." for i in range(size)])
    return [(torch.randn(size, 3, 28, 28, generator=g), tokens) for _ in range(count)]


def fit(module, batches, **trainer_kwargs):
    trainer = quiet_trainer(
        max_epochs=1,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_no_weight_decay_on_gains_biases_norms_scalars_and_logit_scale():
    module = PSDCLIPModule(create_clip("psdclip-vit-tiny"), *from_settings(), **optim())
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in undecayed and "visual.class_embedding" in undecayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("ln_final.weight") for n in undecayed) and any(n.endswith(".bias") for n in undecayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    # as the optim config builds it: the optimiser's LR follows the multiplier step by step
    made = optim(**{"optimizer.lr": 2e-3, "scheduler.warmup_steps": 10, "scheduler.min_lr_ratio": 0.1})
    optimizer = made["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    schedule, rates = made["scheduler"](optimizer, 110), []
    for _ in range(111):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(2e-4) and rates[9] == pytest.approx(2e-3) and rates[110] == pytest.approx(2e-4)


def test_logit_scale_is_clamped_after_each_step():
    clip = create_clip("psdclip-vit-tiny")
    with torch.no_grad():
        clip.model.logit_scale.fill_(math.log(150.0))
    module = PSDCLIPModule(clip, make_loss(alpha_max=0.0), None, **optim(**{"optimizer.lr": 1e-6}))
    fit(module, tiny_batches(clip, count=1))
    assert module.model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)


def test_ema_teacher_follows_the_student_and_is_checkpointed(tmp_path):
    clip = create_clip("psdclip-vit-tiny")
    module = PSDCLIPModule(
        clip, *from_settings(ema_decay=0.5), **optim(**{"optimizer.lr": 1e-2, "scheduler.warmup_steps": 1})
    )
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = fit(module, tiny_batches(clip, count=3))
    name = "visual.conv1.weight"
    student = dict(module.model.named_parameters())[name]
    teacher = dict(module.teacher.model.named_parameters())[name]
    assert not teacher.requires_grad
    assert not torch.equal(teacher, start[name]) and not torch.equal(teacher, student)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(state[f"teacher.model.{name}"], teacher)
    assert int(state["teacher.updates"]) == 3


def test_the_ema_teacher_runs_only_at_the_steps_whose_loss_reads_it():
    """Before the ramp starts D is empty: the teacher's forward is skipped there, and its average still advances."""
    clip = create_clip("psdclip-vit-tiny")
    module = PSDCLIPModule(clip, *from_settings(ramp_start=2, ramp_end=3), **optim())
    calls = []
    module.teacher.register_forward_hook(lambda *_: calls.append(module.global_step))
    fit(module, tiny_batches(clip, count=4))
    assert calls == [3]  # alpha is 0 up to step 2 (the ramp's start) and 0.5 at step 3
    assert int(module.teacher.updates) == 4
    assert PSDCLIPModule(clip, *from_settings(teacher="self"), **optim()).teacher is None
    assert PSDCLIPModule(clip, *from_settings(alpha_max=0.0), **optim()).teacher is None  # CLIP never pays for one


def test_a_frozen_teacher_is_the_earlier_run_s_model_and_never_moves(tmp_path):
    """teacher=frozen: the second training distils from the first run's EMA teacher (or student), as saved; its
    forward runs at every distilling step, its weights stay those of the checkpoint while the student trains."""
    import functools

    from psdclip.teacher import FrozenTeacher

    clip = create_clip("psdclip-vit-tiny")
    first = PSDCLIPModule(clip, *from_settings(ema_decay=0.5), **optim(**{"optimizer.lr": 1e-2}))
    fit(first, tiny_batches(clip, count=3)).save_checkpoint(tmp_path / "first.ckpt")
    saved = torch.load(tmp_path / "first.ckpt", weights_only=True)["state_dict"]
    loss, _ = from_settings(schedule="constant")  # D from the first step, as loss=psd_listed
    calls = []
    for weights, prefix in [("ema", "teacher.model."), ("student", "model.")]:
        frozen = functools.partial(
            FrozenTeacher, checkpoint=str(tmp_path / "first.ckpt"), weights=weights, compile=False
        )
        second = PSDCLIPModule(create_clip("psdclip-vit-tiny"), loss, frozen, **optim(**{"optimizer.lr": 1e-2}))
        teacher = {name: param.detach().clone() for name, param in second.teacher.model.state_dict().items()}
        assert teacher.keys() == {key.removeprefix(prefix) for key in saved if key.startswith(prefix)}
        assert all(torch.equal(value, saved[prefix + name]) for name, value in teacher.items())
        calls.clear()
        second.teacher.register_forward_hook(lambda *_: calls.append(1))
        start = second.model.visual.conv1.weight.detach().clone()
        fit(second, tiny_batches(clip, count=3))
        assert len(calls) == 3 and not torch.equal(second.model.visual.conv1.weight, start)
        assert all(torch.equal(value, second.teacher.model.state_dict()[name]) for name, value in teacher.items())
    with pytest.raises(ValueError, match="holds a psdclip-vit-tiny model, which does not fit the student"):
        FrozenTeacher(torch.nn.Linear(3, 2), checkpoint=str(tmp_path / "first.ckpt"), weights="ema", compile=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        FrozenTeacher(clip.model, checkpoint=str(tmp_path / "none.ckpt"), weights="ema", compile=False)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_the_ema_average_matches_torch_s_averaged_model(bias_correction):
    """The teacher's update is torch's EMA (AveragedModel with get_ema_multi_avg_fn: a copy first, then lerps); with
    bias correction the n-th update's step is (1 - decay) / (1 - decay^n), the decay-weighted mean of the weights
    the student has had (checked against that mean, computed directly)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from psdclip.teacher import EMATeacher

    decay, student = 0.9, torch.nn.Linear(3, 2)
    ours = EMATeacher(student, decay=decay, bias_correction=bias_correction, compile=False)
    reference = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    history = []
    for step in range(4):
        with torch.no_grad():
            for param in student.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(step)))
        history.append([param.detach().clone() for param in student.parameters()])
        ours.update(student)
        reference.update_parameters(student)
        for index, (mine, theirs) in enumerate(zip(ours.model.parameters(), reference.module.parameters())):
            if not bias_correction:
                assert torch.equal(mine, theirs)
                continue
            weights = [decay ** (step - seen) for seen in range(step + 1)]
            mean = sum(w * past[index] for w, past in zip(weights, history)) / sum(weights)
            torch.testing.assert_close(mine, mean)
            if step > 0:  # the initial copy's share is gone, unlike the plain EMA's
                assert not torch.allclose(mine, theirs)
