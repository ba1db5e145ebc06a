"""The self-contained HTML misalignment report (and the same numbers as JSON).

Example:
    >>> lp.report.write_report(lp.zoo.load("shapes-llava"), "runs/report", name="shapes-llava")
"""
from .run import Report, write_report

__all__ = ["Report", "write_report"]
