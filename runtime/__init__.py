"""Runtime: configuration, secrets, the Runner, brokers, health and reports."""
