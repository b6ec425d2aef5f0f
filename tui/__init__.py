"""tunedeck's dashboard: the Textual app, screens and widgets over providers that hand them frozen dataclasses."""
