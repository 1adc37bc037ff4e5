from pathlib import Path

import pytest

from hepreg.config import config_from_dict, load_config
from hepreg.settings import Config
from hepreg.errors import ConfigError


def test_defaults_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel:\n  dim: 64\nhead:\n  dropout: 0\n")
    cfg = load_config(p)
    assert cfg.name == "x" and cfg.model.dim == 64 and cfg.model.num_heads == 8
    assert isinstance(cfg.head.dropout, float) and cfg.head.dropout == 0.0


def test_dotted_overrides_apply_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("head:\n  hidden_dim: 32\n")
    cfg = load_config(p, ["head.hidden_dim=256", "export.prune_threshold=0.05", "head.pooling=[mean,max]",
                          "data.max_events=null", "head.hidden_dim=128"])
    assert cfg.head.hidden_dim == 128
    assert cfg.export.prune_threshold == 0.05
    assert cfg.head.pooling == ["mean", "max"]
    assert cfg.data.max_events is None


@pytest.mark.parametrize("override, words", [
    ("model.dimm=3", ["model.dimm", "dim", "num_heads"]),
    ("nosection.x=1", ["nosection", "data", "model"]),
    ("name.x=1", ["name", "not a section"]),
    ("model.dim=abc", ["model.dim", "integer"]),
    ("head.dropout=[1]", ["head.dropout", "number"]),
    ("model.dim", ["section.key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("head:\n  hiden_dim: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "head.hiden_dim" in str(e.value) and "hidden_dim" in str(e.value) and str(p) in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_round_trip_and_fingerprint():
    cfg = load_config(None, ["model.dim=48"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert Config().fingerprint() != cfg.fingerprint()
    assert Config().fingerprint("head") == cfg.fingerprint("head")


def test_shipped_configs_load():
    """Every shipped config loads, every value it sets is the value the run gets, and it survives the round trip
    through the config.yaml a stage saves."""
    import yaml

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    for name in ("configs/demo.yaml", "configs/atlas_muon.yaml"):
        cfg = load_config(name)
        written = dict(leaves(yaml.safe_load(Path(name).read_text())))
        loaded = dict(leaves(cfg.to_dict()))
        assert written and all(loaded[k] == v for k, v in written.items()), name
        assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
