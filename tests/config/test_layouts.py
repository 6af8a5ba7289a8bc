"""Multi-node layouts in the config: hpZ with per-element method state, and ``subzero.replica_mode``."""

import pytest

from subzero_ds.config import ConfigError, parse


def config(hpz: int, **subzero) -> dict:
    return {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": hpz}, "subzero": subzero}


@pytest.mark.parametrize("subzero,key,state", [({"update": "adam"}, "update", "Adam m, v"),
                                               ({"update": "momentum"}, "update", "momentum"),
                                               ({"method": "hizoo"}, "method", "Hessian")])
def test_hpz_refuses_per_element_state_naming_the_key_and_the_fix(subzero, key, state):
    with pytest.raises(ConfigError) as error:
        parse(config(2, **subzero))
    message = str(error.value)
    assert f"`subzero.{key}`" in message and state in message and "zero_hpz_partition_size` is 2" in message
    assert '"update": "sgd"' in message and "remove" in message


@pytest.mark.parametrize("subzero", [{}, {"method": "mezo"}, {"method": "sparse_mezo"}, {"method": "rademacher"}])
def test_hpz_serves_stateless_methods(subzero):
    parse(config(2, **subzero))


def test_without_hpz_stateful_updates_are_served():
    parse(config(1, update="adam"))


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
