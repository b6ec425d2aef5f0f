"""DVC: its CLI (`dvc`, the helper session a run keeps) and its remote (checkpoints that follow a run)."""
