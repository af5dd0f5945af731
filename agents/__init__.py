"""Example agents: ordinary ``bt.Strategy`` subclasses users copy."""
