"""The content-addressed chunk store of a publish directory (delta updates): chunking, putting
files into the store, and garbage collection. The format is in `particleos.formats`."""
