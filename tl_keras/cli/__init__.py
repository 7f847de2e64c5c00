"""The command line: the flags, and the modes, each assembling a run from the
stages and running it.

Imports every stage; no stage imports it.
"""
