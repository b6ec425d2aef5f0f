"""The dashboard's screens: the main dashboard, run detail, experiments, and the small modals."""
