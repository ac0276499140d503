"""One evaluation harness for every scheme: a YAML grid of schemes x attacks x budgets x seeds on one host and
dataset, cached artifacts, resumable results, a false-alarm study and reports (``nnmark evaluate``).

Modules: :mod:`~nnmark.harness.config` (YAML -> validated plan), :mod:`~nnmark.harness.cache` (content-addressed
artifacts), :mod:`~nnmark.harness.grid` (cells and the results log), :mod:`~nnmark.harness.runner` (fan-out over
processes or Ray), :mod:`~nnmark.harness.falsealarm` (clean and foreign-key suspects), :mod:`~nnmark.harness.report`
(CSV, Markdown, plots, HTML), :mod:`~nnmark.harness.robustness` (the cheapest removing attack per scheme),
:mod:`~nnmark.harness.forgery` (ambiguity attempts, raw and under the commitment rule) and
:mod:`~nnmark.harness.tracing` (the fingerprint tracer against coalitions of customers' copies).
"""
