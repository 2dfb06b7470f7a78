"""Rectification: strategies, token selector and layer-range profiler."""

from relaykv.rectify.strategies import STRATEGIES, PrefillResult, Strategy, from_profile, prefill

__all__ = ["STRATEGIES", "PrefillResult", "Strategy", "from_profile", "prefill"]
