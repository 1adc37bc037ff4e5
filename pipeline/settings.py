"""What a run can be set to: one typed dataclass per section of a run's config, each choice declared once.

One `Config` describes a whole run (data, stage-1 model and training, export, head, evaluation), so every
stage of a run reads the same settings and the cache and checkpoints can fingerprint exactly what made them.
Closed choices are `Literal[...]` annotations, numeric ranges and name patterns are declared next to the field
(`ranged(144, ge=1)`, `plain_name("demo")`): a new field gets its valid values in one line. The models read
these dataclasses and nothing else of a config; reading and checking YAML is `hepreg.config`'s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hepreg.errors import ConfigError


# ----------------------------------------------------------------------------------------------- value checks
@dataclass(frozen=True)
class Range:
    """Valid numeric values of a field (of each item, for a list): bounds inclusive (ge/le) or strict (gt/lt)."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __str__(self) -> str:
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else "(-inf"
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else "inf)"
        return f"{lo}, {hi}"

    def check(self, value: Any, where: str) -> None:
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            ok = (math.isfinite(v) and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                  and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))
            if not ok:
                raise ConfigError(f"{where} = {v!r} is outside its valid range {self}")


@dataclass(frozen=True)
class Pattern:
    """A string field that must match `regex` (described to the user as `what`)."""
    regex: str
    what: str

    def check(self, value: Any, where: str) -> None:
        if value is not None and not re.fullmatch(self.regex, value):
            raise ConfigError(f"{where} = {value!r} is not {self.what}")


