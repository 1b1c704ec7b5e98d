"""secret-broker: a local secret store and broker daemon."""

__version__ = "0.1.0"
