"""Prefect tasks: thin wrappers that call the fedse library and record what happened (MLflow, artifacts).

One file per task concept. The library (`fedse/`) never imports Prefect or MLflow; these wrappers do.
"""
