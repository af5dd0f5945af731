"""The BigQuery decision sink (``FMEL_SINK=bigquery``).

==============  ===============================================================================
module          holds
==============  ===============================================================================
``config``      ``BigQuerySinkConfig`` (``FMEL_DATASET``, ``FMEL_TABLE``, ...)
``sink``        ``BigQuerySink``: where a record leaves for BigQuery (insertAll, no dups)
``schema``      schema comparison and evolution; dataset, table and view creation
``rows``        row validation with BigQuery's rules, request sizes and chunks
``compact``     compact rows (reads grouped per bar) and the view that gives them back
``errors``      failure classification: transient, poison row, or for a human
``client``      the client (emulator or ADC) and one query without client-side retries
``topic``       optional copies of written rows on a Pub/Sub topic
==============  ===============================================================================
"""
