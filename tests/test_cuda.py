"""What only a GPU can check (`make gpu-check`; marked `cuda`, skipped without one): a stage-1 step in bf16
autocast, export on CUDA against CPU, head training from the device-resident cache, stacked heads, DDP over NCCL."""
from __future__ import annotations

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU checks are skipped")]


def test_stage1_step_in_bf16_autocast():
    from hepreg.settings import AssignConfig
    from hepreg.models.assign_loss import assignment_loss
    from hepreg.models.maskformer import MaskFormer

    from test_maskformer import TINY, toy_batch

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = MaskFormer(TINY).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = toy_batch(8).to(dev)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch.hits, batch.hit_valid)
    loss, _, _ = assignment_loss(out, batch, AssignConfig(dice_weight=1.0, dice_cost=1.0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("auto", 0.1)])  # auto: bf16 autocast on CUDA
def test_export_on_cuda_equals_cpu(tmp_path, precision, tol):
    from hepreg.data.synthetic import generate

    from test_export import export, export_config, make_checkpoint, read_split

    data = generate(tmp_path / "data", events=120, seed=5, preset="light", events_per_file=60)
    out = {}
    for device in ("cpu", "cuda"):
        cfg = export_config(tmp_path / device, data, dtype="float32", prune_threshold=0.0, device=device)
        cfg.assign.precision = precision
        ckpt = make_checkpoint(tmp_path / "c.pt", cfg)
        export(cfg, ckpt, splits=["val"])
        out[device] = read_split(cfg, "val")
    cpu, gpu = out["cpu"], out["cuda"]
    for name in ("raw", "offsets", "targets", "target_valid", "event_id"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name)), name
    for name in ("embed", "logit", "query_embed", "track_logit"):
        torch.testing.assert_close(getattr(gpu, name), getattr(cpu, name), rtol=tol, atol=tol, msg=name)
    assert (cpu.match == gpu.match).float().mean() > (0.99 if precision == "fp32" else 0.9)  # near-ties may flip


def test_head_trains_from_the_device_resident_cache(tmp_path, monkeypatch):
    from hepreg.stages import train_head

    from test_train_head import make_run

    cfg = make_run(tmp_path, epochs=4)
    cfg.head_train.device = "cuda"
    seen = []
    real_step = train_head.train_step

    def recording_step(model, members, batch, grad_clip, source=None):
        seen.append(batch.raw.device.type)
        return real_step(model, members, batch, grad_clip, source)

    monkeypatch.setattr(train_head, "train_step", recording_step)
    train_head.run(cfg)
    assert seen and set(seen) == {"cuda"}
    lines = (cfg.run_path / "head" / "metrics.csv").read_text().splitlines()
    assert float(lines[-1].split(",")[1]) < float(lines[1].split(",")[1])  # train loss fell


def test_resident_loader_on_cuda_equals_zarr(tmp_path):
    from hepreg.cache.loader import CacheLoader

    from helpers import assert_same, random_flat, write_split

    write_split(tmp_path / "s.zarr", random_flat(150, seed=4), block=16, dtype="float16")
    kw = dict(batch_size=32, shuffle=True, seed=1, shuffle_buffer=2, device="cuda")
    held, read = CacheLoader(tmp_path / "s.zarr", in_memory="yes", **kw), CacheLoader(tmp_path / "s.zarr",
                                                                                        in_memory="no", **kw)
    assert held.resident is not None and held.resident.tensors["embed"].is_cuda
    for x, y in zip(read, held):
        assert x.raw.is_cuda and y.raw.is_cuda
        assert_same(x.to("cpu"), y.to("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_one_rank_on_nccl(tmp_path):
    """A head under DistributedDataParallel over NCCL gives the plain module's gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hepreg.cache.loader import CacheLoader
    from hepreg.settings import HeadConfig
    from hepreg.models.head import build_head

    from helpers import random_flat, write_split

    write_split(tmp_path / "s.zarr", random_flat(64, seed=6), block=16)
    batch = next(iter(CacheLoader(tmp_path / "s.zarr", batch_size=32, shuffle=False, device="cuda")))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        grads = []
        for wrap in (False, True):
            torch.manual_seed(0)
            head = build_head(HeadConfig(hidden_dim=16, num_layers=2, dropout=0.0), 8).cuda()
            model = DistributedDataParallel(head, device_ids=[0]) if wrap else head
            out = model(batch, only_matched=True)
            loss, slots = head.loss(out, batch)
            (loss / slots.clamp_min(1)).backward()
            grads.append([p.grad.clone() for p in head.parameters() if p.grad is not None])
        assert grads[0]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()


def test_compiled_head_step_on_cuda_equals_eager():
    """`head_train.compile` on a GPU: inductor compiles the dense parts (or says why not), and a training step
    gives eager's loss and gradients to float tolerance (dropout off: compiled graphs draw their own masks)."""
    import copy

    from hepreg.runs.compiled import compile_head

    from test_head import flat_batch, make_head

    dev = torch.device("cuda")
    eager = make_head("fit").to(dev).train()
    compiled = copy.deepcopy(eager)
    said = compile_head(compiled)
    print(said)
    assert said.startswith("compiled ("), said
    batch = flat_batch().to(dev)
    losses = []
    for head in (eager, compiled):
        loss, n = head.loss(head(batch, only_matched=True), batch)
        (loss / n.clamp_min(1)).backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5)


def test_stacked_heads_equal_each_head_alone_on_cuda():
    """A sweep's heads of one shape as one stacked model on the GPU (every head in one pass over the hits): the
    outputs and gradients of each head run alone, its dropout masks from its own CUDA stream."""
    from test_stacked import ACTIVE, MIXED, assert_same, forward_backward, heads_of

    alone = forward_backward(heads_of(*MIXED), "no", ACTIVE, "cuda")
    assert_same(alone, forward_backward(heads_of(*MIXED), "auto", ACTIVE, "cuda"))
