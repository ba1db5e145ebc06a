"""Circuits: activation and path patching, head attribution."""

__all__: list[str] = []
