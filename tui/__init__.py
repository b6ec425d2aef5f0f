"""tunedeck's terminal side: the ``tunedeck`` command and the Textual dashboard."""
