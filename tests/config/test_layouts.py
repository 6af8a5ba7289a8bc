"""Multi-node layouts in the config: hpZ with per-element method state, and ``subzero.replica_mode``."""

import pytest

from subzero_ds.config import ConfigError, parse


def config(hpz: int, **subzero) -> dict:
    return {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": hpz}, "subzero": subzero}


def test_hpz_refuses_a_direction_with_per_element_state_naming_the_key_and_the_fix():
    with pytest.raises(ConfigError) as error:
        parse(config(2, method="hizoo"))
    message = str(error.value)
    assert "`subzero.method` is 'hizoo'" in message and "Hessian" in message
    assert "zero_hpz_partition_size` is 2" in message and "remove" in message


@pytest.mark.parametrize("subzero", [{}, {"method": "mezo"}, {"method": "sparse_mezo"}, {"method": "rademacher"},
                                     {"update": "adam"}, {"method": "mezo", "update": "momentum"}])
def test_hpz_serves_the_other_methods_and_update_rules(subzero):
    parse(config(2, **subzero))


def test_without_hpz_every_method_is_served():
    parse(config(1, method="hizoo"))


def test_perturbation_mode_needs_a_method_with_several_directions_per_step():
    with pytest.raises(ConfigError) as error:
        parse({"subzero": {"method": "sparse_mezo", "replica_mode": "perturbation"}})
    message = str(error.value)
    assert "`subzero.replica_mode` is \"perturbation\"" in message and "sparse_mezo" in message
    assert 'set `subzero.replica_mode` to "data"' in message


def test_replica_mode_is_data_or_perturbation():
    with pytest.raises(ConfigError, match="replica_mode"):
        parse({"subzero": {"replica_mode": "model"}})
    assert parse({"subzero": {"replica_mode": "perturbation"}})[0].replica_mode.value == "perturbation"
