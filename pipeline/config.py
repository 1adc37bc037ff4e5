"""Typed run configuration: dataclasses loaded from YAML, with dotted command-line overrides.

One `Config` describes a whole run (data, stage-1 model and training, export, head, evaluation), so every
stage of a run reads the same file and the cache and checkpoints can fingerprint exactly what made them.
Unknown keys are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hepreg.errors import ConfigError


@dataclass
class DataConfig:
    path: str = "data/demo"  # dataset directory in the ATLAS-muon HDF5 layout
    max_events: int | None = None  # use only the first N events of the dataset
    val_fraction: float = 0.1  # contiguous event ranges: [train | val | test]
    test_fraction: float = 0.1
    batch_size: int = 128  # events per batch (stage 1 and the live head path)
    bucket_window: int = 32  # batches per sorting window when bucketing by hit count
    block_events: int = 8192  # events read from HDF5 per call


@dataclass
class ModelConfig:
    """The stage-1 MaskFormer (reference: hepattn atlas_muon)."""
    dim: int = 32
    num_heads: int = 8
    encoder_layers: int = 2
    decoder_layers: int = 2
    num_queries: int = 2
    ffn_mult: int = 4  # FFN hidden width = ffn_mult * dim
    dropout: float = 0.0
    mask_attn_threshold: float = 0.1  # decoder mask attention: sigmoid(logit) >= threshold
    pos_enc: bool = True  # fixed sinusoidal encoding of r, theta, phi


@dataclass
class AssignConfig:
    """Stage-1 training."""
    epochs: int = 30
    batch_size: int | None = None  # events per training step; None: data.batch_size (validation always uses it)
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | lion
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    patience: int = 5  # early stopping on val loss, in epochs
    valid_cost: float = 10.0  # matching cost weights
    mask_cost: float = 1.0
    dice_cost: float = 0.0
    valid_weight: float = 1.0  # loss weights
    mask_weight: float = 1.0
    dice_weight: float = 0.0
    intermediate_losses: bool = True  # tasks at every decoder layer's input, matched separately
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA) | fp32 | bf16
    max_minutes: float | None = None  # stop after this wall time (the last epoch still completes)


@dataclass
class ExportConfig:
    dtype: str = "float16"  # float16 | float32 for hits/embed
    prune_threshold: float | None = None  # None: the head's threshold; 0 keeps every hit
    block_events: int = 4096  # events per write block (and per zarr chunk along events)
    hit_chunk: int = 32768  # hits per zarr chunk of the flat hit arrays
    batch_size: int = 256  # events per frozen forward pass
    compressor: str = "lz4"  # lz4 | zstd | none
    clevel: int = 5
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    device: str = "auto"


@dataclass
class HeadConfig:
    """The weighted-pooling regression head (one configuration; sweeps vary these)."""
    hidden_dim: int = 144
    num_layers: int = 3
    dropout: float = 0.1
    threshold: float = 0.1  # assignment threshold on sigmoid(final logit)
    pooling: list[str] = field(default_factory=lambda: ["mean", "sum", "max", "min"])
    pt_target: str = "qpt"  # qpt (q/pT, the curvature) | pt | log_pt
    lr: float = 1e-3
    weight_decay: float = 1e-5


@dataclass
class HeadTrainConfig:
    """Stage-2 training."""
    source: str = "cache"  # cache | live
    epochs: int = 30
    batch_size: int = 2048
    patience: int = 5
    grad_clip: float = 1.0
    shuffle_buffer: int = 8  # blocks mixed per shuffle buffer
    in_memory: str = "auto"  # auto | yes | no: hold the whole split in RAM when it fits
    num_workers: int = 0
    device: str = "auto"


@dataclass
class EvalConfig:
    split: str = "test"
    pt_bins: list[float] = field(default_factory=lambda: [3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0])
    eta_bins: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0, 2.7])


@dataclass
class Config:
    name: str = "demo"
    seed: int = 0
    run_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    head_train: HeadTrainConfig = field(default_factory=HeadTrainConfig)
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
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is not str:
            value = [value]
        if isinstance(value, str) and item is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
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
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


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
            node[p] = yaml.safe_load(raw) if raw.strip() else None
        else:
            cls = types_[p]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = node.setdefault(p, {})
    return data


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
    for o in overrides or []:
        data = apply_override(data, o)
    try:
        return build_dataclass(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config stored in a checkpoint or cache attrs."""
    return build_dataclass(Config, data, "")
