"""Test helpers, imported as ``helpers.<module>``: config composition (``config``), small datasets in the
published layouts (``layouts``), independent computations of the CAM family (``oracles``), parts that fail on
purpose (``traps``) and the model zoo at test size (``zoo``). Fixtures live in ``conftest.py``."""
