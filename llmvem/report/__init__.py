"""Figures and the HTML report of run folders.

Example
-------
>>> from llmvem.report import write_report
>>> index = write_report(["runs/demo"])          # doctest: +SKIP
"""

from llmvem.report.page import baseline_and_aligned, write_report
from llmvem.report.runfolder import RunResults, load_run

__all__ = ["RunResults", "baseline_and_aligned", "load_run", "write_report"]
