"""`--strategy auto`: plan with several strategies and keep the one closest to the dense model."""
