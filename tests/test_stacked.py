"""Stacked heads (`head_train.stack`): the same outputs, gradients and training as each head run alone."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hepreg.settings import HeadConfig
from hepreg.errors import ConfigError
from hepreg.models import stacked
from hepreg.models.head import HeadSet, batch_inputs, build_head
from hepreg.runs.training import RngStream
from hepreg.stages import train_head
from test_head import flat_batch
from test_train_head import make_run, single_runs_beside

BASE = HeadConfig(hidden_dim=16, num_layers=3)
TOL = dict(rtol=1e-4, atol=1e-6)


def heads_of(*changes: dict) -> list:
    heads = []
    for k, change in enumerate(changes):
        torch.manual_seed(k)  # different weights per head: a mix-up between heads would show
        head = build_head(dataclasses.replace(BASE, **change), dim=8)
        head.estimate_scales(flat_batch(seed=1))
        heads.append(head)
    return heads


def forward_backward(heads, stack: str, active: list[int], device="cpu"):
    """Outputs and gradients of a training forward of `heads` under `stack`, dropout from fixed streams."""
    batch = flat_batch().to(device)
    for h in heads:
        h.to(device).zero_grad(set_to_none=True)
    contexts = [RngStream(11 + k, torch.device(device)) for k in range(len(heads))]
    outs = HeadSet(heads, stack).train()(batch, batch_inputs(batch, [heads[k] for k in active]), active, contexts)
    sum(heads[k].loss(o, batch)[0] for k, o in zip(active, outs)).backward()
    grads = [[p.grad.clone() for p in heads[k].parameters()] for k in active]
    return [o.value.detach() for o in outs], grads, [c.state for c in contexts]


MIXED = ({"dropout": 0.0}, {"dropout": 0.3, "lr": 1e-2}, {"kind": "attention", "attn_dim": 8, "attn_heads": 2},
         {"dropout": 0.5, "weight_decay": 0.1}, {"hidden_dim": 8})


def assert_same(alone, together) -> None:
    """Outputs and gradients to float tolerance, every random stream exactly where it was left alone."""
    for a, b in zip(alone[0], together[0]):
        torch.testing.assert_close(b, a, **TOL)
    for ga, gb in zip(alone[1], together[1]):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, **TOL)
    for a, b in zip(alone[2], together[2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


ACTIVE = [3, 0, 2, 1, 4]  # heads 0, 1, 3 stack (they differ in dropout, lr, weight decay), 2 and 4 run alone


def test_stacked_forward_equals_each_head_in_values_and_gradients(monkeypatch):
    """With dropout: the same masks; one head per pass over the hits (a CPU's large batches) and all in one."""
    alone = forward_backward(heads_of(*MIXED), "no", ACTIVE)
    for pass_bytes in (1, 2**40):
        monkeypatch.setattr(stacked, "CPU_PASS_BYTES", pass_bytes)
        assert_same(alone, forward_backward(heads_of(*MIXED), "auto", ACTIVE))


def test_groups_and_refusals():
    heads = heads_of(*MIXED)
    assert stacked.stack_groups(heads, "auto") == [[0, 1, 3], [2], [4]]
    assert stacked.stack_groups(heads, "no") == [[k] for k in range(5)]
    assert stacked.stack_groups(heads[:1], "yes") == [[0]]  # one head: nothing to stack, nothing refused
    assert stacked.stack_groups([heads[k] for k in (0, 1, 3)], "yes") == [[0, 1, 2]]
    with pytest.raises(ConfigError, match=r"head_train.stack=yes: heads 'a' and 'e' differ in head.hidden_dim"):
        HeadSet([heads[0], heads[4]], "yes", ["a", "e"])
    with pytest.raises(ConfigError, match=r"head 'c' has head.kind=attention; only pooled heads run stacked"):
        HeadSet([heads[0], heads[2]], "yes", ["a", "c"])
    other = heads_of({}, {"threshold": 0.3})  # another input setting
    assert stacked.stack_groups(other, "auto") == [[0], [1]]
    with pytest.raises(ConfigError, match="differ in head.threshold"):
        stacked.stack_groups(other, "yes")


@pytest.mark.slow
def test_stacked_sweep_equals_single_runs(tmp_path):
    """Two heads of one shape stacked: per-epoch losses, best metrics and final weights as each configuration
    trained on its own, to float tolerance; `yes` refuses a sweep with a head of another kind before training."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("configs:\n"
                     "  - {name: a}\n"
                     "  - {name: b, lr: 1.0e-2, dropout: 0.3, weight_decay: 0.01}\n")
    cfg = make_run(tmp_path / "s", epochs=2)
    cfg.head_train.stack = "auto"
    train_head.run(cfg, sweep=sweep)
    for name, single, a, b in single_runs_beside(tmp_path, cfg, sweep):
        for k in a["model"]:
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
        assert b["best_val"] == pytest.approx(a["best_val"], rel=1e-5)
        assert b["best_metrics"]["best_epoch"] == a["best_metrics"]["best_epoch"]
        rows = [(single.run_path / "head" / "metrics.csv"), (cfg.run_path / "head" / "sweep" / name / "metrics.csv")]
        losses = [[float(v) for line in p.read_text().splitlines()[1:] for v in line.split(",")[1:3]] for p in rows]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # train and val loss of every epoch
    sweep.write_text(sweep.read_text() + "  - {name: attn, kind: attention, attn_dim: 16, attn_heads: 2}\n")
    cfg.head_train.stack = "yes"
    with pytest.raises(ConfigError, match="head 'attn' has head.kind=attention"):
        train_head.run(cfg, sweep=sweep, overwrite=True)
