"""Checkpoints: sharded ZO state that resumes exactly (``sharded.py``), full Hugging Face weights
(``export.py``), and the ``subzero-export`` command that turns the one into the other (``cli.py``)."""
