"""The machine side of `particle`: the verbs that run inside a booted ParticleOS image
(status, update, rollback, ext, overlay). Standard library only, because the image carries
just python3-minimal; the builder copies this package into /usr/lib/particleos."""
