"""benchmarks/adapters_routing.py: the per-route perplexities that say where merged adapters cost."""

import math

from benchmarks.adapters_routing import _ppl, _ppl_by_route
from curriculum.adapters import Scored


def test_perplexity_by_route_pools_the_passages_routed_to_each_adapter():
    scored = [Scored(2.0, 4, [("nb1", 1.0)]), Scored(6.0, 2, [("nb0", 1.0)]), Scored(4.0, 4, [("nb1", 1.0)]),
              Scored(1.0, 1, [("nb0", 0.7), ("nb1", 0.3)])]  # a mixture counts for its top route
    by = _ppl_by_route(scored)
    assert list(by) == ["nb0", "nb1"]
    assert math.isclose(by["nb0"], math.exp(7.0 / 3)) and math.isclose(by["nb1"], math.exp(6.0 / 8))
    assert math.isclose(_ppl(scored), math.exp(13.0 / 11))  # the pooled value is token-weighted, not a mean of routes


def test_a_tether_arm_sets_its_own_settings_over_the_command_line():
    import argparse

    import pytest

    from benchmarks.adapters_routing import arm_args, tether_arm

    assert tether_arm("0.9") == (0.9, {})
    assert tether_arm("0.9:max_group=2") == (0.9, {"max_group": 2})
    assert tether_arm("0:compare=expert,window=12") == (0.0, {"compare": "expert", "window": 12})
    for bad in ("high", "0.9:rank=2", "0.9:max_group=two"):
        with pytest.raises(argparse.ArgumentTypeError, match=bad.split(":")[0]):
            tether_arm(bad)
    args = argparse.Namespace(tether_compare="adapter", tether_max_group=0, tether_window=6, seeds=[0])
    a = arm_args(args, {"compare": "expert"})
    assert (a.tether_compare, a.tether_max_group, a.seeds) == ("expert", 0, [0])
    assert args.tether_compare == "adapter"  # the command line's own arguments stay as given
