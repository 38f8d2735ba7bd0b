"""amq: automated layer-wise mixed-precision weight-only quantization search (AMQ)."""

__version__ = "0.1.0"
