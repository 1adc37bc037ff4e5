"""Run configs read from YAML, with dotted command-line overrides, into the typed settings of `hepreg.settings`.

Unknown keys are errors, never silently ignored. Every value is checked when the config is loaded, before any
work starts (`build_dataclass`: the `Literal` choices, ranges and name patterns the settings declare), and a
bad value is refused with the valid ones in the message. Sweep files and `hepreg tune`'s space files are read
here too, against the head's settings.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from hepreg.errors import ConfigError
from hepreg.settings import Config, HeadConfig, ranged


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
