"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

One `Config` describes a whole run (data, stage-1 model and training, export, head, evaluation), so every
stage of a run reads the same file and the cache and checkpoints can fingerprint exactly what made them.
Unknown keys are errors, never silently ignored. Every value is checked when the config is loaded, before any
work starts: closed choices are `Literal[...]` annotations, numeric ranges and name patterns are declared next
to the field (`ranged(144, ge=1)`, `plain_name("demo")`), and `build_dataclass` checks them all, so a new field
gets its valid values in one line and a bad value is refused with the valid ones in the message.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
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


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting ints to floats where a float is expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # `X | None`: the error of X says it best
            raise ConfigError(errors[0] + " (or null)")
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if isinstance(value, str) and (item is str or typing.get_origin(item) is Literal):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "yes" in choices:  # YAML reads a bare yes/no as a boolean
            value = "yes" if value else "no"
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise ConfigError(f"{where} = {value!r} is not one of the valid choices: "
                              + ", ".join(str(c) for c in choices))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_dataclass(cls, data: dict[str, Any], where: str):
    """A config dataclass from a plain mapping; unknown keys and ill-typed values are ConfigErrors."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys{' of ' + where if where else ''}: "
            + ", ".join(types_)
        )
    kwargs = {}
    checks = {f.name: f.metadata.get("check") for f in dataclasses.fields(cls)}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        kwargs[k] = _coerce(v, types_[k], key)
        if checks[k] is not None:
            checks[k].check(kwargs[k], key)
    obj = cls(**kwargs)
    if hasattr(obj, "check"):  # relations between fields
        problem = obj.check()
        if problem:
            raise ConfigError(problem)
    return obj


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one `dotted.key=value` override to a plain config dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    cls: Any = Config
    node = data
    for i, p in enumerate(parts):
        types_ = _field_types(cls)
        if p not in types_:
            path = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {p!r} is not in {path}; valid keys: {', '.join(types_)}")
        if i == len(parts) - 1:
            node[p] = _override_value(raw, assignment)
        else:
            cls = types_[p]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = node.setdefault(p, {})
    return data


def _override_value(raw: str, assignment: str) -> Any:
    """The value of one `--set key=value`, parsed as plain YAML: no tags (`!!python/...`, `!!str`), which a
    value typed on a command line has no use for; malformed YAML is a ConfigError naming the override."""
    if not raw.strip():
        return None
    try:
        tags = [t for t in yaml.scan(raw, Loader=yaml.SafeLoader) if isinstance(t, yaml.TagToken)]
        if tags:
            tag = "".join(tags[0].value)
            raise ConfigError(f"--set {assignment}: the value carries the YAML tag {tag!r}; a value is plain YAML "
                              f"(a number, a string, true/false, null, a [list]), without tags")
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        why = (f"{e.problem}, at character {mark.column + 1}" if getattr(e, "problem", None) and mark is not None
               else " ".join(str(e).split()))
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({why}); quote "
                          f"a string that contains YAML syntax, e.g. --set 'name=\"a: b\"'") from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; a missing or malformed file is a ConfigError that names it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then each `--set key=value` in order; validated as a whole."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = _merge(data, loaded)
    try:
        cfg = build_dataclass(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'the default config'}: {e}") from None
    for o in overrides or []:  # each override checked on its own, so an error names the one to blame
        data = apply_override(data, o)
        try:
            cfg = build_dataclass(Config, data, "")
        except ConfigError as e:
            raise ConfigError(f"--set {o}: {e}") from None
    return cfg


def load_sweep(path: str | Path, base: HeadConfig) -> list[tuple[str, HeadConfig]]:
    """A sweep file lists head configurations as overrides of `base` (the run config's `head` section); it holds
    `configs:` and nothing else, so a key put beside it (a head field meant for every entry, a typo) is an error
    rather than a setting silently not applied.

        configs:
          - {name: w144, hidden_dim: 144}
          - {name: w288_lr3e-3, hidden_dim: 288, lr: 3.0e-3}
    """
    p = Path(path)
    data = read_yaml(p, "sweep file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {p} must hold a mapping with one key, `configs:` (a list of head configs)")
    other = [k for k in data if k != "configs"]
    if other:
        key = other[0]
        where = (f"{key!r} is a head field: put it into each entry under configs:, or into the run config's "
                 f"head section, which every entry starts from" if key in _field_types(HeadConfig)
                 else f"{key!r} is not a key of a sweep file")
        raise ConfigError(f"sweep file {p}: unknown top-level key {where}; a sweep file holds only `configs:`, "
                          f"a list of head configs")
    entries = data.get("configs")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"sweep file {p} must hold a non-empty list under `configs:`")
    out, names = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"sweep file {p}: configs[{i}] must be a mapping of head fields")
        entry = dict(entry)
        name = str(entry.pop("name", f"head{i}"))
        if name in names or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"sweep file {p}: configs[{i}] name {name!r} is repeated or not a plain name")
        names.add(name)
        try:
            hc = build_dataclass(HeadConfig, {**dataclasses.asdict(base), **entry}, f"configs[{i}]")
        except ConfigError as e:
            raise ConfigError(f"sweep file {p}: {e}") from None
        out.append((name, hc))
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config stored in a checkpoint or cache attrs."""
    return build_dataclass(Config, data, "")


# ----------------------------------------------------------------------------------------------- tuning space
Pruner = Literal["median", "hyperband", "none"]


@dataclass(frozen=True)
class TunedParam:
    """One head setting `hepreg tune` searches: a list of `choices`, or a range low..high (ints for an int
    field, on a log scale with `log`, on a grid with `step`)."""
    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class SearchSpace:
    """A space file (`hepreg tune --space`): the head settings searched, and how trials are pruned."""
    params: tuple[TunedParam, ...]
    pruner: Pruner = "median"
    startup_trials: int = 5  # drawn at random before TPE models the results; the median pruner waits for as many
    warmup_epochs: int = 2  # epochs every trial trains before it may be pruned

    def head(self, values: dict[str, Any], base: HeadConfig) -> HeadConfig:
        """The head config of one trial: `base` with the trial's values (a list field's choice is a comma list)."""
        return build_dataclass(HeadConfig, {**dataclasses.asdict(base), **values}, "head")

    def min_threshold(self, base: HeadConfig) -> float:
        """The lowest threshold any trial may ask for: the sources keep every hit it pools."""
        for p in self.params:
            if p.name == "threshold":
                return min(p.choices) if p.choices is not None else float(p.low)
        return base.threshold


SPACE_KEYS = ("params", "pruner", "startup_trials", "warmup_epochs")
RANGE_KEYS = ("low", "high", "step", "log")


def load_space(path: str | Path, base: HeadConfig) -> SearchSpace:
    """A space file names head settings (fields of the config's `head:` section) under `params:`, each a list
    of choices or a range, and refuses anything else: an unknown key, a range with low > high or a log range
    from <= 0, a choice or bound that is no valid value of its field.

        pruner: median          # median | hyperband | none
        params:
          hidden_dim: {low: 64, high: 256, step: 32}
          lr: {low: 3.0e-4, high: 1.0e-2, log: true}
          loss: [smooth_l1, gaussian_nll]
    """
    p = Path(path)
    data = read_yaml(p, "space file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"space file {p} must hold a mapping with `params:` (the head settings to search)")
    other = [k for k in data if k not in SPACE_KEYS]
    if other:
        raise ConfigError(f"space file {p}: unknown top-level key {other[0]!r}; valid keys: {', '.join(SPACE_KEYS)}")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"space file {p} must name at least one head setting under `params:`, e.g. "
                          f"`lr: {{low: 3.0e-4, high: 1.0e-2, log: true}}`")
    fields = _field_types(HeadConfig)
    checks = {f.name: f.metadata.get("check") for f in dataclasses.fields(HeadConfig)}
    tuned = []
    for name, spec in params.items():
        where = f"space file {p}: params.{name}"
        if name not in fields:
            raise ConfigError(f"{where}: {name!r} is not a head setting; valid ones: {', '.join(fields)}")
        tp = fields[name]

        def value(v: Any, what: str) -> Any:
            try:
                v = _coerce(v, tp, f"head.{name}")
                if checks[name] is not None:
                    checks[name].check(v, f"head.{name}")
            except ConfigError as e:
                raise ConfigError(f"{where}: {what} is not a valid head setting: {e}") from None
            return ",".join(v) if isinstance(v, list) else v  # a list field's choice, as the trial stores it

        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: the list of choices is empty")
            choices = tuple(value(v, f"choice {v!r}") for v in spec)
            if len(set(choices)) < len(choices):
                raise ConfigError(f"{where}: the choices {spec} repeat a value")
            tuned.append(TunedParam(name, choices=choices))
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a list of choices or a range {{low: ..., high: ...}}, not {spec!r}")
        unknown = [k for k in spec if k not in RANGE_KEYS]
        if unknown or "low" not in spec or "high" not in spec:
            said = f"unknown key {unknown[0]!r}" if unknown else "a range needs low and high"
            raise ConfigError(f"{where}: {said}; a range holds {', '.join(RANGE_KEYS)} (step and log optional)")
        if tp not in (int, float):
            raise ConfigError(f"{where}: {name} is not a number, so it takes a list of choices, not a range")
        low, high = value(spec["low"], "low"), value(spec["high"], "high")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise ConfigError(f"{where}: log must be true or false, not {log!r}")
        if low > high:
            raise ConfigError(f"{where}: low ({low:g}) is above high ({high:g})")
        if log and low <= 0:
            raise ConfigError(f"{where}: a log range must start above 0 (low is {low:g})")
        if step is not None:
            if log:
                raise ConfigError(f"{where}: a range takes step or log, not both")
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 \
                    or (tp is int and not isinstance(step, int)):
                raise ConfigError(f"{where}: step must be a positive {'integer' if tp is int else 'number'}, "
                                  f"not {step!r}")
        tuned.append(TunedParam(name, low=low, high=high, step=step, log=log, integer=tp is int))
    try:
        rest = build_dataclass(_SpaceSettings, {k: v for k, v in data.items() if k != "params"}, "")
    except ConfigError as e:
        raise ConfigError(f"space file {p}: {e}") from None
    return SearchSpace(tuple(tuned), **dataclasses.asdict(rest))


@dataclass
class _SpaceSettings:
    """The space file's settings beside `params:`, checked as config values are."""
    pruner: Pruner = "median"
    startup_trials: int = ranged(5, ge=0)
    warmup_epochs: int = ranged(2, ge=0)
