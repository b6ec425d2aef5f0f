"""The offline transfer-learning demo (``tunedeck demo``)."""
