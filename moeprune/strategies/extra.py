"""Registers the merging, clustering, novice and neuron-recombination strategies.

`moeprune.strategies.registry` imports this module (explicitly); each import below registers its
strategies: hc-smoe, m-smoe, stun (clustering), mone (novices), dern (neuron recombination).
"""

from moeprune.strategies import clustering, dern, mone  # noqa: F401
from moeprune.strategies import aimer, criteria  # noqa: F401  (man, msan, unified, aimer)
from moeprune.strategies import naee, uncurl  # noqa: F401  (naee: subset reconstruction; uncurl: spectral merging)
from moeprune.strategies import premoe  # noqa: F401  (premoe, PreMoE PEU)
