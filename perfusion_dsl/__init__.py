"""perfusion_dsl: the .concept compiler (parser, passes, plan, CLI); never imports torch."""

__version__ = "0.1.0"
