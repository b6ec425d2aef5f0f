"""tunedeck flows: the ML core (``flows.core``) and the Prefect layer around it."""
