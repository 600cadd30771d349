import pytest

from shared.config import NodeConfig, RunConfig
from shared.errors import ConfigError


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    assert cfg.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="unknown run config key 'num-round'.*Did you mean 'num-rounds'"):
        RunConfig.from_flower({"num-round": 3})


@pytest.mark.parametrize("key,value,message", [
    ("learning-rate", -1.0, "learning-rate' must be > 0"),
    ("local-steps", 0, "local-steps' must be a positive integer"),
    ("local-steps", "many", "must be of type int"),
    ("aggregation", "median", "must be one of fedavg, ffa"),
    ("dp-accountant", "gdp", "must be one of prv, rdp"),
    ("lora-dropout", 1.5, "lora-dropout' must be in"),
    ("dtype", "int8", "must be one of auto"),
    ("lora-target-modules", " , ", "must name at least one module"),
])
def test_bad_run_config_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({key: value})


def test_secagg_needs_three_nodes_per_round():
    for nodes in (1, 2):
        with pytest.raises(ConfigError, match="nodes-per-round' must be 0 \\(every node\\) or at least 3 with secagg"):
            RunConfig(nodes_per_round=nodes, secagg=True)
        RunConfig(nodes_per_round=nodes, min_nodes=nodes, secagg=False)


def test_flower_strings_and_bools_are_coerced():
    cfg = RunConfig.from_flower({"num-rounds": "4", "dp": "false", "learning-rate": 1})
    assert cfg.num_rounds == 4 and cfg.dp is False and cfg.learning_rate == 1.0
    with pytest.raises(ConfigError, match="type int"):
        RunConfig.from_flower({"num-rounds": 2.5})


def test_node_config_validation():
    assert NodeConfig.from_flower({"target-epsilon": "4"}).target_epsilon == 4.0
    with pytest.raises(ConfigError, match="target-epsilon' must be > 0"):
        NodeConfig(target_epsilon=0)
    with pytest.raises(ConfigError, match="target-delta"):
        NodeConfig(target_delta=1.0)


def test_configuration_reference_is_up_to_date():
    from pathlib import Path

    from shared.config import markdown_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == markdown_reference(), "regenerate: python -m shared.config > docs/configuration.md"


def test_pyproject_run_config_matches_the_typed_config():
    """Every key in [tool.flwr.app.config] exists in RunConfig, and every RunConfig key is there."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(flower) == set(RunConfig.keys())
    RunConfig.from_flower(flower)
