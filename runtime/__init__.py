"""perfusion_runtime: trains concepts with Perfusion and renders a compiled plan (see README.md)."""
