"""A DDP step on 2 CPU processes (gloo) equals one process on the concatenated batch: loss, gradients, weights, EMA."""

import os
import socket

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy

from psdclip.loss import PSDLoss
from psdclip.models import create_clip
from psdclip.module import PSDCLIPModule

WORLD, PER_RANK = 2, 8
RANDOM = {"subset": "random", "scope": "subset"}  # the random rule (loss=psd_random)
DOUBT = {"subset": "doubt", "scope": "batch"}  # D = the pairs the teacher doubts most
# the default rule: D = the pairs the teacher confidently places elsewhere (margin 0.5: a random teacher leaves some out)
OUTSCORED = {"subset": "outscored", "scope": "batch", "outscore_margin": 0.5}
CASES = [  # (loss settings, local_loss)
    ({"alpha_max": 0.0, "schedule": "constant"}, False),
    ({"alpha_max": 0.0, "schedule": "constant"}, True),
    (dict(alpha_max=0.5, schedule="constant", teacher="self", **RANDOM), False),
    (dict(alpha_max=0.5, schedule="constant", teacher="self", **RANDOM), True),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **RANDOM), False),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **RANDOM), True),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **DOUBT), False),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **DOUBT), True),
    (dict(alpha_max=0.5, schedule="constant", teacher="self", **DOUBT), True),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **OUTSCORED), False),
    (dict(alpha_max=0.5, schedule="constant", teacher="ema", ema_decay=0.9, **OUTSCORED), True),
]
IDS = ["clip", "clip-local", "psd-self", "psd-self-local", "psd-ema", "psd-ema-local", "doubt-ema", "doubt-ema-local",
       "doubt-self-truncation-local", "outscored-ema", "outscored-ema-local"]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD * PER_RANK, 3, 28, 28, generator=generator)
    texts = torch.randint(1, 49407, (WORLD * PER_RANK, 16), generator=generator)
    return images, texts


def make_module(loss_kwargs: dict, local_loss: bool) -> PSDCLIPModule:
    torch.manual_seed(0)
    module = PSDCLIPModule(create_clip("psdclip-vit-tiny"), PSDLoss(**loss_kwargs, local_loss=local_loss),
                           lr=1e-3, warmup_steps=1, eps=1e-4)
    if module.teacher is not None:  # a teacher that differs from the student, so its soft targets matter
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in module.teacher.average.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return module


class Capture(L.Callback):
    """Gradients as the optimiser sees them (after DDP's all-reduce) and the logged loss."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {name: p.grad.clone() for name, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = trainer.callback_metrics["train/loss"].clone()
        self.distill = outputs["psd"].distill.cpu().clone()


class OneBatch:
    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        yield self.batch

    def __len__(self) -> int:
        return 1


def one_step(module: PSDCLIPModule, batch, **trainer_kwargs) -> dict:
    capture = Capture()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[capture],
                        use_distributed_sampler=False, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=OneBatch(batch))
    teacher = module.teacher.average.module if module.teacher is not None else None
    return {"loss": capture.loss, "grads": capture.grads, "distill": capture.distill,
            "weights": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in teacher.state_dict().items()} if teacher else {}}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    images, texts = global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for index, (loss_kwargs, local_loss) in enumerate(CASES):
        result = one_step(make_module(loss_kwargs, local_loss), (images[rows], texts[rows]),
                          devices=WORLD, strategy=DDPStrategy(process_group_backend="gloo"))
        torch.save(result, os.path.join(out_dir, f"case{index}-rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return out_dir


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_ddp_step_equals_single_process(ddp_results, index):
    loss_kwargs, local_loss = CASES[index]
    torch.set_num_threads(1)
    reference = one_step(make_module(loss_kwargs, local_loss), global_batch(), devices=1)
    for rank in range(WORLD):
        result = torch.load(ddp_results / f"case{index}-rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-6)
        assert torch.equal(result["distill"], reference["distill"]), "D differs between the ranks and one process"
        full = (WORLD * PER_RANK) // 2  # alpha · N; outscored takes only the pairs past its margin, at least one here
        assert loss_kwargs["alpha_max"] == 0 or result["distill"].sum() == full or (
            loss_kwargs.get("subset") == "outscored" and 0 < result["distill"].sum() <= full)
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            assert grad.abs().max() > 0 or name == "logit_scale", f"{name}: zero gradient, the test cannot tell"
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        # after the AdamW step (lr 1e-3; eps 1e-4 above gradient rounding: its first step ~ lr·g/(|g| + eps) would
        # otherwise turn a 1e-8 rounding difference in a ~1e-7 gradient into a 1e-5 weight difference)
        for group in ("weights", "teacher"):  # the EMA teacher agrees on every rank
            for name, value in reference[group].items():
                torch.testing.assert_close(result[group][name], value, rtol=1e-4, atol=1e-5)
