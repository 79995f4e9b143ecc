"""Test helpers, imported as ``helpers.<module>``: config composition (``config``), small datasets in the
published layouts (``layouts``), independent computations of the CAM family (``oracles``) and parts that fail on
purpose (``traps``). Fixtures live in ``conftest.py``."""
