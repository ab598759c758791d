"""Optimizer plugins."""

from lightning_adapt.plugins.paged_optimizer import PagedOptimizerPlugin

__all__ = ["PagedOptimizerPlugin"]
