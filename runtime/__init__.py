"""Runtime: trains and renders a compiled plan (arrives in a later issue)."""
