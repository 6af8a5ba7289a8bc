"""Tools around training runs: ``subzero-sweep`` (``sweeps/``) and ``subzero-plot`` (``plot.py``)."""
