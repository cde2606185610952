"""The built-in toy:shapes world and model."""
