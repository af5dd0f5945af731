"""Reports with pictures: one self-contained HTML file per run or optimisation.

==============  ==============================================================================
module          holds
==============  ==============================================================================
``bars``        ``BarRecorder`` (the bars a run saw) and the ``session_bars`` table
``store``       reading a report's data from DuckDB or BigQuery (``ReportData``)
``html``        the pages: ``render_run``, ``render_study`` (plotly, JS embedded)
``run``         what the runner calls after a run: store the bars, write the page
``__main__``    ``python -m runtime.reporting --db fmel.duckdb --session <id> --out r.html``
==============  ==============================================================================

Import from the module that holds a name.
"""
