"""Behavioural benchmarks: asking models questions and scoring the answers."""
from .answers import accuracy_by, ask, first_word

__all__ = ["ask", "accuracy_by", "first_word"]
