"""Market data feeds: historical CSV, live Pub/Sub, and the shared field model."""
