"""fp8q's version: in a module of its own, so that the wings that record it (the engine's fp8q.json, the CLI's
--version) need not import the package's lazy API. Imports: nothing."""

__version__ = "0.1.0"
