"""The run report: an offline HTML page with figures (curves, per-identity AP, retrieval grids,
similarity distributions) built from a run folder. Entry point: `build_report(run_dir)`."""

from jaguar.report.html import build_report

__all__ = ["build_report"]
