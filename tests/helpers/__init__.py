"""Test utilities for the integration suites: free ports, a PostgreSQL cluster, the OpenPACS server process,
DCMTK command wrappers and test data builders. Importable as ``helpers`` (tests/conftest.py puts tests/ on sys.path)."""