def _checked(default: Any, check: Range | Pattern) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A numeric config field (or list of numbers) with its valid range: `epochs: int = ranged(30, ge=1)`."""
    return _checked(default, Range(ge=ge, gt=gt, le=le, lt=lt))


def plain_name(default: str) -> Any:
    """A name used as a file or directory name: letters, digits, `.`, `_`, `-`; no `/`, no leading dot."""
    return _checked(default, Pattern(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", "a plain name (letters, digits, '.', '_', "
                                     "'-'; no '/', no leading '.'), e.g. demo or w144_lr3e-3"))


# The closed choices, declared once: the loader checks them, the CLI offers them (`typing.get_args` where code
# needs the values at run time).
Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when there is one
Split = Literal["train", "val", "test"]
Precision = Literal["auto", "fp32", "bf16"]  # auto: bf16 autocast on CUDA
EmbedDtype = Literal["float16", "float32"]
HeadKind = Literal["pooled", "attention"]
Pooling = Literal["mean", "sum", "max", "min"]
HeadTrainSource = Literal["cache", "live"]  # live: the frozen stage-1 model run on every batch
PredictSource = Literal["hdf5", "cache"]  # predict's stage-1 outputs: run on the HDF5 events, or as exported


@dataclass
class DataConfig:
    path: str = "data/demo"  # dataset directory in the ATLAS-muon HDF5 layout
    max_events: int | None = ranged(None, ge=1)  # use only the first N events of the dataset
    val_fraction: float = ranged(0.1, ge=0, lt=1)  # contiguous event ranges: [train | val | test]
    test_fraction: float = ranged(0.1, ge=0, lt=1)
    batch_size: int = ranged(128, ge=1)  # events per batch (stage 1 and the live head path)
    bucket_window: int = ranged(32, ge=1)  # batches per sorting window when bucketing by hit count
    block_events: int = ranged(8192, ge=1)  # events read from HDF5 per call

    def check(self) -> str | None:
        if self.val_fraction + self.test_fraction >= 1:
            return (f"data.val_fraction ({self.val_fraction:g}) + data.test_fraction ({self.test_fraction:g}) must be "
                    "below 1, leaving events to train on")
        return None


@dataclass
class ModelConfig:
    """The stage-1 MaskFormer (reference: hepattn atlas_muon)."""
    dim: int = ranged(32, ge=1)
    num_heads: int = ranged(8, ge=1)
    encoder_layers: int = ranged(2, ge=0)
    decoder_layers: int = ranged(2, ge=1)
    num_queries: int = ranged(2, ge=1)
    ffn_mult: int = ranged(4, ge=1)  # FFN hidden width = ffn_mult * dim
    dropout: float = ranged(0.0, ge=0, lt=1)
    mask_attn_threshold: float = ranged(0.1, ge=0, le=1)  # decoder mask attention: sigmoid(logit) >= threshold
    pos_enc: bool = True  # fixed sinusoidal encoding of r, theta, phi

    def check(self) -> str | None:
        if self.dim % self.num_heads:
            return f"model.dim ({self.dim}) must be a multiple of model.num_heads ({self.num_heads})"
        return None


@dataclass
class AssignConfig:
    """Stage-1 training."""
    epochs: int = ranged(30, ge=1)
    batch_size: int | None = ranged(None, ge=1)  # events per training step; None: data.batch_size (validation always uses it)
    train_events: int | None = ranged(None, ge=1)  # train on the first N events of the train split only (None: all)
    lr: float = ranged(1e-3, ge=0)
    optimizer: Literal["adamw", "lion"] = "adamw"
    weight_decay: float = ranged(1e-5, ge=0)
    grad_clip: float = ranged(1.0, ge=0)  # 0: no clipping
    patience: int = ranged(5, ge=1)  # early stopping on val loss, in epochs
    valid_cost: float = ranged(10.0, ge=0)  # matching cost weights
    mask_cost: float = ranged(1.0, ge=0)
    dice_cost: float = ranged(0.0, ge=0)
    valid_weight: float = ranged(1.0, ge=0)  # loss weights
    mask_weight: float = ranged(1.0, ge=0)
    dice_weight: float = ranged(0.0, ge=0)
    intermediate_losses: bool = True  # tasks at every decoder layer's input, matched separately
    device: Device = "auto"
    precision: Precision = "auto"
    max_minutes: float | None = ranged(None, gt=0)  # stop after this wall time (the last epoch still completes)


@dataclass
class ExportConfig:
    dtype: EmbedDtype = "float16"  # of hits/embed and events/query_embed
    prune_threshold: float | None = ranged(None, ge=0, lt=1)  # None: the head's threshold; 0 keeps every hit
    block_events: int = ranged(4096, ge=1)  # events per write block (and per zarr chunk along events)
    hit_chunk: int = ranged(32768, ge=1)  # hits per zarr chunk of the flat hit arrays
    batch_size: int = ranged(256, ge=1)  # events per frozen forward pass (on average, when batched by hits)
    # how the frozen model's sorted windows are cut into batches (export, the live source, predict): equal
    # numbers of hits puts the largest events in small batches of their own (the frozen forward ~10 % faster
    # on the demo's data, the same outputs up to rounding); see hepreg.data.batching
    batch_by: Literal["events", "hits"] = "hits"
    compressor: Literal["lz4", "zstd", "none"] = "lz4"
    clevel: int = ranged(5, ge=0, le=9)
    splits: list[Split] = field(default_factory=lambda: ["train", "val", "test"])
    device: Device = "auto"


@dataclass
class HeadConfig:
    """One regression head configuration (sweeps vary these); see hepreg.models.head."""
    kind: HeadKind = "pooled"
    track_frame: bool = True  # hit features relative to the track's own frame; eta, phi regressed relative to it
    fit_proxy: bool = True  # a least-squares fit of the pooled hits as input and as the reference to correct
    loss: Literal["smooth_l1", "gaussian_nll"] = "smooth_l1"  # gaussian_nll predicts a width per target
    attn_dim: int = ranged(32, ge=1)  # attention head: token width, layers, heads
    attn_layers: int = ranged(2, ge=1)
    attn_heads: int = ranged(4, ge=1)
    hidden_dim: int = ranged(144, ge=1)
    num_layers: int = ranged(3, ge=1)
    dropout: float = ranged(0.1, ge=0, lt=1)
    threshold: float = ranged(0.1, ge=0, lt=1)  # assignment threshold on sigmoid(final logit)
    pooling: list[Pooling] = field(default_factory=lambda: list(typing.get_args(Pooling)))
    pt_target: Literal["qpt", "pt", "log_pt"] = "qpt"  # qpt: q/pT, the curvature
    lr: float = ranged(1e-3, ge=0)
    weight_decay: float = ranged(1e-5, ge=0)

    def check(self) -> str | None:
        if self.attn_dim % self.attn_heads:
            return f"head.attn_dim ({self.attn_dim}) must be a multiple of head.attn_heads ({self.attn_heads})"
        if not self.pooling:
            return f"head.pooling must name at least one of {', '.join(typing.get_args(Pooling))}"
        return None


@dataclass
class HeadTrainConfig:
    """Stage-2 training."""
    source: HeadTrainSource = "cache"
    epochs: int = ranged(30, ge=1)
    batch_size: int = ranged(2048, ge=1)
    patience: int = ranged(5, ge=1)
    grad_clip: float = ranged(1.0, ge=0)  # 0: no clipping
    shuffle_buffer: int = ranged(8, ge=1)  # blocks mixed per shuffle buffer
    in_memory: Literal["auto", "yes", "no"] = "auto"  # hold the split on the training device (auto: when it fits)
    num_workers: int = ranged(0, ge=0)
    device: Device = "auto"
    compile: bool = False  # torch.compile the heads' dense parts (hepreg.runs.compiled; eager where no compiler works)
    stack: Literal["auto", "yes", "no"] = "auto"  # a sweep's same-shaped heads as one model (hepreg.models.stacked)


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning of stage 1 and a trained head (`hepreg finetune`), from their checkpoints.

    The loss is `assign_weight` x the stage-1 assignment loss (per event, as stage 1 trains) + `head_weight` x
    the head's loss (per matched track, as the head trains); early stopping watches the same sum on the val
    split, so a fine-tune that buys resolution by losing assignment quality does not count as better.
    """
    epochs: int = ranged(3, ge=1)
    batch_size: int | None = ranged(None, ge=1)  # events per step, bucketed as stage 1; None: assign.batch_size
    train_events: int | None = ranged(None, ge=1)  # train on the first N events of the train split only (None: all)
    val_events: int | None = ranged(None, ge=1)  # validate on the first N events of the val split (None: all)
    lr_stage1: float = ranged(1e-5, ge=0)  # stage 1 learns much slower than the head: it is already trained
    lr_head: float = ranged(2e-4, ge=0)
    weight_decay: float = ranged(1e-5, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"  # cosine: each part's lr decays to 0 over its steps
    warmup_steps: int = ranged(50, ge=0)  # steps with stage 1 frozen (only the head trains) before both do
    assign_weight: float = ranged(1.0, ge=0)
    head_weight: float = ranged(1.0, ge=0)
    grad_clip: float = ranged(1.0, ge=0)  # each part's gradient norm clipped on its own; 0: no clipping
    patience: int = ranged(3, ge=1)  # early stopping on the val figure, in epochs
    device: Device = "auto"


@dataclass
class EvalConfig:
    split: Split = "test"
    pt_bins: list[float] = ranged([3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0], gt=0)  # GeV, ascending
    eta_bins: list[float] = ranged([0.0, 0.5, 1.0, 1.5, 2.0, 2.7], ge=0)  # |eta|, ascending
    plots: bool = True  # false: no figures from any command (learning curves, evaluation plots): metrics and
    # tables only, quicker when scanning many heads (a matplotlib figure costs seconds on a CPU)

    def check(self) -> str | None:
        for name in ("pt_bins", "eta_bins"):
            edges = getattr(self, name)
            if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
                return f"eval.{name} {edges} must be at least two strictly ascending bin edges"
        return None


@dataclass
class Config:
    name: str = plain_name("demo")  # the run: <run_dir>/<name>/
    seed: int = ranged(0, ge=0)
    run_dir: str = "runs"  # where runs go
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    head_train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, section: str | None = None) -> str:
        """sha256 of the resolved config (or one section of it), stable across key order."""
        d = self.to_dict() if section is None else self.to_dict()[section]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
