"""A/B updates on the host side: sysupdate transfer definitions and `particle publish`."""
