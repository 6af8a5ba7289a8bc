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
