"""Diagnostics: what training changed against the base model (METHODS §3 and §5).

``source`` resolves the models and the task a diagnostic runs on; ``tokendiff`` (``forkrl diff``) and
``passk`` (``forkrl passk``) do the measurements.
"""
