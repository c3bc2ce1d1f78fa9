"""DynaBase: a declarative reconciler for a multi-tenant Postgres platform."""

__version__ = "0.1.0"
