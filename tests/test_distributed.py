"""Two CPU processes (gloo) under DistributedDataParallel take the same optimisation step as one
process on the same global batch.

On CPU torch's SyncBatchNorm is unavailable (it needs CUDA), so each process normalises its own
half of the batch; the single-process reference therefore runs the two halves through the
student separately (same BatchNorm statistics) and averages their losses: the gradient of the
global-batch mean. On CUDA the trainer converts BatchNorm to SyncBatchNorm.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from oaml.models.preprocess import Preprocess
from oaml.models.resnet import create_model
from oaml.training.config import TrainConfig
from oaml.training.trainer import Trainer

from helpers import TinyImages

B, LR = 8, 0.1


def _cfg():
    return TrainConfig.from_dict({
        "data": {"batch_size": B, "eval_batch_size": 16, "augment": {"flip": False, "crop_padding": 0}},
        "student": {"width": 0.125},
        "preprocess": {"channels": 1},
        "optim": {"lr": LR, "epochs": 1, "schedule": "constant", "momentum": 0.0, "weight_decay": 0.0},
        "tensorboard": False,
        "progress": False,
        "device": "cpu",
    })


def _worker(rank, world, port, out_dir):
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    tr = Trainer(_cfg(), TinyImages(2 * B), TinyImages(16, seed=1), f"{out_dir}/ddp{rank}", num_classes=4, in_channels=1)
    assert tr.steps_per_epoch == 1 and tr.world == 2
    tr.fit()
    torch.save({k: v for k, v in tr.model.named_parameters()}, f"{out_dir}/ddp{rank}.pt")
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "ddp0.pt"), torch.load(tmp_path / "ddp1.pt")

    # single-process reference: same init, same global batch (the union of the two ranks' batches)
    torch.manual_seed(_cfg().seed)
    model = create_model("resnet18", num_classes=4, in_channels=1, width=0.125).train()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    pre = Preprocess(None, 1, [0.5], [0.5])
    data = TinyImages(2 * B)
    losses = []
    for r in range(2):
        sampler = DistributedSampler(range(2 * B), num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(0)
        idx = torch.as_tensor(list(sampler))
        losses.append(F.cross_entropy(model(pre(data.images[idx])), data.labels[idx]))
    (0.5 * (losses[0] + losses[1])).backward()
    for k, p in model.named_parameters():
        expected = start[k] - LR * p.grad
        assert not torch.equal(expected, start[k]) or p.grad.abs().max() == 0
        torch.testing.assert_close(rank0[k], expected, rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(rank1[k], rank0[k], rtol=0, atol=0, msg=k)


def _term_worker(rank, world, port, out_dir):
    """MCD's second head and NPOS's projection head live in loss terms, outside the DDP-wrapped
    student: their gradients must be averaged too, or the processes' copies drift apart."""
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    cfg = _cfg().model_copy(update={"method": _cfg().method.model_copy(update={"name": "mcd", "terms": {"mcd": {"start_epoch": 0}}}),
                                    "optim": _cfg().optim.model_copy(update={"epochs": 2})})
    tr = Trainer(cfg, TinyImages(4 * B), TinyImages(16, seed=1), f"{out_dir}/t{rank}", num_classes=4, in_channels=1,
                 aux_set=TinyImages(4 * B, seed=2 + rank))
    start = {k: v.detach().clone() for k, v in tr.term_modules.named_parameters()}
    tr.fit()
    torch.save({"terms": dict(tr.term_modules.named_parameters()), "start": start, "model": dict(tr.model.named_parameters())},
               f"{out_dir}/t{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_term_modules_stay_identical_across_processes(tmp_path):
    mp.spawn(_term_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "t0.pt"), torch.load(tmp_path / "t1.pt")
    assert r0["terms"], "mcd should own a second head"
    for k in r0["terms"]:
        assert not torch.equal(r0["terms"][k], r0["start"][k]), f"{k} did not train"
        torch.testing.assert_close(r1["start"][k], r0["start"][k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(r1["terms"][k], r0["terms"][k], rtol=0, atol=0, msg=k)
    for k in r0["model"]:
        torch.testing.assert_close(r1["model"][k], r0["model"][k], rtol=0, atol=0, msg=k)
