"""The .concept grammar, shipped as package data."""
