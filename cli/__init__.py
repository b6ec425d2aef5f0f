"""The `tunedeck` command: every verb, nothing else (parsing, one sentence per error, exit codes).

May import everything below it: tui, flows.*.
"""
