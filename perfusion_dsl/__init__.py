"""perfusion_dsl: the .concept language compiler (parser, passes, plan, CLI); never imports torch."""

__version__ = "0.1.0"
