"""The self-contained HTML misalignment report."""

__all__: list[str] = []
