"""ParticleOS: one declarative spec to a signed, immutable, image-based Debian system."""

__version__ = "0.1.0"
