"""Registers the merging, clustering, novice and neuron-recombination strategies.

`registry._load_builtin` imports this module when it exists; each import below registers its
strategies: hc-smoe, m-smoe, stun (clustering), mone (novices), dern (neuron recombination).
"""

from moeprune.strategies import clustering, dern, mone  # noqa: F401
