"""The package version, declared once: read by ``flatl2o.__version__``, by the build
(pyproject.toml's ``[tool.hatch.version]``), by the checkpoint writer (``flatl2o_version`` in
``config.json``) and by the Hub client (its user agent)."""

__version__ = "0.1.0"
