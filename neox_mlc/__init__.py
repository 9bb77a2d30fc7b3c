"""Workflow steps as importable modules; each CLI lives in its own file with ``main(argv)``."""
