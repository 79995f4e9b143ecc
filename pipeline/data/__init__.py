"""Data: decoding clips (PyAV, JPEG folders), probing videos, sampling clips, the clip dataset, dataset readers."""
