"""The dashboard's widgets: each shows provider dataclasses and posts messages up, never fetches."""
