"""The ``maskdp`` command line: the epsilon calculator (torch-free) and ``maskdp train``."""
