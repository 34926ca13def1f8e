"""Measured hardware costs and the performance model built on them."""
