"""OCI registries as a channel for versions: a small client of the distribution API
(`registry`), a version as an OCI artifact (`artifact`), a build as a container image
(`export`)."""
