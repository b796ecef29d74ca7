"""capfilt: corpus-scale BLIP/BLIP-2 CapFilt over WebDataset shards."""

from capfilt.errors import CapfiltError

__all__ = ["CapfiltError"]
__version__ = "0.1.0"
