"""The layer-wise engine: one runner that takes hidden states through decoder layers in order."""
