"""Decision sinks and the writer thread that feeds them.

==================  ===========================================================================
module              holds
==================  ===========================================================================
``base``            ``DecisionSink`` protocol, ``Row``, ``RowError``
``writer``          ``DecisionWriter`` (batching, retries, spill and replay), ``WriterStats``
``spill``           the spill file and the file of rejected rows (JSON lines, fsynced)
``duckdb``          ``LocalDuckDBSink``, the default embedded store
``views``           the ``decision_reads`` view, loaded from ``sql/<dialect>/``
``bigquery``        the BigQuery sink: config, schema, rows, errors, client, topic, sink
==================  ===========================================================================

Import from the module that holds a name (``from analyzers.sinks.writer import
DecisionWriter``).
"""
