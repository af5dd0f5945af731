"""Decision sinks and the writer thread that feeds them.

==================  ===========================================================================
module              holds
==================  ===========================================================================
``base``            ``DecisionSink`` protocol, ``Row``, ``RowError``
``writer``          ``DecisionWriter`` (batching, retries, spill and drain, counts), ``WriterStats``
``journal``         ``DecisionJournal``: every decision on local disk first (paper runs)
``spill``           the spill queue and the file of rejected rows (JSON lines, fsynced)
``duckdb``          ``LocalDuckDBSink``, the default embedded store
``views``           the ``decision_reads`` view, loaded from ``sql/<dialect>/``
``bigquery``        the BigQuery sink: config, schema, rows, errors, client, topic, sink
==================  ===========================================================================

Import from the module that holds a name (``from analyzers.sinks.writer import
DecisionWriter``).
"""
