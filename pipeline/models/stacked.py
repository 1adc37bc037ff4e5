"""Pooled heads of one architecture run as one stacked model (`head_train.stack`).

A sweep whose heads differ only in what leaves their parameter shapes and inputs alone (learning rate, weight
decay, dropout, the pT target's form) runs K small networks on the same hits. One by one, each head gathers
the batch's real hits again, builds its own flat index, runs thin [P, F] @ [F, 2F] matmuls and pays its own
pooling pass, a dozen small ops each. Stacked, each head keeps its own leaf parameters (so its optimiser,
schedule, clipping, random stream and checkpoints are untouched: the weights are concatenated per step and
the backward hands each leaf its own gradient), and:
- the hits are gathered and indexed once for all heads;
- each per-hit net's first Linear is one [P, in] @ [in, K·hidden] matmul for all heads, its activation one op;
  each head's second Linear reads its own columns of that in place;
- the pooling runs once on the heads' per-hit features side by side, [P, K·2·D]: it is per feature;
- each head's regression MLP runs as its own module in its own random context, so its dropout masks are the
  ones it draws trained alone (the MLP sees R tracks, not P hits: little to gain from batching it).
Each head gets what it gets trained alone, up to the rounding of a wider matmul.

On a CPU the heads side by side must stay in the cache: on the demo's batches (P ~ 41k hits, [P, 2·D] = 10 MiB
per head) a forward and backward of 8 heads took 1.2x less time than one by one with one head per pass, the
same with two, and 1.9x MORE with all eight in one pass ([P, 512] gathers and index_selects out of the cache,
3x slower per byte), so a pass holds `CPU_PASS_BYTES` of per-hit features; on a GPU every head of the group
is one pass. Batched matmuls over K (`baddbmm` on [K, P, ·]) were slower still on the CPU: the K-major layout
needs a transposed copy of [P, K·H] both ways. `torch.func` (stack_module_state + functional_call + vmap)
cannot draw each head's dropout masks from that head's own stream (vmap's randomness is one draw for all or
one per call) and would need a vmap rule for the flat pooling's autograd Function: not exact, not used.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hepreg.settings import HeadConfig
from hepreg.errors import ConfigError
from hepreg.models.hit_pooling import flat_hits, pool_hits
from hepreg.models.track_inputs import HeadInputs

StackMode = Literal["auto", "yes", "no"]
# per-hit bytes one pass over the hits may write on a CPU: more heads side by side fall out of the cache (below)
CPU_PASS_BYTES = 16 * 2**20
# the head settings that change a pooled head's parameter shapes or its inputs (what a group must share)
SHAPING = ("kind", "threshold", "track_frame", "fit_proxy", "loss", "pt_target", "pooling", "hidden_dim",
           "num_layers")


def stack_key(head: nn.Module) -> tuple | None:
    """Heads with equal keys can run stacked; None for a head that never does (only pooled heads stack)."""
    if getattr(head.cfg, "kind", None) != "pooled":
        return None
    shapes = tuple((n, tuple(p.shape)) for n, p in head.named_parameters())
    return head.input_key, tuple(head.pooling), head.dim, shapes, tuple(type(m) for m in head.mlp)


def stack_groups(heads: list[nn.Module], mode: StackMode, names: list[str] | None = None) -> list[list[int]]:
    """Indices of `heads` in groups that run together (a group of one runs alone), each in the heads' order.

    `auto`: every set of >= 2 heads with equal `stack_key` is a group. `yes`: all heads in one group, refused
    with a ConfigError naming the setting that differs when they cannot be. `no`: one group per head."""
    if mode == "no" or len(heads) < 2:
        return [[k] for k in range(len(heads))]
    keys = [stack_key(h) for h in heads]
    if mode == "yes":
        names = names or [str(k) for k in range(len(heads))]
        for k, key in enumerate(keys):
            if key is None or key != keys[0]:
                bad = k if key is None or keys[0] is not None else 0
                raise ConfigError(f"head_train.stack=yes: {differs(heads[0].cfg, heads[bad].cfg, names[0], names[bad])}"
                                  f"; use head_train.stack=auto to stack only the heads that can be")
        return [list(range(len(heads)))]
    groups: dict[Any, list[int]] = {}
    for k, key in enumerate(keys):
        groups.setdefault(("alone", k) if key is None else key, []).append(k)
    return sorted(groups.values())


def differs(a: HeadConfig, b: HeadConfig, name_a: str, name_b: str) -> str:
    """Why heads `a` and `b` cannot run stacked, naming the setting."""
    for cfg, name in ((a, name_a), (b, name_b)):
        if cfg.kind != "pooled":
            return f"head {name!r} has head.kind={cfg.kind}; only pooled heads run stacked"
    for f in SHAPING:
        if getattr(a, f) != getattr(b, f):
            return f"heads {name_a!r} and {name_b!r} differ in head.{f} ({getattr(a, f)} vs {getattr(b, f)})"
    fields = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return f"heads {name_a!r} and {name_b!r} have differently shaped parameters (they differ in {', '.join(fields)})"


# ----------------------------------------------------------------------------------------------- the forward
def first_linear(x: Tensor, layers: list[nn.Linear]) -> Tensor:
    """K Linear layers on the same x [N, in] as one matmul -> [N, K·out], head after head."""
    w = torch.cat([lin.weight for lin in layers])  # [K·out, in]
    return F.linear(x, w, torch.cat([lin.bias for lin in layers]))


def dense(x: Tensor, nets: list[nn.Module]) -> list[Tensor]:
    """The K heads' `Dense` (Linear, SiLU, Linear) on the same x [N, in] -> K × [N, out]: the first Linear and
    the activation as one op over [N, K·hidden]; each second Linear reads its head's columns in place."""
    first, act, second = zip(*(net.net for net in nets))
    h = act[0](first_linear(x, list(first)))  # [N, K·hidden]
    return [lin(part) for lin, part in zip(second, h.split(first[0].out_features, 1))]


