"""Forecasting models shared by agents: :mod:`runtime.models.config` (settings, cheap to import)
and :mod:`runtime.models.chronos` (loading and serving Chronos; imports torch)."""
