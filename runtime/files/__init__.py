"""Durable files, without torch and without any other module of ours: the one atomic writer,
the concept store, the build lock and the output files (runtime/README.md)."""