def shared(norms: list[nn.Module]) -> bool:
    """Whether every head standardises its inputs with the same statistics (heads of one input setting fitted
    on one sample do)."""
    return all(torch.equal(n.mean, norms[0].mean) and torch.equal(n.std, norms[0].std) for n in norms[1:])


def stacked_pooled(heads: list[nn.Module], xs: list[HeadInputs], contexts: list[Any],
                   same_norm: bool = False) -> list[Tensor]:
    """K pooled heads of one `stack_key` on the same buckets -> each head's MLP output [R, num_outputs], what its
    `mlp(encode_buckets(xs))` gives (`PooledHead.encode_buckets`, the flat path). Each head's MLP runs as its own
    module in its own random context: its dropout masks are the ones it draws alone. `same_norm`: every head's
    `hit_norm` holds the same statistics (`shared`), so the features are standardised once for all."""
    D, ops = heads[0].dim, tuple(heads[0].pooling)
    hits = flat_hits([x.tracks.mask for x in xs], [x.tracks.prob for x in xs])  # once for all heads
    features = torch.cat([x.hit_features[x.tracks.mask] for x in xs])  # [P, F_hit]
    embed = torch.cat([x.tracks.embed[x.tracks.mask] for x in xs])  # [P, D]
    query = torch.cat([x.tracks.query_embed for x in xs])  # [R, D]
    track = torch.cat([x.track_features for x in xs])  # [R, F_track]
    normed = heads[0].hit_norm(features) if same_norm else None
    R, out = hits.num_tracks, []
    width = len(heads)
    if features.device.type == "cpu":  # [P, K·2·D] must stay in the cache
        width = max(1, CPU_PASS_BYTES // max(features.shape[0] * 2 * D * features.element_size(), 1))
    for a in range(0, len(heads), width):
        part = heads[a:a + width]
        K = len(part)
        if normed is not None:
            hit = dense(normed, [h.hit_net for h in part])  # K × [P, D]
        else:
            hit = [h.hit_net(h.hit_norm(features)) for h in part]
        emb = dense(embed, [h.embed_net for h in part])  # K × [P, D]
        h = torch.cat([f for pair in zip(hit, emb) for f in pair], -1)  # [P, K·2·D], head after head
        pooled = pool_hits(h, hits, ops).view(R, len(ops), K, 2, D)  # op-major
        for k, (head, ctx) in enumerate(zip(part, contexts[a:a + width])):
            mine = pooled[:, :, k].transpose(1, 2).reshape(R, 2 * len(ops) * D)  # as `encode`: net-major
            with ctx:
                out.append(head.mlp(torch.cat([query, mine, head.track_norm(track)], -1)))  # [R, num_outputs]
    return out
