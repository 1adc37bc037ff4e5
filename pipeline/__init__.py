"""hepreg: cached-embedding two-stage training for muon-spectrometer track reconstruction."""
__version__ = "0.1.0"
